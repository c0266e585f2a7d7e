"""The transformers plugin end to end on tiny models: quantize on load, forward, generate, save, reload.

Runs against whichever transformers is installed (``make test`` also runs it on
5.17, the oldest supported release, in a second venv).
"""

from __future__ import annotations

import json
import logging
import tempfile

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config, MXFP4Linear, dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.config import WRITER
from qwantize_hf.constants import BITS_PER_WEIGHT, F4_CODES_PER_BYTE
from qwantize_hf.quantizer import MXFP4HfQuantizer
from tests.tiny_models import (
    FAMILIES,
    assert_same_tensors,
    input_ids,
    linear_names,
    odd_llama_config,
    random_token_statistics,
    save_random_model,
    tied_llama_config,
)

BF16_BYTES = 2


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {family: save_random_model(make(), root / family) for family, make in FAMILIES.items()}


@pytest.fixture(scope="module")
def mxfp4_checkpoints(bf16_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    folders = {}
    for family, source in bf16_checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=MXFP4Config())
        model.save_pretrained(root / family)
        folders[family] = root / family
    return folders


def load_quantized(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=MXFP4Config(), **kwargs)


def fake_quant_reference(path, dtype: torch.dtype, block_size: int = 32, scale_method: str = "mse"):
    """The bf16 model with every quantizable Linear's weight replaced by dequantize(quantize(W)), each
    quantized as ``MXFP4Config(block_size=..., scale_method=...)`` does: ``mse`` weighted by the
    random-token statistics (``tiny_models.random_token_statistics``)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    weighted = random_token_statistics(path, dtype, block_size=block_size) if scale_method == "mse" else {}
    for name, module in linear_names(model).items():
        if name == "lm_head" or module.in_features % block_size:
            continue
        packed, scales = quantize_mxfp4(
            module.weight.data, block_size=block_size, scale_method=scale_method, weights=weighted.get(name)
        )
        module.weight.data = dequantize_mxfp4(packed, scales, block_size=block_size, dtype=dtype)
    return model


# --------------------------------------------------------------------------- module replacement


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_linear_but_lm_head_is_replaced(bf16_checkpoints, family):
    model = load_quantized(bf16_checkpoints[family])
    linears = linear_names(model)
    assert type(linears.pop("lm_head")) is nn.Linear
    assert linears and all(isinstance(m, MXFP4Linear) for m in linears.values()), linears
    for module in linears.values():
        n, k = module.out_features, module.in_features
        assert module.weight.dtype == torch.uint8 and module.weight.shape == (n, k // F4_CODES_PER_BYTE)
        assert module.weight_scale.dtype == torch.uint8 and module.weight_scale.shape == (n, k // 32)
        assert not module.weight.requires_grad
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head"]


def test_qwen2_biases_are_kept(bf16_checkpoints):
    model = load_quantized(bf16_checkpoints["qwen2"])
    reference = AutoModelForCausalLM.from_pretrained(bf16_checkpoints["qwen2"])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, MXFP4Linear) and q_proj.bias.dtype == torch.bfloat16
    assert torch.equal(q_proj.bias, reference.model.layers[0].self_attn.q_proj.bias)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_fake_quant_reference(bf16_checkpoints, family):
    # float32 makes both sides do the same arithmetic: the only difference allowed is
    # the summation order inside F.linear, which is the same for the same shapes.
    ids = input_ids()
    model = load_quantized(bf16_checkpoints[family], dtype=torch.float32)
    reference = fake_quant_reference(bf16_checkpoints[family], torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(bf16_checkpoints[family], dtype=torch.float32)
    with torch.no_grad():
        logits, expected, unquantized = model(ids).logits, reference(ids).logits, plain(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.dtype == torch.float32
    # ... and quantization did change the model (the test could not pass with bf16 weights)
    assert (logits - unquantized).abs().max() > 1e-3


def test_bf16_logits_close_to_fake_quant_reference(bf16_checkpoints):
    ids = input_ids()
    model = load_quantized(bf16_checkpoints["llama"])
    reference = fake_quant_reference(bf16_checkpoints["llama"], torch.bfloat16)
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale_method", ["naive", "even"])
def test_block16_and_other_scale_methods(bf16_checkpoints, scale_method):
    ids = input_ids()
    config = MXFP4Config(block_size=16, scale_method=scale_method)
    model = AutoModelForCausalLM.from_pretrained(
        bf16_checkpoints["llama"], quantization_config=config, dtype=torch.float32
    )
    reference = fake_quant_reference(bf16_checkpoints["llama"], torch.float32, 16, scale_method)
    assert model.model.layers[0].mlp.up_proj.weight_scale.shape == (128, 64 // 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_runs(bf16_checkpoints, family):
    model = load_quantized(bf16_checkpoints[family])
    ids = input_ids(batch=1, length=5)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)


def test_not_multiple_of_block_size_is_skipped_with_one_warning(tmp_path, caplog):
    source = save_random_model(odd_llama_config(), tmp_path / "odd")
    with caplog.at_level(logging.WARNING, logger="qwantize_hf"):
        model = load_quantized(source)
    warnings = [r for r in caplog.records if r.name.startswith("qwantize_hf") and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "model.layers.0.mlp.down_proj" in message and "modules_to_not_convert" in message
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, MXFP4Linear)
    skipped = model.config.quantization_config.modules_to_not_convert
    assert skipped == ["lm_head", "model.layers.0.mlp.down_proj"]

    # The saved config records the skip, so a reload skips the same layer silently.
    model.save_pretrained(tmp_path / "q")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwantize_hf"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert not [r for r in caplog.records if r.name.startswith("qwantize_hf")]
    assert type(reloaded.model.layers[0].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, model(input_ids()).logits)


def test_modules_to_not_convert_by_name(bf16_checkpoints):
    config = MXFP4Config(modules_to_not_convert=["lm_head", "layers.1.mlp"])
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoints["llama"], quantization_config=config)
    assert type(model.model.layers[1].mlp.gate_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.gate_proj, MXFP4Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, MXFP4Linear)
    # the user's config object is left as given: the resolved list lives on the model's copy
    assert config.modules_to_not_convert == ["lm_head", "layers.1.mlp"]


def test_a_users_list_adds_to_the_defaults(bf16_checkpoints, tmp_path):
    # ["mlp"] must not quantize lm_head: the defaults stay, the user's names come on top
    model = AutoModelForCausalLM.from_pretrained(
        bf16_checkpoints["llama"], quantization_config=MXFP4Config(modules_to_not_convert=["mlp"])
    )
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, MXFP4Linear)
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head", "mlp"]
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(reloaded.lm_head) is nn.Linear and type(reloaded.model.layers[0].mlp.up_proj) is nn.Linear


def test_a_stored_list_without_lm_head_still_loads_its_quantized_lm_head(bf16_checkpoints, tmp_path):
    # a checkpoint written when a list replaced the defaults: its record is what it stores
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoints["llama"], quantization_config=MXFP4Config())
    head = MXFP4Linear.from_linear(model.lm_head, block_size=32)
    model.lm_head = head
    model.config.quantization_config.modules_to_not_convert = ["mlp.gate_proj"]
    for layer in model.model.layers:  # the record's unquantized modules, stored in bf16
        gate = layer.mlp.gate_proj
        layer.mlp.gate_proj = nn.Linear(gate.in_features, gate.out_features, bias=False, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "old")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert isinstance(reloaded.lm_head, MXFP4Linear) and torch.equal(reloaded.lm_head.weight, head.weight)
    assert type(reloaded.model.layers[1].mlp.gate_proj) is nn.Linear


def test_tied_lm_head_stays_unquantized(tmp_path):
    source = save_random_model(tied_llama_config(), tmp_path / "tied")
    config = MXFP4Config(modules_to_not_convert=[])
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head", "model.embed_tokens"]
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids()).logits, model(input_ids()).logits)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_nan_weight_fails_naming_the_layer(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tied_llama_config(), dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 40] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    # transformers collects errors of load-time ops into its loading report (logged), then raises
    handler = ListHandler()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="conversion"):
            load_quantized(tmp_path / "nan")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    report = "\n".join(handler.messages)
    assert "model.layers.1.self_attn.k_proj (shape (32, 64)) holds NaN or Inf in 1 block(s)" in report


# --------------------------------------------------------------------------- memory


def test_memory_footprint_is_4_25_bits_per_quantized_weight(bf16_checkpoints):
    plain = AutoModelForCausalLM.from_pretrained(bf16_checkpoints["llama"])
    model = load_quantized(bf16_checkpoints["llama"])
    quantized = [m for m in model.modules() if isinstance(m, MXFP4Linear)]
    quantized_weights = sum(m.in_features * m.out_features for m in quantized)
    saved = quantized_weights * (BF16_BYTES - BITS_PER_WEIGHT[32] / 8)
    assert plain.get_memory_footprint() - model.get_memory_footprint() == saved
    packed_bytes = sum(m.weight.numel() + m.weight_scale.numel() for m in quantized)
    assert packed_bytes * 8 / quantized_weights == BITS_PER_WEIGHT[32] == 4.25


def test_device_map_auto_plans_with_quantized_sizes(bf16_checkpoints):
    # Room for the quantized model but not the bf16 one: planning with bf16 sizes would
    # send layers to disk, which quantize-on-load refuses (see test below).
    quantized_size = load_quantized(bf16_checkpoints["llama"]).get_memory_footprint()
    bf16_size = AutoModelForCausalLM.from_pretrained(bf16_checkpoints["llama"]).get_memory_footprint()
    budget = (quantized_size + bf16_size) // 2
    model = load_quantized(bf16_checkpoints["llama"], device_map="auto", max_memory={"cpu": budget})
    # transformers sets hf_device_map only when the map names more than one device
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert isinstance(model.model.layers[1].mlp.down_proj, MXFP4Linear)


# --------------------------------------------------------------------------- save and reload


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_writes_the_checkpoint_contract(bf16_checkpoints, mxfp4_checkpoints, family):
    folder = mxfp4_checkpoints[family]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "qwantize_mxfp4",
        "format_version": 1,
        "block_size": 32,
        "scale_method": "mse",
        "modules_to_not_convert": ["lm_head"],
        "quantize_lm_head": False,
        "base_model": None,
        # the default's data-free statistics: token ids drawn from the vocabulary, never a text; sequences of
        # 1024 tokens cut to the tiny model's context (max_position_embeddings 128), the budget kept
        "calibration": {"dataset": "random-tokens", "seed": 0, "vocab_size": 256, "calibration_tokens": 32768,
                        "calibration_seq_len": 128, "calibrated": True},  # fmt: skip
        "algorithm": "rtn",
        "gptq": None,
        "quantizer": WRITER,  # the package a reader needs
    }
    reference = AutoModelForCausalLM.from_pretrained(bf16_checkpoints[family])
    statistics = random_token_statistics(bf16_checkpoints[family], torch.bfloat16)
    with safe_open(folder / "model.safetensors", "pt") as stored:
        keys = set(stored.keys())
        for name, module in linear_names(reference).items():
            if name == "lm_head":
                assert stored.get_tensor("lm_head.weight").dtype == torch.bfloat16
                continue
            packed, scales = quantize_mxfp4(module.weight.data, name=name, weights=statistics[name])
            assert torch.equal(stored.get_tensor(f"{name}.weight"), packed), name
            assert torch.equal(stored.get_tensor(f"{name}.weight_scale"), scales), name
            if module.bias is not None:
                assert torch.equal(stored.get_tensor(f"{name}.bias"), module.bias.data)
    assert keys == set(AutoModelForCausalLM.from_pretrained(folder).state_dict())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reload_is_bit_identical_without_requantizing(bf16_checkpoints, mxfp4_checkpoints, family, monkeypatch):
    model = load_quantized(bf16_checkpoints[family])

    def refuse(*args, **kwargs):
        raise AssertionError("a stored MXFP4 checkpoint must load without quantizing again")

    monkeypatch.setattr("qwantize_hf.replace.quantize_mxfp4", refuse)
    reloaded = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoints[family])
    assert reloaded.is_quantized and isinstance(reloaded.hf_quantizer, MXFP4HfQuantizer)
    assert_same_tensors(model.state_dict(), reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, reloaded(input_ids()).logits)


def test_dequantize_at_load_gives_a_plain_model(mxfp4_checkpoints, tmp_path):
    quantized = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoints["llama"])
    with pytest.warns(UserWarning, match="dequantize"):
        plain = AutoModelForCausalLM.from_pretrained(
            mxfp4_checkpoints["llama"], quantization_config=MXFP4Config(dequantize=True)
        )
    assert not any(isinstance(m, MXFP4Linear) for m in plain.modules())
    assert not getattr(plain, "is_quantized", False)
    assert getattr(plain.config, "quantization_config", None) is None
    up = plain.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.bfloat16
    assert torch.equal(up.weight, quantized.model.layers[0].mlp.up_proj.dequantized_weight())
    with torch.no_grad():
        assert torch.equal(plain(input_ids()).logits, quantized(input_ids()).logits)
    plain.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_at_load_follows_the_load_dtype(mxfp4_checkpoints, dtype):
    plain = AutoModelForCausalLM.from_pretrained(
        mxfp4_checkpoints["llama"], quantization_config=MXFP4Config(dequantize=True), dtype=dtype
    )
    up = plain.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == dtype
    with torch.no_grad():
        assert plain(input_ids()).logits.dtype == dtype


def test_checkpoint_missing_scales_fails_naming_the_tensor(mxfp4_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    source = mxfp4_checkpoints["llama"]
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"lacks 1 tensor\(s\).*model\.layers\.0\.mlp\.up_proj\.weight_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # the same when that layer is offloaded to disk (its tensors live in accelerate's weights map)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    with pytest.raises(RuntimeError, match=r"lacks 1 tensor\(s\).*model\.layers\.0\.mlp\.up_proj\.weight_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "offload")


def test_model_dequantize_method(bf16_checkpoints):
    model = load_quantized(bf16_checkpoints["qwen2"])
    with torch.no_grad():
        before = model(input_ids()).logits
    model.dequantize()
    assert not any(isinstance(m, MXFP4Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, before)


# --------------------------------------------------------------------------- device maps


def test_device_map_cpu_and_auto(mxfp4_checkpoints, bf16_checkpoints):
    with torch.no_grad():
        expected = load_quantized(bf16_checkpoints["llama"])(input_ids()).logits
        for source, kwargs in [
            (bf16_checkpoints["llama"], {"quantization_config": MXFP4Config()}),
            (mxfp4_checkpoints["llama"], {}),
        ]:
            for device_map in ("cpu", "auto"):
                model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, **kwargs)
                # "auto" means the GPU where there is one, the CPU elsewhere
                on_gpu = device_map == "auto" and torch.cuda.is_available()
                assert model.model.layers[0].mlp.up_proj.weight.device.type == ("cuda" if on_gpu else "cpu")
                logits = model(input_ids().to(model.device)).logits
                if on_gpu:  # other kernels, other summation order: the same model within bf16 rounding
                    torch.testing.assert_close(logits.float().cpu(), expected.float(), rtol=2e-2, atol=2e-2)
                else:
                    assert torch.equal(logits, expected), (source, device_map)


def test_stored_checkpoint_split_between_cpu_and_disk(mxfp4_checkpoints, bf16_checkpoints, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(
        mxfp4_checkpoints["llama"], device_map=device_map, offload_folder=tmp_path
    )
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # read from disk at forward time
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoints["llama"])(input_ids()).logits
        assert torch.equal(model(input_ids()).logits, expected)


def test_stored_checkpoint_max_memory_split(mxfp4_checkpoints, tmp_path):
    full = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoints["llama"])
    budget = full.get_memory_footprint() * 9 // 10  # accelerate keeps a reserve: this splits the layers
    model = AutoModelForCausalLM.from_pretrained(
        mxfp4_checkpoints["llama"],
        device_map="auto",
        max_memory={"cpu": budget, "disk": "1GB"},
        offload_folder=tmp_path,
    )
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, full(input_ids()).logits)


def test_meta_placement_is_refused(bf16_checkpoints):
    device_map = {"model.embed_tokens": "cpu", "model.layers": "meta", "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="places some modules on 'meta'"):
        load_quantized(bf16_checkpoints["llama"], device_map=device_map)


def test_quantize_on_load_refuses_disk_offload(bf16_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="cannot offload layers to disk"):
        load_quantized(bf16_checkpoints["llama"], device_map={"": "disk"}, offload_folder=tmp_path)
    with pytest.raises(ValueError, match="cannot offload layers to disk"):
        load_quantized(
            bf16_checkpoints["llama"],
            device_map="auto",
            max_memory={"cpu": 1000, "disk": "1GB"},
            offload_folder=tmp_path,
        )


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_dequantize_refuses_offloaded_layers(mxfp4_checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"dequantize=True\) cannot dequantize layers that device_map offloads"):
        AutoModelForCausalLM.from_pretrained(
            mxfp4_checkpoints["llama"],
            quantization_config=MXFP4Config(dequantize=True),
            device_map={"model": "cpu", "lm_head": "disk"},
            offload_folder=tmp_path,
        )


def test_dequantize_of_an_unquantized_checkpoint_is_refused(bf16_checkpoints):
    with pytest.raises(ValueError, match="this checkpoint is not quantized"):
        AutoModelForCausalLM.from_pretrained(
            bf16_checkpoints["llama"], quantization_config=MXFP4Config(dequantize=True)
        )


# --------------------------------------------------------------------------- MXFP4Linear alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_linear_output_dtype_is_input_dtype(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    module = MXFP4Linear.from_linear(linear)
    x = torch.randn(3, 5, 64, dtype=dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == (3, 5, 48)
    w = dequantize_mxfp4(*quantize_mxfp4(linear.weight.data), dtype=dtype)
    torch.testing.assert_close(y, nn.functional.linear(x, w, linear.bias.to(dtype)), rtol=0, atol=0)


def test_mxfp4_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="in_features 40 is not a multiple of block_size 32"):
        MXFP4Linear(40, 8)
    with pytest.raises(ValueError, match="block_size must be one of"):
        MXFP4Linear(64, 8, block_size=64)


# --------------------------------------------------------------------------- the config object


def test_user_config_object_is_reusable_across_models(bf16_checkpoints, tmp_path):
    config = MXFP4Config()
    first = AutoModelForCausalLM.from_pretrained(bf16_checkpoints["llama"], quantization_config=config)
    source = save_random_model(odd_llama_config(), tmp_path / "odd")
    second = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    assert first.config.quantization_config.modules_to_not_convert == ["lm_head"]
    assert "model.layers.0.mlp.down_proj" in second.config.quantization_config.modules_to_not_convert
    assert config.modules_to_not_convert is None


def test_base_model_recorded_only_for_hub_ids(bf16_checkpoints):
    model = load_quantized(bf16_checkpoints["llama"])
    assert model.config.quantization_config.base_model is None  # a local folder is no Hub id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        assert json.loads(open(f"{folder}/config.json").read())["quantization_config"]["base_model"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_load_on_the_gpu_matches_the_cpu_bytes(bf16_checkpoints, mxfp4_checkpoints):
    # On CUDA the Triton kernel quantizes each weight where it lands; it must write the CPU twin's bytes.
    model = load_quantized(bf16_checkpoints["qwen2"], device_map="cuda")
    cpu_model = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoints["qwen2"])
    up = model.model.layers[0].mlp.up_proj
    assert up.weight.is_cuda and up.weight_scale.is_cuda
    gpu_state, cpu_state = model.state_dict(), cpu_model.state_dict()
    for name, tensor in cpu_state.items():
        assert torch.equal(gpu_state[name].cpu(), tensor), name
    with torch.no_grad():
        logits = model(input_ids().cuda()).logits
    assert logits.dtype == torch.bfloat16 and logits.is_cuda


def test_quantized_model_is_reported_compileable_and_compiles_on_cpu(bf16_checkpoints):
    model = load_quantized(bf16_checkpoints["llama"])
    assert model.hf_quantizer.is_compileable
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=False)(ids).logits
    # bf16 model: inductor fuses the norms and activations differently, so bf16-level agreement
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)
