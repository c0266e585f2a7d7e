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
from qwantize_hf.format import dequantize_blocks_torch, max_scale_byte, normalize_mse_weights, quantize_blocks_torch
from qwantize_hf.kernels.dequantize import dequantize_triton
from qwantize_hf.kernels.quantize import quantize_triton
from qwantize_hf.ops import dequantize_blocks_lut
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
    from qwantize_hf.backend import resolve_backend

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))
    assert resolve_backend("auto", torch.zeros(1)) == "torch"


# --------------------------------------------------------------------------- the half search's edges
#
# For bf16/fp16 input the mse search rounds in float16 (quantize_triton's half_search).
# These blocks put every representable a = |x| / s_min of the input dtype from 2**-3 to
# 16 (every tie of every candidate grid, a just above 0.25, a just below 16 and the
# saturation above 6·2**J among them) under a block max that fixes s_min.


def every_a_value(dtype: torch.dtype) -> torch.Tensor:
    """Every value of ``dtype`` in [2**-3, 16): all a the half search sees near its edges (float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    steps = torch.arange(2**mant, dtype=torch.float64) / 2**mant
    return torch.cat([(1 + steps) * 2.0**exponent for exponent in range(-3, 4)])


def half_search_blocks(dtype: torch.dtype, s_min_exponent: int, seed: int) -> torch.Tensor:
    """Blocks of 32: a block max with a in [8, 16) (so s_min = 2**s_min_exponent) then 31 a
    values taken in turn from every_a_value, shuffled, with random signs; ``[rows, 32 * 8]``."""
    gen = torch.Generator().manual_seed(seed)
    values = every_a_value(dtype)
    values = values[torch.randperm(len(values), generator=gen)]
    n_blocks = -(-len(values) // 31)
    n_blocks += -n_blocks % 8  # whole rows of 8 blocks
    fill = values[torch.randint(0, len(values), (n_blocks * 31 - len(values),), generator=gen)]
    body = torch.cat([values, fill]).reshape(n_blocks, 31)
    top = 8.0 + 8.0 * torch.rand(n_blocks, 1, generator=gen, dtype=torch.float64)
    # In some blocks the smallest scale wins: max a = 8 (saturated to 6 on that grid),
    # half the rest just above 0.5 (on its grid; ties to 0 on the next), the others below 7.
    small = torch.rand(n_blocks, generator=gen) < 0.3
    body[small, :16] = 0.5 + body[small, :16] % 0.0625
    body[small, 16:] = body[small, 16:] % 7
    top[small] = 8.0
    blocks = torch.cat([top, body], dim=1)
    signs = torch.where(torch.rand(blocks.shape, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (blocks * signs * 2.0**s_min_exponent).to(dtype)
    return x.reshape(n_blocks // 8, 8 * 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_search_matches_twin_on_every_a(dtype):
    exponents = [-100, 0, 100] if dtype == torch.bfloat16 else [-8, 0, 8]
    chosen_seen = set()
    for i, exponent in enumerate(exponents):
        x = half_search_blocks(dtype, exponent, seed=40 + i)
        assert_same_quantization(x, 32, "mse", blocks_per_prog=32, num_warps=1, half_search=True)
        # the twin's choice relative to s_min: every candidate grid must be exercised
        _, scales = quantize_blocks_torch(x, 32, "mse")
        chosen_seen |= set((scales.to(torch.int32) - (exponent + 127)).unique().tolist())
    assert chosen_seen == {0, 1, 2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_search_weighted_matches_twin_on_every_a(dtype):
    x = half_search_blocks(dtype, 0, seed=50)
    weights = normalize_mse_weights(random_weights(x.shape[-1], 51), x.shape[-1], torch.device("cpu"))
    assert_same_quantization(x, 32, "mse", weights, blocks_per_prog=32, num_warps=1, half_search=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [32, 16])
def test_half_search_on_and_off_give_the_same_bytes(dtype, block_size):
    # the A/B switch of the benchmark: both paths equal the twin on the adversarial blocks
    x = adversarial(6, 8 * block_size, block_size, dtype, seed=60)
    for half_search in (True, False):
        assert_same_quantization(x, block_size, "mse", blocks_per_prog=32, num_warps=1, half_search=half_search)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_half_search_nonfinite_and_tiny_blocks(dtype):
    x = torch.randn(4, 128).to(dtype)
    x[0, 5], x[1, 40], x[2, 100] = float("nan"), float("inf"), float("-inf")
    x[3, :32] = x[3, :32] * torch.finfo(dtype).tiny / 64  # subnormal block: e0 = 0 for bf16
    x[3, 32:64] = torch.finfo(dtype).max * torch.linspace(-1, 1, 32).to(dtype)  # near the dtype's max
    assert_same_quantization(x, 32, "mse", blocks_per_prog=32, num_warps=1, half_search=True)


def test_half_search_refuses_a_launch_that_splits_blocks_over_threads():
    x = torch.zeros(4, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="blocks_per_prog >= 32 \\* num_warps"):
        quantize_triton(x, 32, "mse", blocks_per_prog=8, num_warps=2, half_search=True)
    # left to choose, such a launch takes the float32 search (same bytes)
    assert_same_quantization(x.cpu(), 32, "mse", blocks_per_prog=8, num_warps=2)


def test_half_search_refuses_float32():
    with pytest.raises(ValueError, match="half_search"):
        quantize_triton(torch.zeros(1, 32, device=KERNEL_DEVICE), 32, "mse", half_search=True)


def test_inline_ptx_only_on_new_enough_gpus(monkeypatch):
    """PTX that needs sm_80 (the packed search) or sm_90 (the one-row matmul's bf16x2 multiply)
    is used only on GPUs that new: older ones run the plain-op versions instead of failing to build."""
    import qwantize_hf.backend as backend
    from qwantize_hf.kernels.quantize import half_search_runs_on

    def gpu_of(capability):
        return lambda device: capability if device.type == "cuda" else (0, 0)

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backend, "device_capability", gpu_of((8, 6)))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("QWANTIZE_HF_NO_INLINE_PTX", raising=False)
    assert backend.inline_ptx_allowed(cuda, (8, 0))
    assert not backend.inline_ptx_allowed(cuda, (9, 0))
    assert not backend.inline_ptx_allowed(torch.device("cpu"), (8, 0))
    monkeypatch.setenv("QWANTIZE_HF_NO_INLINE_PTX", "1")
    assert not backend.inline_ptx_allowed(cuda, (8, 0))

    # The quantize kernel reads the switch per launch, as the matmul does.
    monkeypatch.delenv("QWANTIZE_HF_NO_INLINE_PTX")
    assert half_search_runs_on(cuda)
    monkeypatch.setattr(backend, "device_capability", gpu_of((7, 5)))
    assert not half_search_runs_on(cuda)
    monkeypatch.setenv("QWANTIZE_HF_NO_INLINE_PTX", "1")  # plain ops run anywhere
    assert half_search_runs_on(cuda)


def near_max_blocks(dtype: torch.dtype) -> torch.Tensor:
    """Blocks whose amax sits just under the dtype's max, where e0+1 would round it up to infinity."""
    top = torch.finfo(dtype).max
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, 0] = 60000.0 if dtype == torch.float16 else top * 0.9  # mantissa above 1.75: even rounds up
    x[1, :32] = -top
    x[2, 32:] = torch.linspace(-1, 1, 32) * top
    x[3, 40] = top * 0.999
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_no_method_picks_a_scale_that_overflows_the_weights_dtype(method, dtype):
    x = near_max_blocks(dtype)
    packed, scales = quantize_blocks_torch(x, 32, method)
    assert bool(torch.isfinite(dequantize_mxfp4(packed, scales, dtype=dtype)).all())
    assert int(scales.max()) == max_scale_byte(dtype)
    assert_same_quantization(x, 32, method, blocks_per_prog=8)


