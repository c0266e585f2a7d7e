"""Calibrated MXFP4 scales for fused experts, per expert, from the tokens routed to it
(qwantize_hf.expert_calibration).

The statistics are checked against what transformers' own eager experts loop feeds each expert's
products (its ``F.linear`` calls, watched); the loaded model against the same functions run on a float
model over the same calibration sequences; the fallback and GPTQ's error feedback on hand-made routing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config, dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.calibration import calibration_inputs, run_sequences
from qwantize_hf.expert_calibration import (
    RoutedInputs,
    RoutedMeanSquares,
    quantize_routed_gptq,
    quantize_routed_rtn,
    routed_inputs,
)
from qwantize_hf.experts import expert_weight, float_product, gated, is_mxfp4_experts
from qwantize_hf.gptq import gptq_quantize
from tests.test_calibrated_plugin import request
from tests.test_experts import FAMILIES, experts_modules
from tests.tiny_models import input_ids, save_random_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {family: save_random_model(FAMILIES[family](), tmp_path_factory.mktemp(family)) for family in FAMILIES}


def float_model(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, **{"dtype": torch.bfloat16, "device_map": DEVICE, **kwargs})


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_mean_squares_are_those_of_the_inputs_the_eager_loop_gives_each_expert(checkpoints, family, monkeypatch):
    model = float_model(checkpoints[family], experts_implementation="eager")
    modules = experts_modules(model)
    seen: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    linear = torch.nn.functional.linear

    def watching(x, weight, bias=None):
        for name, module in modules.items():
            for projection in ("gate_up_proj", "down_proj"):
                base = getattr(module, projection)
                offset = weight.data_ptr() - base.data_ptr()
                if weight.shape == base.shape[1:] and 0 <= offset < base.numel() * base.element_size():
                    expert = offset // (weight.numel() * weight.element_size())
                    seen.setdefault((name, projection, expert), []).append(x.detach().float())
        return linear(x, weight, bias)

    ids = input_ids(batch=4, length=32).to(DEVICE)
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.nn.functional, "linear", watching)
        model(ids)
    with routed_inputs(model, modules, RoutedMeanSquares) as records, torch.no_grad():  # its own F.linear calls
        model(ids)
    assert {key[2] for key in seen} == set(range(4))  # every expert got tokens in this run
    for (name, projection, expert), inputs in seen.items():
        x = torch.cat(inputs)
        assert int(records[name].counts[expert]) == x.shape[0]
        expected = x.double().square().mean(dim=0).float()
        got = records[name].mean_squares(projection, expert).to(expected.device)
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-6)  # bf16 products, summed apart


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_calibrated_load_quantizes_each_expert_with_its_own_statistics(checkpoints, family):
    calibration = request()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints[family], dtype=torch.bfloat16, device_map=DEVICE,
        quantization_config=MXFP4Config(scale_method="mse", calibration=calibration),
    )  # fmt: skip
    reference = float_model(checkpoints[family])
    modules = experts_modules(reference)
    sequences, _ = calibration_inputs(request(), reference)
    with routed_inputs(reference, modules, RoutedMeanSquares) as records:
        run_sequences(reference, sequences, progress=False)
    routed = 0
    for name, module in modules.items():
        expected, count = quantize_routed_rtn(module, records[name], block_size=32, name=name)
        routed += count
        loaded = model.get_submodule(name)
        assert is_mxfp4_experts(loaded)
        for projection, (packed, scales) in expected.items():
            assert torch.equal(getattr(loaded, projection).cpu(), packed.cpu())
            assert torch.equal(getattr(loaded, projection + "_scale").cpu(), scales.cpu())
        plain = quantize_mxfp4(expert_weight(module, "down_proj"), name=name)[1]
        assert not torch.equal(plain.cpu(), expected["down_proj"][1].cpu())  # the statistics changed some scales
    record = model.config.quantization_config.calibration
    assert record["experts"] == 8 and record["experts_with_calibration_tokens"] == routed > 0
    with torch.no_grad():
        model(input_ids().to(DEVICE))


def hand_routed(module: nn.Module, tokens: int, missing: int, seed: int = 0):
    """Hidden states [T, H] and a top-2 routing that never picks expert ``missing``."""
    generator = torch.Generator().manual_seed(seed)
    experts, hidden = module.gate_up_proj.shape[0], 64
    others = torch.tensor([e for e in range(experts) if e != missing])
    index = torch.stack([others[torch.randperm(len(others), generator=generator)[:2]] for _ in range(tokens)])
    states = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    states[:, :8] *= 8  # a few large features, as real activations have: the statistics matter
    return states, index


def test_an_expert_that_gets_no_token_falls_back_to_data_free_mse(checkpoints):
    module = experts_modules(float_model(checkpoints["qwen3_moe"], device_map="cpu"))["model.layers.0.mlp.experts"]
    states, index = hand_routed(module, tokens=200, missing=3)
    record = RoutedMeanSquares()
    record.add(module, states, index)
    quantized, routed = quantize_routed_rtn(module, record, block_size=32, name="experts")
    assert routed == 3
    for projection, (packed, scales) in quantized.items():
        plain = quantize_mxfp4(expert_weight(module, projection, 3), name="expert 3")
        assert torch.equal(packed[3], plain[0]) and torch.equal(scales[3], plain[1])
        weights = record.mean_squares(projection, 0)
        weighted = quantize_mxfp4(expert_weight(module, projection, 0), weights=weights, name="expert 0")
        assert torch.equal(packed[0], weighted[0]) and torch.equal(scales[0], weighted[1])
    assert record.mean_squares("gate_up_proj", 3) is None


def expert_outputs(module: nn.Module, expert: int, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        gate_up = float_product(module, "gate_up_proj", expert, tokens)
        return float_product(module, "down_proj", expert, gated(module, gate_up)).float()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gptq_per_expert_uses_the_routed_tokens_and_beats_round_to_nearest(checkpoints, family):
    module = experts_modules(float_model(checkpoints[family], device_map="cpu"))["model.layers.0.mlp.experts"]
    states, index = hand_routed(module, tokens=400, missing=2)
    float_out = {e: expert_outputs(module, e, states[(index == e).any(-1)]) for e in (0, 1, 3)}
    first = expert_weight(module, "gate_up_proj", 0).clone()
    x = states[(index == 0).any(-1)].float()
    expected = gptq_quantize(first, x.T @ x / x.shape[0], block_size=32, act_order=True, name="check")
    rtn = {p: quantize_mxfp4(expert_weight(module, p), name=p) for p in ("gate_up_proj", "down_proj")}
    record = RoutedInputs()
    record.add(module, states, index)
    quantized, routed = quantize_routed_gptq(module, record, block_size=32, name="experts", act_order=True)
    assert routed == 3
    assert torch.equal(quantized["gate_up_proj"][0][0], expected[0])
    assert torch.equal(quantized["gate_up_proj"][1][0], expected[1])
    for projection, (packed, scales) in quantized.items():  # the module holds the dequantized values
        held = expert_weight(module, projection)
        assert torch.equal(held, dequantize_mxfp4(packed, scales, dtype=held.dtype))
        assert torch.equal(packed[2], rtn[projection][0][2])  # no tokens: the scale method alone
    gptq_error = sum((expert_outputs(module, e, states[(index == e).any(-1)]) - out).square().sum() for e, out in
                     float_out.items())  # fmt: skip
    for projection, (packed, scales) in rtn.items():
        held = expert_weight(module, projection)
        with torch.no_grad():
            held.copy_(dequantize_mxfp4(packed, scales, dtype=held.dtype))
    rtn_error = sum((expert_outputs(module, e, states[(index == e).any(-1)]) - out).square().sum() for e, out in
                    float_out.items())  # fmt: skip
    assert gptq_error < 0.8 * rtn_error


def test_a_gptq_load_quantizes_the_experts_and_records_how_many_had_tokens(checkpoints, tmp_path):
    config = MXFP4Config(algorithm="gptq", calibration=request(), gptq={"end_to_end_norms": False})
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints["qwen3_moe"], dtype=torch.bfloat16, device_map=DEVICE, quantization_config=config
    )
    assert all(is_mxfp4_experts(m) for m in experts_modules(model).values())
    record = model.config.quantization_config.calibration
    assert record["experts"] == 8 and 0 < record["experts_with_calibration_tokens"] <= 8
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=DEVICE)
    assert reloaded.config.quantization_config.calibration["experts_with_calibration_tokens"] == (
        record["experts_with_calibration_tokens"]
    )
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_offloaded_experts_calibrate_to_the_same_bytes(checkpoints, tmp_path):
    """A layer on disk (accelerate's hooks hold its float experts in a weights map, the module meta tensors):
    its experts are calibrated from there, their bytes kept in the map, and all equals the load on one device."""
    config = MXFP4Config(scale_method="mse", calibration=request())
    on_one_device = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], quantization_config=config)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    offloaded = AutoModelForCausalLM.from_pretrained(
        checkpoints["qwen3_moe"], quantization_config=MXFP4Config(scale_method="mse", calibration=request()),
        device_map=device_map, offload_folder=tmp_path / "offload",
    )  # fmt: skip
    experts = offloaded.model.layers[1].mlp.experts
    assert is_mxfp4_experts(experts) and experts.gate_up_proj.device.type == "meta"
    assert experts.gate_up_proj.dtype == torch.uint8
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids()).logits, on_one_device(input_ids()).logits)
    offloaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    for key, value in on_one_device.state_dict().items():
        assert torch.equal(reloaded[key], value), key
