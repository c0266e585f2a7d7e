"""Triton MXFP4 quantize kernel: bf16/fp16/fp32 in, packed E2M1 codes and UE8M0 bytes out.

Its torch twin is ``qwantize_hf.format.quantize_blocks_torch``; the two must give
the same bytes for every input, so this kernel does the same float32 operations
in the same order (see the ``format`` module docstring) and is launched with
floating-point contraction off (an FMA would round differently). Each program
handles BLOCKS_PER_PROG blocks; it writes packed codes and scale bytes straight
to their outputs, with no float intermediate in global memory.

For bf16 and fp16 input the mse search (and its code emission) can run in packed
float16, two elements per instruction (``half_search``; the default for those
dtypes). It computes the same float32 values: a = |x| / s_min has at most 11
significant bits, so it is exact in float16; the grid rounding, d = a - r and the
saturation are exact or the one round-to-nearest-even the float32 path does; only
d * d and the sums are float32, as before. On the GPU those float16 operations are
inline PTX on element pairs (2i, 2i+1): left to LLVM, its vectorizer pairs elements
of different groups and the kernel spends more on shuffling halves than it saves.
Whether they are is the ``PACKED_ASM`` launch argument, read per launch like the
matmul's PTX switches (``backend.inline_ptx_enabled``): off under TRITON_INTERPRET=1,
which cannot run PTX, and with QWANTIZE_HF_NO_INLINE_PTX=1 (the same operations as
plain tl ops: same bytes, slower; eval/bench_quantize.py times both).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qwantize_hf import constants as C
from qwantize_hf.backend import inline_ptx_allowed, inline_ptx_enabled
from qwantize_hf.format import EVEN_ROUNDING_ADD, ROUNDS_TO_ZERO_BELOW, max_scale_byte
from qwantize_hf.methods import SCALE_METHODS

_MANT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS)
_ABS_MASK: tl.constexpr = tl.constexpr(C.F32_ABS_MASK)
_EXP_FIELD_MASK: tl.constexpr = tl.constexpr(C.F32_EXP_MASK << C.F32_MANTISSA_BITS)
_EXP_NONFINITE: tl.constexpr = tl.constexpr(C.F32_EXP_NONFINITE)
_EMAX: tl.constexpr = tl.constexpr(C.F4_E2M1_EMAX)
_E2M1_MAX: tl.constexpr = tl.constexpr(C.F4_E2M1_MAX)
_E8M0_NAN: tl.constexpr = tl.constexpr(C.E8M0_NAN)
_E8M0_BIAS: tl.constexpr = tl.constexpr(C.E8M0_BIAS)
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
# The half search (float16, bf16/fp16 input). float16 has 10 mantissa bits, so the
# rounding magic for grid spacing 2**(M - 1) is 2**(M + 9) = 2**M * 2**9.
_F16 = torch.finfo(torch.float16)
_F16_MANTISSA_BITS = round(-math.log2(_F16.eps))  # 10
_F16_EXP_BIAS = 1 - round(math.log2(_F16.tiny))  # 15
_F16_EXP_MASK = (1 << (_F16.bits - 1 - _F16_MANTISSA_BITS)) - 1


def _f16_bits(value: float) -> int:
    """The float16 bit pattern of ``value`` as an unsigned 16-bit int."""
    return int(torch.tensor(value, dtype=torch.float16).view(torch.int16)) & 0xFFFF


_H_MANT: tl.constexpr = tl.constexpr(_F16_MANTISSA_BITS)
_H_BIAS: tl.constexpr = tl.constexpr(_F16_EXP_BIAS)
_H_EXP_ONE: tl.constexpr = tl.constexpr(1 << _F16_MANTISSA_BITS)  # one step of the float16 exponent field
_H_EXP_FIELD_MASK: tl.constexpr = tl.constexpr(_F16_EXP_MASK << _F16_MANTISSA_BITS)
_H_MAGIC_SCALE: tl.constexpr = tl.constexpr(_f16_bits(2.0 ** (_F16_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS)))
_H_NEG_MAGIC_SCALE: tl.constexpr = tl.constexpr(_f16_bits(-(2.0 ** (_F16_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS))))
# float16 bits of 6 * 2**c are _H_SIX_BITS + c * _H_EXP_ONE
_H_SIX_BITS: tl.constexpr = tl.constexpr(_f16_bits(C.F4_E2M1_MAX))
_FOUR_BITS = _f16_bits(4.0)
_H_FOUR_BITS: tl.constexpr = tl.constexpr(_FOUR_BITS)
# 4 * z - 4 * 2**9 with z = a + 2**9 (a < 1): 0 exactly when a <= 0.25 (rounded to 0)
_H_DROP_BITS: tl.constexpr = tl.constexpr(_f16_bits(-4.0 * 2.0 ** (_F16_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS)))
# 1028 = 2**10 + 4: float16's last place is 1 there; the 4 makes room to subtract ±4 for the sign
_H_INDEX_BASE_BITS: tl.constexpr = tl.constexpr(_f16_bits(2.0**_F16_MANTISSA_BITS + 4))
_SIGN16 = 1 << (_F16.bits - 1)
_F16_SIGN_BIT: tl.constexpr = tl.constexpr(_SIGN16)
_F16_SIGN_TO_F32: tl.constexpr = tl.constexpr(C.F32_SIGN_SHIFT + 1 - _F16.bits)  # float32 sign → bit 15
_CODE_MASK: tl.constexpr = tl.constexpr(C.F4_NIBBLE_MASK)
# the two lop3s of the code emission (LUT 0xea: (a & b) | c; 0xe4: (a & c) | (b & ~c))
_SIGNED_FOUR_ASM: tl.constexpr = tl.constexpr(
    f"lop3.b32 $0, $1, {_SIGN16 * 0x10001:#x}, {_FOUR_BITS * 0x10001:#x}, 0xea;"
)
_CODE_PAIR_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .b32 t; "
    f"shr.b32 t, $1, {_F16.bits - C.F4_NIBBLE_BITS}; lop3.b32 $0, $1, t, {C.F4_NIBBLE_MASK:#x}, 0xe4; }}"
)
_THREADS_PER_WARP = 32
_HALF_SEARCH_CAPABILITY = (8, 0)


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
def _group_candidate_sums(bits, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr):
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
def _h2(op: tl.constexpr, x, y, PACKED_ASM: tl.constexpr):
    """Packed float16 binary op ("min", "max" or "sub") on element pairs 2i, 2i+1."""
    if PACKED_ASM:
        # sub with .rn: never contracted into an fma
        instruction: tl.constexpr = "sub.rn" if op == "sub" else op
        out = tl.inline_asm_elementwise(
            instruction + ".f16x2 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float16, is_pure=True, pack=2
        )
    elif op == "min":
        out = tl.minimum(x, y)
    elif op == "max":
        out = tl.maximum(x, y)
    else:
        out = x - y
    return out


@triton.jit
def _hfma(x, y, z, PACKED_ASM: tl.constexpr):
    if PACKED_ASM:
        out = tl.inline_asm_elementwise(
            "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [x, y, z], dtype=tl.float16, is_pure=True, pack=2
        )
    else:
        out = tl.fma(x, y, z)
    return out


@triton.jit
def _signed_four(sign_bits, PACKED_ASM: tl.constexpr):
    """float16 -4.0 where bit 15 of the int16 ``sign_bits`` is set, else 4.0."""
    if PACKED_ASM:
        # (x & sign bit) | bits of 4.0 on both halves in one lop3
        out = tl.inline_asm_elementwise(
            _SIGNED_FOUR_ASM,
            "=r,r",
            [sign_bits],
            dtype=tl.float16,
            is_pure=True,
            pack=2,
        )
    else:
        out = ((sign_bits.to(tl.int32) & _F16_SIGN_BIT) | _H_FOUR_BITS).to(tl.int16).to(tl.float16, bitcast=True)
    return out


@triton.jit
def _pack_code_pairs(biased_codes, ROWS: tl.constexpr, PACKED_ASM: tl.constexpr):
    """float16 1024 + code per element, [ROWS, 8] → bytes code(2i) | code(2i+1) << 4, [ROWS, 4] int32
    (on the GPU path only the low 8 bits are the byte; the store keeps just those)."""
    if PACKED_ASM:
        # low byte: the low half's code | (the high half's code, shifted down 12) & 0xF0
        both = tl.inline_asm_elementwise(
            _CODE_PAIR_ASM,
            "=r,r",
            [biased_codes],
            dtype=tl.int16,
            is_pure=True,
            pack=2,
        )
        packed, _ = tl.split(tl.reshape(both, [ROWS, _GROUP // 2, 2]))
        out = packed.to(tl.int32)
    else:
        codes = biased_codes.to(tl.int16, bitcast=True).to(tl.int32) & _CODE_MASK
        low, high = tl.split(tl.reshape(codes, [ROWS, _GROUP // 2, 2]))
        out = low | (high << _NIBBLE)
    return out


@triton.jit
def _f16_of_bits(bits):
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _f16_full(like, bits: tl.constexpr):
    """A float16 tensor shaped like ``like`` filled with the float16 of ``bits``."""
    return tl.full(like.shape, bits, tl.int32).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _half_rounded(a, power_floor, J: tl.constexpr, PACKED_ASM: tl.constexpr):
    """a rounded onto the grid of scale 2**J (units of s_min), in float16, before saturation,
    and z = a + magic (z - 2**9 is >= a for a > 0.25, and 0 for a <= 0.25 when J = 0).

    The magic 2**(max(E, J) + 9) (power_floor = 2**E, E the exponent of a) leaves
    float16's last place at the grid spacing 2**(max(E, J) - 1), the float32 path's
    spacing, so r is the same round-to-nearest-even. Both fmas are exact but for
    the one rounding that makes z: their products are powers of two times a power of two.
    """
    power = _h2("max", power_floor, _f16_full(a, (_H_BIAS + J) << _H_MANT), PACKED_ASM)
    z = _hfma(power, _f16_full(a, _H_MAGIC_SCALE), a, PACKED_ASM)
    r = _hfma(power, _f16_full(a, _H_NEG_MAGIC_SCALE), z, PACKED_ASM)
    return r, z


@triton.jit
def _half_error_sum(
    kept, r, w, J: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr, PACKED_ASM: tl.constexpr
):
    """One group's squared error (float32, the twin's pairwise tree) of the kept a against r,
    saturated at the grid's top 6 * 2**J (a < 16 never reaches the top of the 4·s_min
    grid, 24, so J = 2 skips it).

    d = kept - r is exact in float16 (r/2 <= a <= 2r when r != 0, or a saturated d below
    16 on a's last place) and d * d, at most 22 bits, is exact in float32. So without
    weights the tree's first level, d0*d0 + d1*d1 rounded once, is one fma.
    """
    if J < 2:
        r = _h2("min", r, _f16_full(r, _H_SIX_BITS + _H_EXP_ONE * J), PACKED_ASM)
    d_even, d_odd = tl.split(tl.reshape(_h2("sub", kept, r, PACKED_ASM), [ROWS, _GROUP // 2, 2]))
    d_even = d_even.to(tl.float32)
    d_odd = d_odd.to(tl.float32)
    if HAS_WEIGHTS:
        w_even, w_odd = tl.split(tl.reshape(w, [ROWS, _GROUP // 2, 2]))
        pairs = d_even * d_even * w_even + d_odd * d_odd * w_odd
    else:
        pairs = tl.fma(d_even, d_even, d_odd * d_odd)
    pairs = _halve(pairs, ROWS, _GROUP // 2)
    pairs = _halve(pairs, ROWS, 2)
    return tl.reshape(pairs, [ROWS])


@triton.jit
def _group_candidate_sums_half(
    bits, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr, PACKED_ASM: tl.constexpr
):
    """_group_candidate_sums with the rounding in float16, two elements to an instruction.

    a is exact in float16: a bf16/fp16 input has at most 11 significant bits, and every
    counted a is in (0.25, 16), a normal float16. Returns the sums and a (float16).
    """
    a32 = (bits & _ABS_MASK).to(tl.float32, bitcast=True) * f_min[:, None]
    # a < 2**-14 rounds (to at most 2**-14) but is left out below like every a <= 0.25
    a = a32.to(tl.float16)
    # 2**E, E the exponent of a: a with its mantissa cleared (0 for a below 2**-14)
    power_floor = (a.to(tl.int16, bitcast=True) & _H_EXP_FIELD_MASK).to(tl.float16, bitcast=True)
    w = 0.0
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + feature[:, None] + tl.arange(0, _GROUP)[None, :], mask=in_range[:, None], other=0.0)
    r_lo, z_lo = _half_rounded(a, power_floor, 0, PACKED_ASM)
    # Elements at or below 0.25·s_min round to zero under every candidate: left out.
    # For them z_lo is exactly 2**9; above, 4 * (z_lo - 2**9) >= 4 * r_lo > a.
    drop = _hfma(z_lo, _f16_full(a, _H_FOUR_BITS), _f16_full(a, _H_DROP_BITS), PACKED_ASM)
    kept = _h2("min", a, drop, PACKED_ASM)
    err_lo = _half_error_sum(kept, r_lo, w, 0, HAS_WEIGHTS, ROWS, PACKED_ASM)
    r_mid, _ = _half_rounded(a, power_floor, 1, PACKED_ASM)
    err_mid = _half_error_sum(kept, r_mid, w, 1, HAS_WEIGHTS, ROWS, PACKED_ASM)
    r_hi, _ = _half_rounded(a, power_floor, 2, PACKED_ASM)
    err_hi = _half_error_sum(kept, r_hi, w, 2, HAS_WEIGHTS, ROWS, PACKED_ASM)
    return err_lo, err_mid, err_hi, a, a


@triton.jit
def _group_packed_from_half(bits, a, chosen, nonfinite, ROWS: tl.constexpr, PACKED_ASM: tl.constexpr):
    """Codes of one group at the chosen grid 2**chosen * s_min, from the half search's a.

    With v = min(a, 6 * 2**chosen) / 2**chosen, the E2M1 index is 2v rounded below 2,
    v rounded + 2 on [2, 4) and v/2 rounded + 4 on [4, 6], each rounding to the
    nearest integer, ties to even (the twin's ties); on each range its own formula is
    the least of the three, so the index is their minimum. Each is one fma (the product
    is exact) whose sum lands in [1024, 2048), where float16's last place is 1: 1028 +
    the index. Subtracting ±4 (the element's sign) gives 1024 + the code, whose low
    four bits are the code.
    """
    zeros = tl.zeros_like(a)
    q = _h2("min", a, zeros + _f16_of_bits((chosen << _H_MANT) + _H_SIX_BITS)[:, None], PACKED_ASM)
    k1_bits = (_H_BIAS << _H_MANT) + (chosen << _H_MANT) * -1  # 2**-chosen
    k0 = zeros + _f16_of_bits(k1_bits + _H_EXP_ONE)[:, None]
    k1 = zeros + _f16_of_bits(k1_bits)[:, None]
    k2 = zeros + _f16_of_bits(k1_bits - _H_EXP_ONE)[:, None]
    index0 = _hfma(q, k0, _f16_full(a, _H_INDEX_BASE_BITS), PACKED_ASM)
    index = _h2("min", index0, _hfma(q, k1, _f16_full(a, _H_INDEX_BASE_BITS + 2), PACKED_ASM), PACKED_ASM)
    index = _h2("min", index, _hfma(q, k2, _f16_full(a, _H_INDEX_BASE_BITS + 4), PACKED_ASM), PACKED_ASM)
    sign_four = _signed_four((bits >> _F16_SIGN_TO_F32).to(tl.int16), PACKED_ASM)
    codes = _h2("sub", index, sign_four, PACKED_ASM)
    return tl.where(nonfinite[:, None], 0, _pack_code_pairs(codes, ROWS, PACKED_ASM))


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
def _group_search(
    bits,
    f_min,
    weights_ptr,
    feature,
    in_range,
    HAS_WEIGHTS: tl.constexpr,
    ROWS: tl.constexpr,
    HALF: tl.constexpr,
    PACKED_ASM: tl.constexpr,
):
    if HALF:
        out = _group_candidate_sums_half(bits, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS, ROWS, PACKED_ASM)
    else:
        out = _group_candidate_sums(bits, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS, ROWS)
    return out


@triton.jit
def _group_codes(
    bits, a, magic_floor, chosen, nonfinite, ROWS: tl.constexpr, HALF: tl.constexpr, PACKED_ASM: tl.constexpr
):
    if HALF:
        out = _group_packed_from_half(bits, a, chosen, nonfinite, ROWS, PACKED_ASM)
    else:
        out = _group_packed_from_a(bits, a, magic_floor, chosen, nonfinite, ROWS)
    return out


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
    HALF: tl.constexpr,
    PACKED_ASM: tl.constexpr,
    MAX_BYTE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    in_range = blocks < n_blocks
    ROWS: tl.constexpr = BLOCKS_PER_PROG  # every tensor below has a row per block
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
    e0 = tl.minimum(tl.maximum(exp_field - _EMAX, 0), MAX_BYTE)
    if METHOD == 0:
        e = e0
    elif METHOD == 1:
        e = tl.minimum(tl.maximum(((amax_bits + _EVEN_ADD) >> _MANT) - _EMAX, 0), MAX_BYTE)
    else:
        has_minus = e0 > 0
        f_min = _pow2_neg(tl.where(nonfinite, _E8M0_BIAS, tl.maximum(e0 - 1, 0)))
        feature = (blocks % blocks_per_row) * BLOCK_SIZE
        lo0, mid0, hi0, a0, m0 = _group_search(
            bits0, f_min, weights_ptr, feature, in_range, HAS_WEIGHTS, ROWS, HALF, PACKED_ASM
        )
        lo1, mid1, hi1, a1, m1 = _group_search(
            bits1, f_min, weights_ptr, feature + _GROUP, in_range, HAS_WEIGHTS, ROWS, HALF, PACKED_ASM
        )
        # the last levels of the pairwise tree: (g0 + g1) + (g2 + g3)
        err_lo, err_mid, err_hi = lo0 + lo1, mid0 + mid1, hi0 + hi1
        if BLOCK_SIZE == 32:
            lo2, mid2, hi2, a2, m2 = _group_search(
                bits2, f_min, weights_ptr, feature + 2 * _GROUP, in_range, HAS_WEIGHTS, ROWS, HALF, PACKED_ASM
            )
            lo3, mid3, hi3, a3, m3 = _group_search(
                bits3, f_min, weights_ptr, feature + 3 * _GROUP, in_range, HAS_WEIGHTS, ROWS, HALF, PACKED_ASM
            )
            err_lo, err_mid, err_hi = err_lo + (lo2 + lo3), err_mid + (mid2 + mid3), err_hi + (hi2 + hi3)
        err_minus = tl.where(has_minus, err_lo, float("inf"))
        err_zero = tl.where(has_minus, err_mid, err_lo)
        err_plus = tl.where(has_minus, err_hi, err_mid)
        err_plus = tl.where(e0 < MAX_BYTE, err_plus, float("inf"))
        keep = (err_zero <= err_minus) & (err_zero <= err_plus)
        up = err_plus <= err_minus
        e = tl.where(keep, e0, tl.where(up, e0 + 1, e0 - 1))
        chosen = e - tl.maximum(e0 - 1, 0)
        codes0 = _group_codes(bits0, a0, m0, chosen, nonfinite, ROWS, HALF, PACKED_ASM)
        _store_group(packed_ptr, blocks, in_range, codes0, 0, BLOCK_SIZE)
        codes1 = _group_codes(bits1, a1, m1, chosen, nonfinite, ROWS, HALF, PACKED_ASM)
        _store_group(packed_ptr, blocks, in_range, codes1, 1, BLOCK_SIZE)
        if BLOCK_SIZE == 32:
            codes2 = _group_codes(bits2, a2, m2, chosen, nonfinite, ROWS, HALF, PACKED_ASM)
            _store_group(packed_ptr, blocks, in_range, codes2, 2, BLOCK_SIZE)
            codes3 = _group_codes(bits3, a3, m3, chosen, nonfinite, ROWS, HALF, PACKED_ASM)
            _store_group(packed_ptr, blocks, in_range, codes3, 3, BLOCK_SIZE)
        tl.store(scales_ptr + blocks, tl.where(nonfinite, _E8M0_NAN, e).to(tl.uint8), mask=in_range)
        return
    e = tl.where(nonfinite, _E8M0_NAN, e)
    factor = _pow2_neg(tl.where(nonfinite, _E8M0_BIAS, e))
    _store_group(packed_ptr, blocks, in_range, _group_packed(bits0, factor, nonfinite, ROWS), 0, BLOCK_SIZE)
    _store_group(packed_ptr, blocks, in_range, _group_packed(bits1, factor, nonfinite, ROWS), 1, BLOCK_SIZE)
    if BLOCK_SIZE == 32:
        _store_group(packed_ptr, blocks, in_range, _group_packed(bits2, factor, nonfinite, ROWS), 2, BLOCK_SIZE)
        _store_group(packed_ptr, blocks, in_range, _group_packed(bits3, factor, nonfinite, ROWS), 3, BLOCK_SIZE)
    tl.store(scales_ptr + blocks, e.to(tl.uint8), mask=in_range)


def half_search_runs_on(device: torch.device) -> bool:
    """Whether the packed float16 search may run on ``device`` now: its PTX min.f16x2 / max.f16x2
    need sm_80, so older GPUs take the float32 search (or, with QWANTIZE_HF_NO_INLINE_PTX=1,
    the plain-op float16 one, which runs anywhere)."""
    if device.type != "cuda" or not inline_ptx_enabled():
        return True
    return inline_ptx_allowed(device, _HALF_SEARCH_CAPABILITY)


def quantize_triton(
    w: torch.Tensor,
    block_size: int,
    scale_method: str,
    weights: torch.Tensor | None = None,
    blocks_per_prog: int | None = None,
    num_warps: int | None = None,
    half_search: bool | None = None,
    max_byte: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on a contiguous ``w`` (checked by the caller); same contract as the twin
    (``max_byte``: the largest scale byte, None for ``max_scale_byte(w.dtype)``).

    ``half_search`` runs the mse search's rounding in packed float16, which gives the
    same bytes for bf16/fp16 input and issues fewer instructions; None turns it on for
    those dtypes where the launch allows it. float32 input has up to 24 significant
    bits, not exact in float16. Its inline PTX works on elements 2i and 2i+1 of one
    thread's registers, which holds only when every thread owns a whole block: at
    least 32 * num_warps blocks per program (with fewer, Triton spreads a block's
    elements over threads and the bytes came out wrong on the H100).
    """
    # Measured on an H100 (eval/bench_quantize.py --sweep): the mse search is
    # arithmetic-bound and likes 2 warps over 64 blocks; naive/even are memory-bound.
    if blocks_per_prog is None:
        blocks_per_prog = 64 if scale_method == "mse" else 128
    if num_warps is None:
        num_warps = 2 if scale_method == "mse" else 4
    whole_blocks_per_thread = blocks_per_prog >= _THREADS_PER_WARP * num_warps
    ptx_ok = half_search_runs_on(w.device)
    if half_search is None:
        half_search = w.dtype in (torch.bfloat16, torch.float16) and whole_blocks_per_thread and ptx_ok
    if half_search and not ptx_ok:
        raise ValueError(
            f"half_search's inline PTX needs compute capability {_HALF_SEARCH_CAPABILITY} or newer, and {w.device} "
            "is older; pass half_search=False, or set QWANTIZE_HF_NO_INLINE_PTX=1 for its plain-op version"
        )
    if half_search and w.dtype == torch.float32:
        raise ValueError("half_search needs bfloat16 or float16 input; float32 has too many bits for float16")
    if half_search and not whole_blocks_per_thread:
        raise ValueError(
            f"half_search needs blocks_per_prog >= 32 * num_warps (got {blocks_per_prog} blocks, {num_warps} warps): "
            "each thread must own whole blocks; pass more blocks per program or fewer warps"
        )
    k = w.shape[-1]
    packed = torch.empty(*w.shape[:-1], k // C.F4_CODES_PER_BYTE, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*w.shape[:-1], k // block_size, dtype=torch.uint8, device=w.device)
    n_blocks = w.numel() // block_size
    if n_blocks == 0:
        return packed, scales
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
        METHOD=SCALE_METHODS[scale_method].kernel_id,
        HAS_WEIGHTS=weights is not None,
        HALF=half_search and scale_method == "mse",
        PACKED_ASM=inline_ptx_enabled(),
        MAX_BYTE=max_scale_byte(w.dtype) if max_byte is None else max_byte,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return packed, scales
