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
from qwantize_hf.format import EVEN_ROUNDING_ADD, ROUNDS_TO_ZERO_BELOW

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
_SIGN_TO_CODE_SHIFT: tl.constexpr = tl.constexpr(C.F4_SIGN_TO_F32_SHIFT)  # float sign bit → code bit 3
_CODE_SIGN: tl.constexpr = tl.constexpr(C.F4_E2M1_SIGN_BIT)
_NIBBLE: tl.constexpr = tl.constexpr(C.F4_NIBBLE_BITS)
_BF16_SHIFT: tl.constexpr = tl.constexpr(C.BF16_SHIFT)
_GROUP: tl.constexpr = tl.constexpr(8)  # elements of a block one thread loads at a time
# E2M1 rounding by float addition: adding 2**(E + 22) (E = max(exponent of q, 0))
# leaves one mantissa bit of q, rounded to nearest-even by the FPU; min-exponent 0
# gives the 0.5 spacing of E2M1's subnormal range.
_ROUND_SHIFT: tl.constexpr = tl.constexpr((C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS) << C.F32_MANTISSA_BITS)
_ONE_BITS: tl.constexpr = tl.constexpr(C.F32_EXP_BIAS << C.F32_MANTISSA_BITS)
_EXP_ONE: tl.constexpr = tl.constexpr(1 << C.F32_MANTISSA_BITS)  # one step of the float32 exponent field
# (bits of 2**(E + 22)) >> 22 is 2 * (E + 149): subtract 2 * 149 to get 2E.
_CODE_SHIFT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS)
_MAGIC_CODE_BASE: tl.constexpr = tl.constexpr(
    (C.F32_EXP_BIAS + C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS) << C.F4_E2M1_MANTISSA_BITS
)
_MANT_MASK: tl.constexpr = tl.constexpr((1 << C.F32_MANTISSA_BITS) - 1)
_MAG_MAX: tl.constexpr = tl.constexpr(C.F4_E2M1_MAG_MASK)  # index of 6.0


@triton.jit
def _pow2_neg(e):
    """float32 2**(127 - e) for int32 e in [0, 253]."""
    return ((-(e - 2 * _E8M0_BIAS)) << _MANT).to(tl.float32, bitcast=True)


