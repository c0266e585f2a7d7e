"""Fused mixture-of-experts weights as MXFP4 (qwantize_hf.experts): tiny Qwen3-MoE and Mixtral from configs.

The specification is a fake-quant reference: the float model (transformers' eager experts loop) with every
expert weight and Linear replaced by ``dequantize_mxfp4(quantize_mxfp4(W))``; the quantized model's logits
equal it. Checkpoints hold each expert's projections in the MXFP4Linear layout, and reload bit for bit.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from qwantize_hf import MXFP4Config, dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.coverage import coverage
from qwantize_hf.experts import IMPLEMENTATION, is_mxfp4_experts
from tests.test_calibrated_plugin import request
from tests.tiny_models import COMMON, assert_same_tensors, input_ids, save_random_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    # experts stored transposed ([E, K, N]) with biases, gated by its own clamped SwiGLU; no per-expert checkpoint
    "gpt_oss": lambda: GptOssConfig(**{**COMMON, "head_dim": 16}, num_local_experts=4, num_experts_per_tok=2),
}
# each expert's first projection in the checkpoint (codes [N, K/2]); GPT-OSS keeps its experts fused
EXPERT_KEYS = {"qwen3_moe": "mlp.experts.0.gate_proj.weight", "mixtral": "block_sparse_moe.experts.0.w1.weight",
               "gpt_oss": "mlp.experts.gate_up_proj"}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {family: save_random_model(make(), tmp_path_factory.mktemp(family)) for family, make in FAMILIES.items()}


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=MXFP4Config(**kwargs), dtype=torch.bfloat16, device_map=DEVICE
    )


def experts_modules(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "is_concatenated")}


def fake_quant_reference(folder) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map=DEVICE, experts_implementation="eager"
    )
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "is_concatenated"):
                for projection in ("gate_up_proj", "down_proj"):
                    weight = getattr(module, projection)
                    weight = weight.transpose(-1, -2) if module.is_transposed else weight  # [E, N, K] (a view)
                    weight.copy_(dequantize_mxfp4(*quantize_mxfp4(weight, name=name), dtype=weight.dtype))
            elif type(module) is nn.Linear and name != "lm_head":
                module.weight.copy_(dequantize_mxfp4(*quantize_mxfp4(module.weight, name=name), dtype=torch.bfloat16))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_experts_become_mxfp4_and_the_logits_equal_the_fake_quant_reference(checkpoints, family):
    model = load(checkpoints[family], calibration=None)
    modules = experts_modules(model)
    assert len(modules) == 2 and all(is_mxfp4_experts(m) for m in modules.values())
    module = next(iter(modules.values()))
    rows = 2 * (64 if family == "qwen3_moe" else 128)  # gate and up of the experts' intermediate size; H = 64
    if family == "gpt_oss":
        assert module.gate_up_proj_bias.dtype == torch.bfloat16  # biases stay float
    assert module.gate_up_proj.dtype == torch.uint8 and tuple(module.gate_up_proj.shape) == (4, rows, 32)
    assert tuple(module.gate_up_proj_scale.shape) == (4, rows, 2)
    assert module.config._experts_implementation == IMPLEMENTATION
    report = coverage(model, model.config.quantization_config.modules_to_not_convert, 32)
    assert report.share() >= 0.95 and report.mxfp4["experts"][0] == 2 and report.skipped == []
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fake_quant_reference(checkpoints[family])(ids).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"scale_method": "mse", "calibration": "text"}, {"algorithm": "gptq", "calibration": "text"}],
    ids=["default-random-tokens", "mse-act", "gptq"],
)
def test_every_method_stores_experts_per_expert_and_reloads_bit_identical(checkpoints, family, kwargs, tmp_path):
    if kwargs.get("calibration") == "text":
        kwargs = {**kwargs, "calibration": request()}
    model = load(checkpoints[family], **kwargs)
    assert all(is_mxfp4_experts(m) for m in experts_modules(model).values())
    model.save_pretrained(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as stored:
        key = f"model.layers.0.{EXPERT_KEYS[family]}"
        codes, scales = stored.get_slice(key), stored.get_slice(f"{key}_scale")
        assert codes.get_dtype() == scales.get_dtype() == "U8"
        assert codes.get_shape()[:-1] == scales.get_shape()[:-1] and codes.get_shape()[-1] == 32  # H / 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=DEVICE)
    assert_same_tensors(model.state_dict(), reloaded.state_dict())
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_dequantize_gives_float_experts_that_run_eagerly(checkpoints, tmp_path):
    model = load(checkpoints["qwen3_moe"], calibration=None)
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    for float_model in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=MXFP4Config(dequantize=True)),
        model.dequantize(),
    ):
        module = float_model.model.layers[0].mlp.experts
        assert module.gate_up_proj.dtype == torch.bfloat16 and not hasattr(module, "gate_up_proj_scale")
        assert module.config._experts_implementation != IMPLEMENTATION
        with torch.no_grad():
            got = float_model.to(DEVICE)(ids).logits
        torch.testing.assert_close(got, expected, atol=0.02, rtol=0.02)  # another experts loop, bf16


def test_experts_in_modules_to_not_convert_stay_float_and_a_checkpoint_without_expert_scales_loads_them_float(
    checkpoints, tmp_path
):
    model = load(checkpoints["qwen3_moe"], calibration=None, modules_to_not_convert=["lm_head", "experts"])
    assert not any(is_mxfp4_experts(m) for m in experts_modules(model).values())
    model.save_pretrained(tmp_path / "q")
    # as a checkpoint written before experts were quantized: no skip entry, no expert scales
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["lm_head"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=DEVICE)
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_a_corrupt_or_missing_expert_scale_does_not_load(checkpoints, tmp_path):
    load(checkpoints["qwen3_moe"], calibration=None).save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.mlp.experts.2.down_proj.weight_scale"
    corrupt = dict(tensors)
    corrupt[key] = corrupt[key].clone()
    corrupt[key][3, 1] = 255
    save_file(corrupt, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj_scale holds 1 scale byte\(s\) 255"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})
    # three experts' scales where four are due: transformers 5.24+ refuses the merged shape (its loading report
    # names the tensor); 5.17 merges them, and the shape check after loading refuses them, naming the tensors
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises((RuntimeError, ValueError)) as raised:
            AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "model.layers.1.mlp.experts.down_proj_scale" in "\n".join([str(raised.value), *records])


def routed(module, tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=generator).to(DEVICE, torch.bfloat16)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, 2, generator=generator).softmax(-1).to(DEVICE, torch.bfloat16)
    return hidden, index, weights


@pytest.fixture(scope="module")
def loaded_experts(checkpoints):
    """Each family's first MXFP4 experts module (loaded once)."""
    return {
        family: next(iter(experts_modules(load(checkpoints[family], calibration=None)).values()))
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
def test_the_routed_calls_and_the_expert_loop_agree_and_each_runs_where_it_should(loaded_experts, family, tokens):
    from qwantize_hf.experts import TWIN_GATHER_PAIRS, _gathered, _looped, experts_forward, gather_pairs

    module = loaded_experts[family]
    hidden, index, weights = routed(module, tokens)
    with torch.no_grad():
        auto = experts_forward(module, hidden, index, weights)
        gathered, looped = _gathered(module, hidden, index, weights), _looped(module, hidden, index, weights)
        # the path the pair count picks, exactly
        limit = gather_pairs(module, hidden)
        expected = gathered if limit is None or index.numel() <= limit else looped
        torch.testing.assert_close(auto, expected, atol=0, rtol=0)
        # one row at a time vs each expert's rows together: the same products, rounded alike up to bf16
        torch.testing.assert_close(gathered, looped, atol=1e-2, rtol=1e-2)
    if not hidden.is_cuda:  # on CUDA, where the kernels fit, every count is routed (routed or grouped kernel)
        assert limit == TWIN_GATHER_PAIRS


def test_a_long_input_runs_in_chunks_and_sentinel_ids_add_nothing(loaded_experts, monkeypatch):
    """The routed calls take GATHER_CHUNK_TOKENS tokens at a time (the same sums as one call), and
    pairs routed to no expert of this module (ids < 0 or >= E, expert-parallel sentinels) add nothing,
    in the routed calls and in the loop alike."""
    from qwantize_hf import experts as ex

    module = loaded_experts["qwen3_moe"]
    hidden, index, weights = routed(module, 7, seed=3)
    with torch.no_grad():
        whole = ex._gathered(module, hidden, index, weights)
        monkeypatch.setattr(ex, "GATHER_CHUNK_TOKENS", 3)
        torch.testing.assert_close(ex._gathered(module, hidden, index, weights), whole, atol=0, rtol=0)
        kept = index.clone()
        index[0, 1], index[4, 0] = -1, module.num_experts
        dropped = weights.clone()
        dropped[0, 1] = dropped[4, 0] = 0
        expected = ex._gathered(module, hidden, kept, dropped)
        torch.testing.assert_close(ex._gathered(module, hidden, index, weights), expected)
        torch.testing.assert_close(ex._looped(module, hidden, index, weights), expected, atol=1e-2, rtol=1e-2)


def test_the_decode_path_compiles_as_one_graph(checkpoints):
    module = load(checkpoints["qwen3_moe"], calibration=None).model.layers[0].mlp.experts
    hidden, index, weights = routed(module, 2, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, index, weights), module(hidden, index, weights), atol=0, rtol=0)


def test_switching_mxfp4_experts_to_another_implementation_is_refused(checkpoints):
    model = load(checkpoints["mixtral"], calibration=None)
    with pytest.raises(
        ValueError, match="experts are MXFP4 and run only as the 'qwantize_mxfp4' experts implementation"
    ):
        model.set_experts_implementation("grouped_mm")
    model.set_experts_implementation(IMPLEMENTATION)  # its own is fine
    model.dequantize()
    model.set_experts_implementation("eager")  # float experts again: any
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "eager"
