"""The torch reference (format.py) against independent statements of the format."""

from __future__ import annotations

import math

import pytest
import torch

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.constants import E8M0_BIAS, E8M0_MAX_QUANTIZE, E8M0_NAN, F4_E2M1_MAX, F4_E2M1_VALUES
from qwantize_hf.format import (
    block_amax_bits,
    choose_mse_byte,
    e2m1_magnitude_index,
    even_scale_bytes,
    max_scale_byte,
    mse_candidate_errors,
    naive_scale_bytes,
    pack_codes,
    unpack_codes,
)
from tests.mx_values import (
    MIDPOINTS,
    adversarial,
    block_sse_f64,
    nearest_e2m1_f64,
    nearest_value_rounding,
    ocp_e0_f64,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def test_rounding_ties_go_to_even_code():
    # DESIGN.md: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4
    ties = torch.tensor(MIDPOINTS)
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    got = torch.tensor(F4_E2M1_VALUES)[e2m1_magnitude_index(ties)]
    assert torch.equal(got, expected)


def test_rounding_matches_exhaustive_nearest_on_a_fine_grid():
    q = torch.arange(0, 9 * 256, dtype=torch.float32) / 256  # 0 .. 9 in steps of 1/256, all ties included
    got = torch.tensor(F4_E2M1_VALUES)[e2m1_magnitude_index(q)].double()
    assert torch.equal(got, nearest_e2m1_f64(q.double()))
    assert got.max() == F4_E2M1_MAX  # saturates


def test_packing_nibble_order():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x8F]]  # element 0 in the low nibble
    assert torch.equal(unpack_codes(packed), codes)
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(every)), every)


def test_quantize_known_block():
    x = torch.tensor([[0.0, 0.5, -1.0, 1.5, 2.0, -3.0, 4.0, 6.0] * 4])
    packed, scales = quantize_mxfp4(x, scale_method="naive", backend="torch")
    assert scales.tolist() == [[E8M0_BIAS]]  # amax 6: floor(log2 6) - 2 = 0
    assert packed[0, :4].tolist() == [0x10, 0x3A, 0xD4, 0x76]
    assert torch.equal(dequantize_mxfp4(packed, scales, dtype=torch.float32), x)


def test_negative_value_rounding_to_zero_keeps_sign():
    x = torch.tensor([[-0.1, 0.1, -0.0, 0.0] + [4.0] * 28])
    packed, _ = quantize_mxfp4(x, scale_method="naive", backend="torch")
    codes = unpack_codes(packed)[0, :4].tolist()
    assert codes == [8, 0, 8, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 16])
def test_naive_is_the_ocp_rule(dtype, block_size):
    x = adversarial(16, 4 * block_size, block_size, dtype, seed=1)
    _, scales = quantize_mxfp4(x, block_size=block_size, scale_method="naive", backend="torch")
    amax = x.double().reshape(-1, block_size).abs().amax(-1)
    expected = [ocp_e0_f64(float(a)) for a in amax]
    assert scales.reshape(-1).tolist() == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_even_rule(dtype):
    x = adversarial(16, 128, 32, dtype, seed=2)
    _, scales = quantize_mxfp4(x, scale_method="even", backend="torch")
    expected = []
    for a in x.double().reshape(-1, 32).abs().amax(-1).tolist():
        e0 = ocp_e0_f64(a)
        mantissa = a / 2.0 ** math.floor(math.log2(a)) if a > 0 else 0.0
        bump = 1 if mantissa >= 1.75 and a >= 2.0**-126 else 0  # float32 subnormal amax keeps e0 = 0
        expected.append(min(e0 + bump, max_scale_byte(dtype)))  # float16: never a grid past its max
    assert scales.reshape(-1).tolist() == expected


def test_even_bumps_exactly_at_one_point_seven_five():
    x = torch.zeros(3, 32)
    x[0, 0], x[1, 0], x[2, 0] = 1.75, 1.75 - 2**-22, 7.0
    e = even_scale_bytes(block_amax_bits(x, 32))
    e0 = naive_scale_bytes(block_amax_bits(x, 32))
    assert (e - e0).tolist() == [1, 0, 1]