def test_max_scale_byte_is_the_largest_finite_grid():
    assert max_scale_byte(torch.float16) == 140
    assert max_scale_byte(torch.bfloat16) == max_scale_byte(torch.float32) == 252
    for dtype in DTYPES:
        byte = max_scale_byte(dtype)
        assert 6.0 * 2.0 ** (byte - 127) <= torch.finfo(dtype).max < 6.0 * 2.0 ** (byte + 1 - 127)


def test_max_byte_caps_a_wider_weight_for_a_narrower_dtype():
    x = near_max_blocks(torch.float16).float() * 1.5  # a float32 weight beyond float16's range
    packed, scales = quantize_mxfp4(x, scale_method="mse", backend="torch", max_byte=140)
    assert int(scales.max()) == 140
    assert bool(torch.isfinite(dequantize_mxfp4(packed, scales, dtype=torch.float16)).all())
    for bad in (253, -1, 140.0, True):
        with pytest.raises(ValueError, match="max_byte must be an int"):
            quantize_mxfp4(x, max_byte=bad, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 16])
def test_table_dequantize_gives_the_twins_numbers(block_size, dtype):
    # every byte of codes and of scales, 0 (2**-127), 254 (2**127: 6 * 2**127 overflows) and 255 (NaN)
    generator = torch.Generator().manual_seed(11)
    packed = torch.cat(
        [
            torch.arange(256, dtype=torch.uint8).view(8, 32),
            torch.randint(0, 256, (8, 32), dtype=torch.uint8, generator=generator),
        ]
    )
    scales = torch.arange(256, dtype=torch.uint8)[: 16 * 64 // block_size].view(16, 64 // block_size)
    scales[0, 0], scales[1, 0], scales[2, 0] = 0, 254, 255
    expected = dequantize_blocks_torch(packed, scales, block_size, dtype)
    got = dequantize_blocks_lut(packed, scales, block_size, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), expected.isnan()) and bool(got.isinf().any()) == bool(expected.isinf().any())
