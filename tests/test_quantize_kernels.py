"""The Triton quantize/dequantize kernels against their torch twins, byte for byte.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py) on CPU
tensors; with one, they run compiled on CUDA tensors. The twin always runs on
the CPU.
"""

from __future__ import annotations

import pytest
import torch

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.constants import E8M0_NAN
from qwantize_hf.format import dequantize_blocks_torch, normalize_mse_weights, quantize_blocks_torch
from qwantize_hf.kernels.dequantize import dequantize_triton
from qwantize_hf.kernels.quantize import quantize_triton
from tests.conftest import KERNEL_DEVICE
from tests.mx_values import adversarial

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
METHODS = ["naive", "even", "mse"]


def random_shape(seed: int, block_size: int) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 9, (1,), generator=gen))
    k = block_size * int(torch.randint(1, 9, (1,), generator=gen))
    return rows, k


def random_weights(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=gen) ** 6 * 2.0 ** float(torch.randint(-40, 40, (1,), generator=gen))
    w[torch.rand(k, generator=gen) < 0.1] = 0.0  # unused features
    return w


def assert_same_quantization(x: torch.Tensor, block_size: int, method: str, weights=None, **launch):
    expected = quantize_blocks_torch(x, block_size, method, weights)
    got = quantize_triton(
        x.to(KERNEL_DEVICE), block_size, method, None if weights is None else weights.to(KERNEL_DEVICE), **launch
    )
    assert torch.equal(got[1].cpu(), expected[1]), "scale bytes differ"
    assert torch.equal(got[0].cpu(), expected[0]), "packed codes differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 16])
@pytest.mark.parametrize("method", METHODS)
def test_quantize_kernel_matches_twin(method, block_size, dtype):
    for seed in range(3):
        rows, k = random_shape(100 * seed + block_size, block_size)
        x = adversarial(rows, k, block_size, dtype, seed=seed)
        assert_same_quantization(x, block_size, method, blocks_per_prog=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 16])
def test_weighted_mse_kernel_matches_twin(block_size, dtype):
    for seed in range(3):
        rows, k = random_shape(7 + seed, block_size)
        x = adversarial(rows, k, block_size, dtype, seed=10 + seed)
        weights = normalize_mse_weights(random_weights(k, seed), k, torch.device("cpu"))
        assert_same_quantization(x, block_size, "mse", weights, blocks_per_prog=8)


@pytest.mark.parametrize("method", METHODS)
def test_default_launch_and_partial_last_program(method):
    # 3 × 37 blocks: not a multiple of the default blocks per program
    x = adversarial(3, 37 * 32, 32, torch.bfloat16, seed=21)
    assert_same_quantization(x, 32, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN blocks' arithmetic
def test_nonfinite_blocks_get_byte_255_from_the_kernel(method):
    x = torch.randn(4, 96)
    x[0, 5], x[2, 70], x[3, 33] = float("nan"), float("inf"), float("-inf")
    assert_same_quantization(x, 32, method, blocks_per_prog=4)
    _, scales = quantize_triton(x.to(KERNEL_DEVICE), 32, method, blocks_per_prog=4)
    assert (scales.cpu() == E8M0_NAN).nonzero().tolist() == [[0, 0], [2, 2], [3, 1]]


def test_public_api_triton_backend_and_leading_dims():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    for method in METHODS:
        ref = quantize_mxfp4(x, scale_method=method, backend="torch")
        got = quantize_mxfp4(x.to(KERNEL_DEVICE), scale_method=method, backend="triton")
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_mxfp4(torch.full((1, 32), float("nan"), device=KERNEL_DEVICE), backend="triton")


def test_empty_tensor():
    packed, scales = quantize_triton(torch.empty(0, 64, device=KERNEL_DEVICE), 32, "mse")
    assert packed.shape == (0, 32) and scales.shape == (0, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 16])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 6·2**127 → inf, as in the twin
def test_dequantize_kernel_matches_twin(block_size, dtype):
    # every byte value in every nibble position, under every interesting scale byte
    scale_bytes = torch.tensor([0, 1, 2, 100, 126, 127, 128, 200, 252, 253, 254, E8M0_NAN], dtype=torch.uint8)
    packed = torch.arange(256, dtype=torch.uint8).reshape(1, 256).repeat(len(scale_bytes), 1)
    packed = packed.reshape(len(scale_bytes), -1, block_size // 2).flatten(0, 1)
    scales = scale_bytes.repeat_interleave(256 // (block_size // 2)).reshape(-1, 1)
    expected = dequantize_blocks_torch(packed, scales, block_size, dtype)
    got = dequantize_triton(packed.to(KERNEL_DEVICE), scales.to(KERNEL_DEVICE), block_size, dtype, blocks_per_prog=16)
    got = got.cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.uint8), expected[~nan].view(torch.uint8))


def test_dequantize_round_trip_through_api():
    x = adversarial(5, 160, 32, torch.float32, seed=30)
    packed, scales = quantize_mxfp4(x.to(KERNEL_DEVICE), backend="triton")
    got = dequantize_mxfp4(packed, scales, dtype=torch.float32, backend="triton").cpu()
    ref = dequantize_mxfp4(packed.cpu(), scales.cpu(), dtype=torch.float32, backend="torch")
    assert torch.equal(got, ref)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from qwantize_hf.ops import resolve_backend

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))
    assert resolve_backend("auto", torch.zeros(1)) == "torch"
