"""GPT-2's Conv1D (weight stored [in, out], y = x @ W + b) quantized like a Linear, by every method.

The specification: each Conv1D becomes the nn.Linear of its transposed weight, quantized with the
library's own ``quantize_mxfp4`` / ``dequantize_mxfp4`` (a fake-quant reference); the quantized model's
logits equal that reference's. The MXFP4 tensors are the Linear layout ([out, in/2], [out, in/32]).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.pytorch_utils import Conv1D

from qwantize_hf import MXFP4Config, MXFP4Linear, dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.coverage import coverage
from tests.test_calibrated_plugin import request
from tests.tiny_models import assert_same_tensors, input_ids, save_random_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    return save_random_model(config, tmp_path_factory.mktemp("gpt2"))


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=MXFP4Config(**kwargs), dtype=torch.bfloat16, device_map=DEVICE
    )


def conv1d_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is Conv1D]


def fake_quant_reference(folder, names: list[str], bytes_of) -> nn.Module:
    """The float model with each Conv1D replaced by the nn.Linear of its transposed weight, dequantized from
    ``bytes_of(name, weight [out, in])``."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=DEVICE)
    for name in names:
        conv = model.get_submodule(name)
        weight = conv.weight.detach().t()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True, dtype=torch.bfloat16, device=weight.device)
        packed, scales = bytes_of(name, weight)
        linear.weight.data = dequantize_mxfp4(packed, scales, dtype=torch.bfloat16)
        linear.bias.data = conv.bias.detach().clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def test_every_conv1d_becomes_mxfp4_and_the_logits_equal_the_fake_quant_reference(gpt2):
    model = load(gpt2, calibration=None)
    float_names = conv1d_names(AutoModelForCausalLM.from_pretrained(gpt2))
    assert len(float_names) == 8 and conv1d_names(model) == []
    for name in float_names:
        module = model.get_submodule(name)
        assert isinstance(module, MXFP4Linear) and module.weight.dtype == torch.uint8
    c_attn = model.transformer.h[0].attn.c_attn
    assert (c_attn.out_features, c_attn.in_features) == (192, 64) and tuple(c_attn.weight.shape) == (192, 32)
    report = coverage(model, model.config.quantization_config.modules_to_not_convert, 32)
    assert report.share() >= 0.95 and report.skipped == []
    reference = fake_quant_reference(gpt2, float_names, lambda name, weight: quantize_mxfp4(weight, name=name))
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"scale_method": "mse", "calibration": "text"}, {"algorithm": "gptq", "calibration": "text"}],
    ids=["default-random-tokens", "mse-act", "gptq"],
)
def test_every_method_quantizes_conv1d_and_save_reload_is_bit_identical(gpt2, tmp_path, kwargs):
    if kwargs.get("calibration") == "text":
        kwargs = {**kwargs, "calibration": request()}
    model = load(gpt2, **kwargs)
    assert conv1d_names(model) == []
    assert sum(isinstance(m, MXFP4Linear) for m in model.modules()) == 8
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=DEVICE)
    assert_same_tensors(model.state_dict(), reloaded.state_dict())
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    out = reloaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_a_calibrated_conv1d_uses_its_transposed_weight(gpt2):
    # mse-act on a Conv1D must weight the columns of the [out, in] weight (its inputs), not of the stored [in, out]
    model = load(gpt2, scale_method="mse", calibration=request())
    float_model = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.bfloat16)
    conv = float_model.transformer.h[1].mlp.c_proj  # [256, 64]: in 256, out 64
    assert tuple(conv.weight.shape) == (256, 64)
    layer = model.transformer.h[1].mlp.c_proj
    assert (layer.out_features, layer.in_features) == (64, 256)
    dequantized = dequantize_mxfp4(layer.weight, layer.weight_scale, dtype=torch.float32).cpu()
    # the quantized weight is close to the transposed float weight (MXFP4's error), far from anything else
    error = (dequantized - conv.weight.detach().float().t()).norm() / conv.weight.detach().float().norm()
    assert error < 0.2
