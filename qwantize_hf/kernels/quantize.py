"""Triton MXFP4 quantize kernel: bf16/fp16/fp32 in, packed E2M1 codes and UE8M0 bytes out.

Its torch twin is ``qwantize_hf.format.quantize_blocks_torch``; the two must give
the same bytes for every input, so this kernel does the same float32 operations
in the same order (see the ``format`` module docstring) and is launched with
floating-point contraction off (an FMA would round differently). Each program
handles BLOCKS_PER_PROG blocks; it writes packed codes and scale bytes straight
to their outputs, with no float intermediate in global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwantize_hf import constants as C
from qwantize_hf.format import E2M1_F32_CODE_OFFSET, E2M1_F32_CODE_SHIFT, EVEN_ROUNDING_ADD, ROUNDS_TO_ZERO_BELOW

METHOD_IDS = {"naive": 0, "even": 1, "mse": 2}

_MANT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS)
_ABS_MASK: tl.constexpr = tl.constexpr(C.F32_ABS_MASK)
_EXP_FIELD_MASK: tl.constexpr = tl.constexpr(C.F32_EXP_MASK << C.F32_MANTISSA_BITS)
_EXP_NONFINITE: tl.constexpr = tl.constexpr(C.F32_EXP_NONFINITE)
_EMAX: tl.constexpr = tl.constexpr(C.F4_E2M1_EMAX)
_E2M1_MAX: tl.constexpr = tl.constexpr(C.F4_E2M1_MAX)
_E8M0_NAN: tl.constexpr = tl.constexpr(C.E8M0_NAN)
_E8M0_BIAS: tl.constexpr = tl.constexpr(C.E8M0_BIAS)
_E8M0_MAX_QUANTIZE: tl.constexpr = tl.constexpr(C.E8M0_MAX_QUANTIZE)
_EVEN_ADD: tl.constexpr = tl.constexpr(EVEN_ROUNDING_ADD)
_ZERO_BELOW: tl.constexpr = tl.constexpr(ROUNDS_TO_ZERO_BELOW)
_SIGN_TO_CODE_SHIFT: tl.constexpr = tl.constexpr(C.F32_SIGN_SHIFT - 3)  # float sign bit → code bit 3
_CODE_SIGN: tl.constexpr = tl.constexpr(C.F4_E2M1_SIGN_BIT)
_NIBBLE: tl.constexpr = tl.constexpr(C.F4_NIBBLE_BITS)
_BF16_SHIFT: tl.constexpr = tl.constexpr(16)  # bf16 keeps float32's top 16 bits
_BF16_BITS_MASK: tl.constexpr = tl.constexpr(0xFFFF)
# E2M1 rounding by float addition: adding 2**(E + 22) (E = max(exponent of q, 0))
# leaves one mantissa bit of q, rounded to nearest-even by the FPU; min-exponent 0
# gives the 0.5 spacing of E2M1's subnormal range.
_ROUND_SHIFT: tl.constexpr = tl.constexpr((C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS) << C.F32_MANTISSA_BITS)
_ONE_BITS: tl.constexpr = tl.constexpr(C.F32_EXP_BIAS << C.F32_MANTISSA_BITS)
# A rounded magnitude r >= 1 has index (bits(r) >> 22) - 252; r = 0.5 has index 1.
_CODE_SHIFT: tl.constexpr = tl.constexpr(E2M1_F32_CODE_SHIFT)
_HALF_CODE_BASE: tl.constexpr = tl.constexpr(E2M1_F32_CODE_OFFSET)


@triton.jit
def _pow2_neg(e):
    """float32 2**(127 - e) for int32 e in [0, 253]."""
    return ((-(e - 2 * _E8M0_BIAS)) << _MANT).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_round(q):
    """Nearest E2M1 magnitude to q >= 0 (ties to even, saturating), as float32."""
    q_bits = q.to(tl.int32, bitcast=True)
    magic = (tl.maximum(q_bits & _EXP_FIELD_MASK, _ONE_BITS) + _ROUND_SHIFT).to(tl.float32, bitcast=True)
    return tl.minimum((q + magic) - magic, _E2M1_MAX)


@triton.jit
def _e2m1_index(r):
    """Magnitude index 0..7 of an E2M1 magnitude r (as _e2m1_round returns)."""
    r_bits = r.to(tl.int32, bitcast=True)
    index = tl.maximum((r_bits >> _CODE_SHIFT) - _HALF_CODE_BASE, 0)
    return index + (r == 0.5).to(tl.int32)


@triton.jit
def _halve(t, ROWS: tl.constexpr, N: tl.constexpr):
    """[ROWS, N] → [ROWS, N//2]: adds neighbours (0+1, 2+3, ...)."""
    left, right = tl.split(tl.reshape(t, [ROWS, N // 2, 2]))
    return left + right


@triton.jit
def _pairwise_sum(t, ROWS: tl.constexpr, N: tl.constexpr):
    """Row sums of [ROWS, N] (N = 16 or 32) by the fixed tree of format.pairwise_sum."""
    t = _halve(t, ROWS, N)
    t = _halve(t, ROWS, N // 2)
    t = _halve(t, ROWS, N // 4)
    t = _halve(t, ROWS, N // 8)
    if N == 32:
        t = _halve(t, ROWS, 2)
    return tl.reshape(t, [ROWS])


@triton.jit
def _candidate_error(a, counted, step, w, HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr, N: tl.constexpr):
    d = tl.where(counted, a - _e2m1_round(a * (1.0 / step)) * step, 0.0)
    terms = d * d
    if HAS_WEIGHTS:
        terms = terms * w
    return _pairwise_sum(terms, ROWS, N)


@triton.jit
def _quantize_kernel(
    x_ptr,
    weights_ptr,
    packed_ptr,
    scales_ptr,
    n_blocks,
    blocks_per_row,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
    METHOD: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    in_range = blocks < n_blocks
    cols = tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + blocks[:, None] * BLOCK_SIZE + cols[None, :], mask=in_range[:, None], other=0.0)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        # bf16 is the top half of a float32: widen the bits (exact for subnormals too,
        # which Triton's interpreter converts wrongly).
        bits = (x.to(tl.int16, bitcast=True).to(tl.int32) & _BF16_BITS_MASK) << _BF16_SHIFT
    else:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    abs_bits = bits & _ABS_MASK
    absx = abs_bits.to(tl.float32, bitcast=True)
    # Integer max of magnitude bits: exact amax, and NaN-aware.
    amax_bits = tl.max(abs_bits, axis=1)
    exp_field = amax_bits >> _MANT
    nonfinite = exp_field == _EXP_NONFINITE
    e0 = tl.maximum(exp_field - _EMAX, 0)
    if METHOD == 0:
        e = e0
    elif METHOD == 1:
        e = tl.minimum(tl.maximum(((amax_bits + _EVEN_ADD) >> _MANT) - _EMAX, 0), _E8M0_MAX_QUANTIZE)
    else:
        w = 0.0
        if HAS_WEIGHTS:
            feature = (blocks % blocks_per_row)[:, None] * BLOCK_SIZE + cols[None, :]
            w = tl.load(weights_ptr + feature, mask=in_range[:, None], other=0.0)
        has_minus = e0 > 0
        e_min = tl.maximum(e0 - 1, 0)
        a = absx * _pow2_neg(tl.where(nonfinite, _E8M0_BIAS, e_min))[:, None]
        counted = a > _ZERO_BELOW
        err_lo = _candidate_error(a, counted, 1.0, w, HAS_WEIGHTS, BLOCKS_PER_PROG, BLOCK_SIZE)
        err_mid = _candidate_error(a, counted, 2.0, w, HAS_WEIGHTS, BLOCKS_PER_PROG, BLOCK_SIZE)
        err_hi = _candidate_error(a, counted, 4.0, w, HAS_WEIGHTS, BLOCKS_PER_PROG, BLOCK_SIZE)
        err_minus = tl.where(has_minus, err_lo, float("inf"))
        err_zero = tl.where(has_minus, err_mid, err_lo)
        err_plus = tl.where(has_minus, err_hi, err_mid)
        err_plus = tl.where(e0 < _E8M0_MAX_QUANTIZE, err_plus, float("inf"))
        keep = (err_zero <= err_minus) & (err_zero <= err_plus)
        up = err_plus <= err_minus
        e = tl.where(keep, e0, tl.where(up, e0 + 1, e0 - 1))
    e = tl.where(nonfinite, _E8M0_NAN, e)
    q = absx * _pow2_neg(tl.where(nonfinite, _E8M0_BIAS, e))[:, None]
    codes = _e2m1_index(_e2m1_round(q)) | ((bits >> _SIGN_TO_CODE_SHIFT) & _CODE_SIGN)
    codes = tl.where(nonfinite[:, None], 0, codes)
    low, high = tl.split(tl.reshape(codes, [BLOCKS_PER_PROG, BLOCK_SIZE // 2, 2]))
    packed = (low | (high << _NIBBLE)).to(tl.uint8)
    half_cols = tl.arange(0, BLOCK_SIZE // 2)
    tl.store(packed_ptr + blocks[:, None] * (BLOCK_SIZE // 2) + half_cols[None, :], packed, mask=in_range[:, None])
    tl.store(scales_ptr + blocks, e.to(tl.uint8), mask=in_range)


def quantize_triton(
    w: torch.Tensor,
    block_size: int,
    scale_method: str,
    weights: torch.Tensor | None = None,
    blocks_per_prog: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on a contiguous ``w`` (checked by the caller); same contract as the twin."""
    k = w.shape[-1]
    packed = torch.empty(*w.shape[:-1], k // C.F4_CODES_PER_BYTE, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*w.shape[:-1], k // block_size, dtype=torch.uint8, device=w.device)
    n_blocks = w.numel() // block_size
    if n_blocks == 0:
        return packed, scales
    if blocks_per_prog is None:
        blocks_per_prog = 64 if scale_method == "mse" else 128
    if num_warps is None:
        num_warps = 4
    grid = (triton.cdiv(n_blocks, blocks_per_prog),)
    _quantize_kernel[grid](
        w,
        weights if weights is not None else w,
        packed,
        scales,
        n_blocks,
        k // block_size,
        BLOCK_SIZE=block_size,
        BLOCKS_PER_PROG=blocks_per_prog,
        METHOD=METHOD_IDS[scale_method],
        HAS_WEIGHTS=weights is not None,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return packed, scales