def test_design_counterexample_picks_half_scale():
    # 31 values of 0.25 and one 4.0: best at s0/2, not at s0 or 2·s0
    x = torch.full((1, 32), 0.25)
    x[0, 7] = 4.0
    _, naive = quantize_mxfp4(x, scale_method="naive", backend="torch")
    _, mse = quantize_mxfp4(x, scale_method="mse", backend="torch")
    assert int(mse) == int(naive) - 1


def test_mse_ties_keep_e0():
    # [2.0] * 32: exact under e0 (2/0.5 = 4) and e0+1 (2/1 = 2); both errors 0 → keep e0
    x = torch.full((1, 32), 2.0)
    _, naive = quantize_mxfp4(x, scale_method="naive", backend="torch")
    _, mse = quantize_mxfp4(x, scale_method="mse", backend="torch")
    assert int(mse) == int(naive)
    e0 = naive.reshape(-1).int()
    errs = mse_candidate_errors(x, e0, None)
    assert errs[1].item() == errs[2].item() == 0.0


def test_choose_mse_byte_tie_rules():
    e0 = torch.tensor([10, 10, 10, 10, 10])
    minus = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5])
    zero = torch.tensor([1.0, 2.0, 3.0, 3.0, 1.0])
    plus = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0])
    # all equal → e0; plus smallest → up; minus == plus < zero → larger scale; minus smallest → down
    assert choose_mse_byte(e0, minus, zero, plus).tolist() == [10, 11, 11, 9, 9]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 16])
def test_mse_is_a_true_minimum_by_brute_force(dtype, block_size):
    # every exponent e0-4..e0+4, float64 errors: nothing beats the chosen byte. Bytes above
    # max_scale_byte(dtype) are out: their grid reaches past the dtype's max (it would dequantize to inf).
    x = adversarial(8, 8 * block_size, block_size, dtype, seed=3)
    _, scales = quantize_mxfp4(x, block_size=block_size, scale_method="mse", backend="torch")
    blocks = x.double().reshape(-1, block_size)
    for block, e in zip(blocks, scales.reshape(-1).tolist()):
        e0 = ocp_e0_f64(float(block.abs().max()))
        chosen = block_sse_f64(block, e)
        for cand in range(max(0, e0 - 4), min(max_scale_byte(dtype), e0 + 4) + 1):
            other = block_sse_f64(block, cand)
            assert chosen <= other * (1 + 1e-6) + 1e-300, (block.tolist(), e, cand, chosen, other)


def test_mse_weighted_minimum_over_candidates():
    gen = torch.Generator().manual_seed(4)
    x = adversarial(16, 64, 32, torch.float32, seed=5)
    weights = torch.rand(64, generator=gen) ** 4 * 100
    _, scales = quantize_mxfp4(x, scale_method="mse", weights=weights, backend="torch")
    for i, (block, e) in enumerate(zip(x.double().reshape(-1, 32), scales.reshape(-1).tolist())):
        w = weights[(i % 2) * 32 : (i % 2) * 32 + 32].double()
        e0 = ocp_e0_f64(float(block.abs().max()))
        chosen = block_sse_f64(block, e, w)
        for cand in range(max(0, e0 - 1), min(E8M0_MAX_QUANTIZE, e0 + 1) + 1):
            assert chosen <= block_sse_f64(block, cand, w) * (1 + 1e-6) + 1e-300


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_weights_equal_plain_mse(dtype):
    x = adversarial(8, 96, 32, dtype, seed=6)
    plain = quantize_mxfp4(x, scale_method="mse", backend="torch")
    for value in (1.0, 3.0, 1e-30, 7e20):
        weighted = quantize_mxfp4(x, scale_method="mse", weights=torch.full((96,), value), backend="torch")
        assert torch.equal(plain[0], weighted[0]) and torch.equal(plain[1], weighted[1])


def test_weights_move_the_choice():
    # the counterexample block prefers s0/2; weighting only the 4.0 element makes e0 best
    x = torch.full((1, 32), 0.25)
    x[0, 0] = 4.0
    weights = torch.zeros(32)
    weights[0] = 1.0
    _, naive = quantize_mxfp4(x, scale_method="naive", backend="torch")
    _, weighted = quantize_mxfp4(x, scale_method="mse", weights=weights, backend="torch")
    assert int(weighted) == int(naive)  # e0 and e0+1 both hold 4.0 exactly; the tie keeps e0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["naive", "even", "mse"])
