"""Backward through ``mxfp4_linear``: the input's and the bias's gradients, the weight frozen.

The specification is autograd through the torch twin, ``F.linear(x, dequantize_mxfp4(...), bias)``:
the op's gradients must equal it. CPU here; the same tests run on CUDA when there is one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config, dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.linear_op import mxfp4_linear
from tests.tiny_models import FAMILIES, input_ids, save_random_model

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def reference_grads(x, packed, scales, bias, grad):
    x = x.detach().clone().requires_grad_(True)
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    weight = dequantize_mxfp4(packed, scales, dtype=x.dtype)
    if packed.ndim > 2:
        out = torch.matmul(x, weight.transpose(-1, -2)) + (0 if bias is None else bias[..., None, :])
    else:
        out = F.linear(x, weight, bias)
    out.backward(grad)
    return x.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (1, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_input_and_bias_gradients_equal_the_dequantized_reference(device, dtype, shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 64, generator=generator)
    weight[0, :32] = 0  # an all-zero block
    packed, scales = (t.to(device) for t in quantize_mxfp4(weight))
    x = torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_(True)
    bias = torch.randn(40, generator=generator).to(device, dtype).requires_grad_(True) if with_bias else None
    out = mxfp4_linear(x, packed, scales, bias)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    out.backward(grad)
    expected_x, expected_bias = reference_grads(x, packed, scales, bias, grad)
    torch.testing.assert_close(x.grad, expected_x)
    if with_bias:
        torch.testing.assert_close(bias.grad, expected_bias)
    assert packed.grad is None and scales.grad is None


def test_a_stack_of_weights_gives_each_matrix_of_rows_its_own_gradient():
    generator = torch.Generator().manual_seed(1)
    packed, scales = quantize_mxfp4(torch.randn(3, 24, 32, generator=generator))
    x = torch.randn(3, 4, 32, generator=generator, requires_grad=True)
    bias = torch.randn(3, 24, generator=generator, requires_grad=True)
    out = mxfp4_linear(x, packed, scales, bias)
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    expected_x, expected_bias = reference_grads(x, packed, scales, bias, grad)
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(bias.grad, expected_bias)


def test_codes_and_scales_cannot_ask_for_a_gradient():
    packed, _ = quantize_mxfp4(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="floating point"):
        packed.requires_grad_(True)


def test_backward_under_torch_compile_matches_eager():
    generator = torch.Generator().manual_seed(2)
    packed, scales = quantize_mxfp4(torch.randn(16, 64, generator=generator))

    def loss(x):
        return mxfp4_linear(x, packed, scales).square().sum()

    x = torch.randn(4, 64, generator=generator, requires_grad=True)
    loss(x).backward()
    compiled_x = x.detach().clone().requires_grad_(True)
    torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled_x).backward()
    torch.testing.assert_close(compiled_x.grad, x.grad)


def test_a_quantized_model_backpropagates_with_gradient_checkpointing(tmp_path):
    """The input embeddings' gradient through a whole MXFP4 model, with checkpointing, equals the one
    through the same model dequantized to nn.Linear (transformers' own backward)."""
    source = save_random_model(FAMILIES["llama"](), tmp_path / "bf16")
    quantized = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, quantization_config=MXFP4Config(calibration=None)
    )
    quantized.save_pretrained(tmp_path / "mxfp4")
    dequantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "mxfp4", dtype=torch.float32, quantization_config=MXFP4Config(dequantize=True)
    )
    ids = input_ids()
    grads = []
    for model in (quantized, dequantized):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        grads.append(embeds.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
