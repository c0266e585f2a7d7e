"""The plugin under device_map dictionaries that name several devices, as far as a CPU-only machine allows.

What a CPU can hold: transformers' planning for several GPUs (``device_map="auto"``
with a ``max_memory`` naming GPUs 0 and 1 plans without touching a GPU), the
load-time quantize op seen through a spy (each weight quantized once, on the
device it is loaded to), and maps that split layers between ``"cpu"`` and
``"disk"``, with save → reload under another map, bit for bit.

What it cannot: a real second device. ``"meta"`` is no placement (transformers
leaves such weights unloaded, so even an unquantized model cannot run), and
two CPU entries such as ``"cpu"`` and ``"cpu:0"`` make accelerate's dispatch
fail for any model (a TypeError in ``set_module_tensor_to_device``, with or
without quantization). ``eval/checks/multi_gpu_check.py`` runs the real 2-GPU case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from qwantize_hf import MXFP4Config, MXFP4Linear
from qwantize_hf.quantizer import MXFP4HfQuantizer
from qwantize_hf.read_back import READ_BACK
from tests.tiny_models import COMMON, assert_same_tensors, input_ids, save_random_model

REPO = Path(__file__).resolve().parents[1]
LAYERS = 4
NOT_LAYERS = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")


def layer_map(*placements: str | int) -> dict[str, str | int]:
    """A device_map with one entry per decoder layer (``placements[i]``), the rest on the CPU."""
    device_map: dict[str, str | int] = dict.fromkeys(NOT_LAYERS, "cpu")
    device_map.update({f"model.layers.{i}": placement for i, placement in enumerate(placements)})
    return device_map


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    config = LlamaConfig(**{**COMMON, "num_hidden_layers": LAYERS, "hidden_size": 128, "intermediate_size": 256})
    return save_random_model(config, tmp_path_factory.mktemp("multi-device") / "bf16")


class QuantizeSpy:
    """Wraps the quantize call of the load-time op and records, per layer, the device and dtype it got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import qwantize_hf.read_back
        import qwantize_hf.replace

        self.calls: list[tuple[str, torch.device, torch.dtype]] = []
        self.real = qwantize_hf.replace.quantize_mxfp4
        # the load-time op, and the random-token pass that reads each weight back
        for module in (qwantize_hf.replace, qwantize_hf.read_back):
            monkeypatch.setattr(module, "quantize_mxfp4", self)

    def __call__(self, tensor: torch.Tensor, *args, **kwargs):
        self.calls.append((kwargs.get("name"), tensor.device, tensor.dtype))
        return self.real(tensor, *args, **kwargs)


def quantized(model) -> dict[str, MXFP4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MXFP4Linear)}


# --------------------------------------------------------------------------- planning for two GPUs (no GPU needed)


class Planned(Exception):
    """Raised by the spy once transformers has planned the device map: loading onto GPUs cannot happen here."""


@pytest.fixture
def plans(monkeypatch):
    """The device maps transformers plans, caught when it hands them to the quantizer's check."""
    recorded: list[dict] = []
    real = MXFP4HfQuantizer.validate_environment

    def check_then_stop(self, *args, device_map=None, **kwargs):
        real(self, *args, device_map=device_map, **kwargs)  # the plugin's own check still runs on the plan
        if isinstance(device_map, dict):
            recorded.append(dict(device_map))
            raise Planned
        return None

    monkeypatch.setattr(MXFP4HfQuantizer, "validate_environment", check_then_stop)
    return recorded


def plan_for(folder, plans, max_memory) -> dict:
    with pytest.raises(Planned):
        AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=MXFP4Config(), device_map="auto", max_memory=max_memory
        )
    return plans[-1]


def test_two_gpus_hold_a_model_whose_bf16_weights_would_not_fit(bf16_folder, plans):
    bf16_bytes = AutoModelForCausalLM.from_pretrained(bf16_folder).get_memory_footprint()
    mxfp4_bytes = AutoModelForCausalLM.from_pretrained(
        bf16_folder, quantization_config=MXFP4Config()
    ).get_memory_footprint()
    per_gpu = bf16_bytes // 3  # two of them hold 2/3 of the bf16 model, ~2x the MXFP4 one
    assert 2 * per_gpu < bf16_bytes and 2 * per_gpu > 1.5 * mxfp4_bytes
    plan = plan_for(bf16_folder, plans, {0: per_gpu, 1: per_gpu, "cpu": 10 * bf16_bytes})
    # planned with 4.25-bit sizes: everything on the two GPUs, both used, decoder layers in order
    assert set(plan.values()) == {0, 1}, plan
    layer_devices = [plan[f"model.layers.{i}"] for i in range(LAYERS)]
    assert layer_devices == sorted(layer_devices) and layer_devices[0] == 0 and layer_devices[-1] == 1


def test_gpus_too_small_spill_to_the_cpu_which_quantize_on_load_accepts(bf16_folder, plans):
    mxfp4_bytes = AutoModelForCausalLM.from_pretrained(
        bf16_folder, quantization_config=MXFP4Config()
    ).get_memory_footprint()
    per_gpu = mxfp4_bytes // 2  # less than the whole, after accelerate reserves room for the largest layer
    plan = plan_for(bf16_folder, plans, {0: per_gpu, 1: per_gpu, "cpu": 100 * mxfp4_bytes})
    assert {0, 1, "cpu"} <= set(plan.values()) and "disk" not in plan.values(), plan