def test_round_trip_is_nearest_value_rounding(dtype, method):
    x = adversarial(8, 128, 32, dtype, seed=7)
    packed, scales = quantize_mxfp4(x, scale_method=method, backend="torch")
    back = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    assert torch.equal(back, nearest_value_rounding(x, scales, 32))


def test_any_leading_shape():
    x = torch.randn(2, 3, 5, 64, dtype=torch.bfloat16)
    packed, scales = quantize_mxfp4(x, backend="torch")
    assert packed.shape == (2, 3, 5, 32) and scales.shape == (2, 3, 5, 2)
    flat = quantize_mxfp4(x.reshape(-1, 64), backend="torch")
    assert torch.equal(packed.reshape(-1, 32), flat[0]) and torch.equal(scales.reshape(-1, 2), flat[1])
    assert dequantize_mxfp4(packed, scales).shape == x.shape


def test_huge_and_tiny_float32():
    x = torch.zeros(2, 32)
    x[0, :] = torch.finfo(torch.float32).max
    x[1, :] = 2.0**-149  # smallest subnormal
    packed, scales = quantize_mxfp4(x, scale_method="mse", backend="torch")
    assert scales[0, 0] == 252 and scales[1, 0] in (0, 1)
    back = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    assert torch.isfinite(back).all()
    assert (back[0] > 0).all()


def test_dequantize_scale_bytes():
    packed = torch.full((4, 16), 0x72, dtype=torch.uint8)  # codes 2 (1.0) and 7 (6.0)
    scales = torch.tensor([[0], [1], [254], [E8M0_NAN]], dtype=torch.uint8)
    out = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    assert out[0, 0].item() == 2.0**-127 and out[0, 1].item() == 6 * 2.0**-127
    assert out[1, 0].item() == 2.0**-126
    assert out[2, 0].item() == 2.0**127 and math.isinf(out[2, 1].item())  # 6·2**127 overflows float32
    assert torch.isnan(out[3]).all()


# --------------------------------------------------------------------------- bad input


def test_last_dim_not_multiple_of_block():
    with pytest.raises(ValueError, match="not a multiple of block_size 32"):
        quantize_mxfp4(torch.randn(4, 48), backend="torch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        quantize_mxfp4(torch.zeros(4, 32, dtype=dtype), backend="torch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_raises_naming_the_block(bad):
    x = torch.randn(3, 64)
    x[2, 40] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 block\(s\) of 32, first at \[2, 32:64\]"):
        quantize_mxfp4(x, backend="torch", name="model.layers.0.mlp.down_proj.weight")


def test_nonfinite_block_gets_scale_255_and_zero_codes():
    from qwantize_hf.format import quantize_blocks_torch

    x = torch.randn(2, 32)
    x[1, 3] = float("nan")
    for method in ("naive", "even", "mse"):
        packed, scales = quantize_blocks_torch(x, 32, method)
        assert scales[1, 0] == E8M0_NAN and scales[0, 0] != E8M0_NAN
        assert (packed[1] == 0).all()


@pytest.mark.parametrize(
    "weights, match",
    [
        (torch.full((32,), -1.0), "finite and non-negative"),
        (torch.tensor([float("nan")] + [1.0] * 31), "finite and non-negative"),
        (torch.tensor([float("inf")] + [1.0] * 31), "finite and non-negative"),
        (torch.ones(16), r"shape \[32\]"),
        (torch.ones(32, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_mxfp4(torch.randn(2, 32), weights=weights, backend="torch")


def test_weights_need_mse():
    with pytest.raises(ValueError, match="only change the 'mse' search"):
        quantize_mxfp4(torch.randn(2, 32), scale_method="naive", weights=torch.ones(32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 64}, "block_size must be one of"),
        ({"scale_method": "best"}, "scale_method must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_mxfp4(torch.randn(2, 64), **kwargs)


def test_dequantize_bad_shapes():
    packed = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="need scales of shape"):
        dequantize_mxfp4(packed, torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed must be a torch.uint8"):
        dequantize_mxfp4(packed.float(), torch.zeros(4, 1, dtype=torch.uint8))


def test_a_meta_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="meta device"):
        quantize_mxfp4(torch.empty(4, 32, device="meta"))