@triton.jit
def _load_group_bits(x_ptr, blocks, in_range, G: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """float32 bit patterns of elements G*8 .. G*8+7 of each block: [ROWS, 8] int32.

    Loading a block as four 8-element groups (16 bytes of bf16 each) keeps every
    group inside one thread, so the pairwise sums below never cross threads.
    """
    cols = G * _GROUP + tl.arange(0, _GROUP)
    x = tl.load(x_ptr + blocks[:, None] * BLOCK_SIZE + cols[None, :], mask=in_range[:, None], other=0.0)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        # bf16 is the top half of a float32: widen the bits (exact for subnormals too,
        # which Triton's interpreter converts wrongly).
        return x.to(tl.int16, bitcast=True).to(tl.int32) << _BF16_SHIFT
    return x.to(tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def _group_amax_bits(bits):
    # Integer max of magnitude bits: the exact amax, and NaN-aware (NaN bits are largest).
    return tl.max(bits & _ABS_MASK, axis=1)


@triton.jit
def _halve(t, ROWS: tl.constexpr, N: tl.constexpr):
    """[ROWS, N] → [ROWS, N//2]: adds neighbours (0+1, 2+3, ...)."""
    left, right = tl.split(tl.reshape(t, [ROWS, N // 2, 2]))
    return left + right


@triton.jit
def _group_sum(t, ROWS: tl.constexpr):
    """Sum of an 8-element group by the pairwise tree of format.pairwise_sum: [ROWS]."""
    t = _halve(t, ROWS, 8)
    t = _halve(t, ROWS, 4)
    t = _halve(t, ROWS, 2)
    return tl.reshape(t, [ROWS])


@triton.jit
def _candidate_terms(a, magic_floor_bits, w, J: tl.constexpr, LARGEST: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """Squared error terms of a (in units of s_min) on the grid of scale 2**J * s_min.

    Rounds a straight onto that grid: adding 2**(max(E, J) + 22), E the exponent
    of a, leaves the grid's spacing as float32's last place there, and the FPU's
    round-to-nearest-even picks the even code on ties. Same values as the twin's
    2**J * round_e2m1(a / 2**J). ``magic_floor_bits`` is bits(2**(E + 22)), shared by
    the three candidates. LARGEST is the grid's top, 6 * 2**J; a < 16 never
    reaches the top of the 4·s_min grid (24), so J = 2 skips the saturation.
    """
    magic = tl.maximum(magic_floor_bits, _ONE_BITS + _ROUND_SHIFT + _EXP_ONE * J).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    if J < 2:
        r = tl.minimum(r, LARGEST)
    d = a - r
    terms = d * d
    if HAS_WEIGHTS:
        terms = terms * w
    return terms


@triton.jit
def _group_candidate_sums(
    bits, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr
):
    """One group's error sums under scales s_min, 2·s_min, 4·s_min (three [ROWS]), and
    the group's a and magic floor bits, from which its codes are made once a scale is chosen."""
    a = (bits & _ABS_MASK).to(tl.float32, bitcast=True) * f_min[:, None]
    # Elements at or below 0.25·s_min round to zero under every candidate: left out.
    a = tl.where(a > _ZERO_BELOW, a, 0.0)
    magic_floor_bits = (a.to(tl.int32, bitcast=True) & _EXP_FIELD_MASK) + _ROUND_SHIFT
    w = 0.0
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + feature[:, None] + tl.arange(0, _GROUP)[None, :], mask=in_range[:, None], other=0.0)
    err_lo = _group_sum(_candidate_terms(a, magic_floor_bits, w, 0, _E2M1_MAX, HAS_WEIGHTS), ROWS)
    err_mid = _group_sum(_candidate_terms(a, magic_floor_bits, w, 1, _E2M1_MAX * 2, HAS_WEIGHTS), ROWS)
    err_hi = _group_sum(_candidate_terms(a, magic_floor_bits, w, 2, _E2M1_MAX * 4, HAS_WEIGHTS), ROWS)
    return err_lo, err_mid, err_hi, a, magic_floor_bits


@triton.jit
def _group_packed(bits, factor, nonfinite, ROWS: tl.constexpr):
    """Codes of one group at the chosen scale (factor = 1/scale), packed: [ROWS, 4] int32 bytes.

    q = |x| * factor is rounded by the same float addition as _candidate_terms:
    z = q + 2**(E + 22) with E = max(exponent of q, 0). The mantissa field of z
    then counts grid steps (half-units for E = 0, units for E = 1, pairs for
    E = 2), so the magnitude index is that count + 2E, saturated at 7.
    """
    q = (bits & _ABS_MASK).to(tl.float32, bitcast=True) * factor[:, None]
    magic_bits = tl.maximum(q.to(tl.int32, bitcast=True) & _EXP_FIELD_MASK, _ONE_BITS) + _ROUND_SHIFT
    steps = (q + magic_bits.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) & _MANT_MASK
    index = tl.minimum(steps + ((magic_bits >> _CODE_SHIFT) - _MAGIC_CODE_BASE), _MAG_MAX)
    codes = index | ((bits >> _SIGN_TO_CODE_SHIFT) & _CODE_SIGN)
    low, high = tl.split(tl.reshape(codes, [ROWS, _GROUP // 2, 2]))
    return tl.where(nonfinite[:, None], 0, low | (high << _NIBBLE))


@triton.jit
def _group_packed_from_a(bits, a, magic_floor_bits, chosen, nonfinite, ROWS: tl.constexpr):
    """Like _group_packed, from the mse search's a (units of s_min) and its magic floor:
    the chosen grid is 2**chosen * s_min (chosen = e - e_min, per block)."""
    floor_bits = (_ONE_BITS + _ROUND_SHIFT) + chosen * _EXP_ONE
    magic_bits = tl.maximum(magic_floor_bits, floor_bits[:, None])
    steps = (a + magic_bits.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) & _MANT_MASK
    base = _MAGIC_CODE_BASE + 2 * chosen
    index = tl.minimum(steps + ((magic_bits >> _CODE_SHIFT) - base[:, None]), _MAG_MAX)
    codes = index | ((bits >> _SIGN_TO_CODE_SHIFT) & _CODE_SIGN)
    low, high = tl.split(tl.reshape(codes, [ROWS, _GROUP // 2, 2]))
    return tl.where(nonfinite[:, None], 0, low | (high << _NIBBLE))


@triton.jit
def _store_group(packed_ptr, blocks, in_range, packed, G: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    cols = G * (_GROUP // 2) + tl.arange(0, _GROUP // 2)
    ptrs = packed_ptr + blocks[:, None] * (BLOCK_SIZE // 2) + cols[None, :]
    tl.store(ptrs, packed.to(tl.uint8), mask=in_range[:, None])


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
    # A block is 2 (block 16) or 4 (block 32) groups of 8; groups 2 and 3 only exist for 32.
    bits0 = _load_group_bits(x_ptr, blocks, in_range, 0, BLOCK_SIZE)
    bits1 = _load_group_bits(x_ptr, blocks, in_range, 1, BLOCK_SIZE)
    amax_bits = tl.maximum(_group_amax_bits(bits0), _group_amax_bits(bits1))
    if BLOCK_SIZE == 32:
        bits2 = _load_group_bits(x_ptr, blocks, in_range, 2, BLOCK_SIZE)
        bits3 = _load_group_bits(x_ptr, blocks, in_range, 3, BLOCK_SIZE)
        amax_bits = tl.maximum(amax_bits, tl.maximum(_group_amax_bits(bits2), _group_amax_bits(bits3)))
    exp_field = amax_bits >> _MANT
    nonfinite = exp_field == _EXP_NONFINITE
    e0 = tl.maximum(exp_field - _EMAX, 0)
    if METHOD == 0:
        e = e0
    elif METHOD == 1:
        e = tl.minimum(tl.maximum(((amax_bits + _EVEN_ADD) >> _MANT) - _EMAX, 0), _E8M0_MAX_QUANTIZE)
    else:
        has_minus = e0 > 0
        f_min = _pow2_neg(tl.where(nonfinite, _E8M0_BIAS, tl.maximum(e0 - 1, 0)))
        feature = (blocks % blocks_per_row) * BLOCK_SIZE
        lo0, mid0, hi0, a0, m0 = _group_candidate_sums(
            bits0, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS, BLOCKS_PER_PROG
        )
        lo1, mid1, hi1, a1, m1 = _group_candidate_sums(
            bits1, f_min, weights_ptr, feature + _GROUP, in_range, HAS_WEIGHTS, BLOCKS_PER_PROG
        )
        # the last levels of the pairwise tree: (g0 + g1) + (g2 + g3)
        err_lo, err_mid, err_hi = lo0 + lo1, mid0 + mid1, hi0 + hi1
        if BLOCK_SIZE == 32:
            lo2, mid2, hi2, a2, m2 = _group_candidate_sums(
                bits2, f_min, weights_ptr, feature + 2 * _GROUP, in_range, HAS_WEIGHTS, BLOCKS_PER_PROG
            )
            lo3, mid3, hi3, a3, m3 = _group_candidate_sums(
                bits3, f_min, weights_ptr, feature + 3 * _GROUP, in_range, HAS_WEIGHTS, BLOCKS_PER_PROG
            )
            err_lo, err_mid, err_hi = err_lo + (lo2 + lo3), err_mid + (mid2 + mid3), err_hi + (hi2 + hi3)
        err_minus = tl.where(has_minus, err_lo, float("inf"))
        err_zero = tl.where(has_minus, err_mid, err_lo)
        err_plus = tl.where(has_minus, err_hi, err_mid)
        err_plus = tl.where(e0 < _E8M0_MAX_QUANTIZE, err_plus, float("inf"))
        keep = (err_zero <= err_minus) & (err_zero <= err_plus)
        up = err_plus <= err_minus
        e = tl.where(keep, e0, tl.where(up, e0 + 1, e0 - 1))
        chosen = e - tl.maximum(e0 - 1, 0)
        _store_group(
            packed_ptr, blocks, in_range, _group_packed_from_a(bits0, a0, m0, chosen, nonfinite, BLOCKS_PER_PROG), 0,
            BLOCK_SIZE,
        )
        _store_group(
            packed_ptr, blocks, in_range, _group_packed_from_a(bits1, a1, m1, chosen, nonfinite, BLOCKS_PER_PROG), 1,
            BLOCK_SIZE,
        )
        if BLOCK_SIZE == 32:
            _store_group(
                packed_ptr, blocks, in_range, _group_packed_from_a(bits2, a2, m2, chosen, nonfinite, BLOCKS_PER_PROG),
                2, BLOCK_SIZE,
            )
            _store_group(
                packed_ptr, blocks, in_range, _group_packed_from_a(bits3, a3, m3, chosen, nonfinite, BLOCKS_PER_PROG),
                3, BLOCK_SIZE,
            )
        tl.store(scales_ptr + blocks, tl.where(nonfinite, _E8M0_NAN, e).to(tl.uint8), mask=in_range)
        return
    e = tl.where(nonfinite, _E8M0_NAN, e)
    factor = _pow2_neg(tl.where(nonfinite, _E8M0_BIAS, e))
    _store_group(packed_ptr, blocks, in_range, _group_packed(bits0, factor, nonfinite, BLOCKS_PER_PROG), 0, BLOCK_SIZE)
    _store_group(packed_ptr, blocks, in_range, _group_packed(bits1, factor, nonfinite, BLOCKS_PER_PROG), 1, BLOCK_SIZE)
    if BLOCK_SIZE == 32:
        _store_group(
            packed_ptr, blocks, in_range, _group_packed(bits2, factor, nonfinite, BLOCKS_PER_PROG), 2, BLOCK_SIZE
        )
        _store_group(
            packed_ptr, blocks, in_range, _group_packed(bits3, factor, nonfinite, BLOCKS_PER_PROG), 3, BLOCK_SIZE
        )
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
    # Measured on an H100 (eval/bench_quantize.py --sweep): the mse search is
    # arithmetic-bound and likes 2 warps over 64 blocks; naive/even are memory-bound.
    if blocks_per_prog is None:
        blocks_per_prog = 64 if scale_method == "mse" else 128
    if num_warps is None:
        num_warps = 2 if scale_method == "mse" else 4
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