def test_a_plan_that_reaches_disk_is_refused_before_loading(bf16_folder, plans, tmp_path):
    with pytest.raises(ValueError, match="cannot offload layers to disk"):
        AutoModelForCausalLM.from_pretrained(
            bf16_folder,
            quantization_config=MXFP4Config(),
            device_map="auto",
            max_memory={0: 1000, 1: 1000, "cpu": 1000, "disk": "1GB"},
            offload_folder=tmp_path,
        )
    assert not plans


# --------------------------------------------------------------------------- where each weight is quantized


@pytest.mark.parametrize(
    "device_map",
    [layer_map("cpu", "cpu", "cpu", "cpu"), "auto", {"": "cpu"}],
    ids=["one-entry-per-layer", "auto", "everything"],
)
def test_each_weight_is_quantized_once_on_the_device_that_holds_it(bf16_folder, monkeypatch, device_map):
    spy = QuantizeSpy(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(bf16_folder, quantization_config=MXFP4Config(), device_map=device_map)
    modules = quantized(model)
    # as it loads, then once more with the random-token statistics: twice each, in the same place (in
    # between, the first rows read back from the checkpoint are checked against the loaded bytes)
    names = [name for name, _, _ in spy.calls if not name.endswith(READ_BACK)]
    assert sorted(set(names)) == sorted(modules) and len(modules) == 7 * LAYERS
    assert all(names.count(name) == 2 for name in modules)
    for name, device, dtype in spy.calls:
        name = name.removesuffix(READ_BACK)
        # the checkpoint's bf16 tensor, already on its target device: never a meta placeholder, never cast
        assert dtype == torch.bfloat16, name
        assert device == modules[name].weight.device == modules[name].weight_scale.device, name
        # "auto" puts the model on the GPU when there is one
        assert device.type == ("cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- save under one map, reload under another


@pytest.fixture(scope="module")
def quantized_split(bf16_folder, tmp_path_factory):
    """Quantized while loading with one device_map entry per layer, then saved."""
    model = AutoModelForCausalLM.from_pretrained(
        bf16_folder, quantization_config=MXFP4Config(), device_map=layer_map("cpu", "cpu", "cpu", "cpu")
    )
    folder = tmp_path_factory.mktemp("multi-device") / "mxfp4"
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids()).logits
    return folder, logits


def reload_maps(full_bytes: int) -> dict[str, dict]:
    return {
        "layers-alternate-cpu-disk": {"device_map": layer_map("cpu", "disk", "cpu", "disk")},
        "layers-on-disk-first": {"device_map": layer_map("disk", "disk", "cpu", "cpu")},
        "auto-cpu-budget-then-disk": {
            "device_map": "auto",
            "max_memory": {"cpu": full_bytes * 6 // 10, "disk": "1GB"},
        },
    }


@pytest.mark.parametrize("label", ["layers-alternate-cpu-disk", "layers-on-disk-first", "auto-cpu-budget-then-disk"])
def test_reload_under_another_device_map_is_bit_identical(quantized_split, label, tmp_path, monkeypatch):
    folder, expected_logits = quantized_split

    def refuse(*args, **kwargs):
        raise AssertionError("a stored MXFP4 checkpoint must load without quantizing again")

    full_bytes = AutoModelForCausalLM.from_pretrained(folder).get_memory_footprint()
    monkeypatch.setattr("qwantize_hf.replace.quantize_mxfp4", refuse)
    monkeypatch.setattr("qwantize_hf.read_back.quantize_mxfp4", refuse)
    model = AutoModelForCausalLM.from_pretrained(
        folder, offload_folder=tmp_path / "offload", **reload_maps(full_bytes)[label]
    )
    assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    offloaded = [name for name, m in quantized(model).items() if m.weight.device.type == "meta"]
    assert offloaded, "some quantized weights should live on disk under this map"
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, expected_logits)
    # Saving gathers the offloaded weights back: every stored tensor as first written, byte for byte.
    with pytest.warns(UserWarning, match="offloaded modules"):
        model.save_pretrained(tmp_path / "again")
    first, again = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert_same_tensors(first, again)
    assert first["model.layers.1.mlp.up_proj.weight"].dtype == torch.uint8


# ----------------------------------------------------------------------- eval/checks/multi_gpu_check.py without a GPU


def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep where the rest comes from
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    command = [sys.executable, str(REPO / "eval" / "checks" / "multi_gpu_check.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=cwd)


def test_multi_gpu_check_dry_run_passes_every_check(tmp_path):
    done = run_check("--dry-run", "--out", str(tmp_path), "--work", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "multi_gpu_check.json").read_text())
    assert results["checks"] == {
        "each_weight_quantized_on_its_device": True,
        "generation_length": True,
        "reload_bit_identical": True,
        "reload_not_requantized": True,
        "data_parallel_perplexity_equal": True,
    }
    split = results["split_load"]
    # 7 Linears in each of 4 layers, each quantized as it loads and again with its random-token statistics
    assert split["quantized_layers"] == split["quantize_calls"] // 2 == 7 * 4
    assert split["quantized_layers_by_device"] == {"cpu": 28} and split["memory_by_gpu"] == {}
    ppl = results["perplexity"]
    assert ppl["processes"] == 2 and set(ppl["methods"]) == {"bf16", "mse"}
    assert all(m["tokens_single"] == m["tokens_data_parallel"] == ppl["tokens"] for m in ppl["methods"].values())
    assert "all checks pass: True" in done.stdout


def test_multi_gpu_check_without_two_gpus_says_so(tmp_path):
    # run_check hides every GPU, so this holds on any machine
    done = run_check("--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode != 0
    assert "needs 2 or more CUDA GPUs (found 0); --dry-run runs it on the CPU" in done.stderr
