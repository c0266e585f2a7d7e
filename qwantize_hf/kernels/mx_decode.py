"""Triton helpers that turn MXFP4 bytes into numbers, shared by the matmul kernels and the dequantize kernel.

Written once here: the UE8M0 scale byte as a float32 (``e8m0_value``) or as a bf16 pair
(``e8m0_bf16_pair``); E2M1 codes as float32 or bf16 bit patterns without a lookup table
(``code_pair``, ``code_pairs``, ``pair_f32``, ``code_values``); the 16-byte loads of the
register kernels (``load_quad``, ``load_scale_bytes``); and the epilogue of every matmul
kernel (``store_tile`` with ``add_bias``: bias, split-K partial sums, the store). Their
torch twins are in ``qwantize_hf.format``. This module holds no kernel and launches nothing.

Code -> value without a lookup table: the 3 magnitude bits of an E2M1 code placed at the
bottom of a float32/bfloat16 exponent field, and its sign at the sign bit, read as a float
give ``value * 2**-126`` exactly (exponent field 0 is the subnormal range, which is how
E2M1 encodes 0 and 0.5); one multiply by ``2**126`` and one by the block scale finish it.
For bf16 this runs on int32 words, two values per register (``code_pair``): about 2 integer
ops and 1 bf16x2 multiply a weight. The multiplies must keep subnormals (they do: Triton
does not flush them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwantize_hf import constants as C


def _int32(bits: int) -> int:
    """A 32-bit pattern as the int32 Triton compares and masks with."""
    return bits - (1 << 32) if bits >> 31 else bits


NIBBLE: tl.constexpr = tl.constexpr(C.F4_NIBBLE_BITS)
CODES_PER_WORD: tl.constexpr = tl.constexpr(4 * C.F4_CODES_PER_BYTE)  # E2M1 codes in one int32 of packed bytes
_MANT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS)
_E8M0_NAN: tl.constexpr = tl.constexpr(C.E8M0_NAN)
# 2**-127 (byte 0) is a float32 subnormal; its bit pattern.
_SMALLEST_SCALE_BITS: tl.constexpr = tl.constexpr(1 << (C.F32_MANTISSA_BITS - 1))

# float32 bit positions of an E2M1 code's magnitude bits (22-24) and sign (31).
F32_MAG_SHIFT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS)
F32_MAG_BITS: tl.constexpr = tl.constexpr(C.F4_E2M1_MAG_MASK << (C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS))
F32_SIGN_SHIFT: tl.constexpr = tl.constexpr(C.F4_SIGN_TO_F32_SHIFT)  # code bit 3 -> float32 bit 31
F32_SIGN_BITS: tl.constexpr = tl.constexpr(_int32(1 << C.F32_SIGN_SHIFT))  # 0x80000000 as int32
# The placed bits read as value * 2**-126 (float32 and bfloat16 share the exponent bias):
# one exact multiply by 2**126 undoes that.
DENORMAL_UNDO: tl.constexpr = tl.constexpr(2.0 ** (C.F32_EXP_BIAS - 1))

# bfloat16 pairs: the same placement in each 16-bit half of an int32, magnitude at
# bits 6-8 (and 22-24), sign at bit 15 (and 31): the float32 placement, one half lower.
HALF_SHIFT: tl.constexpr = tl.constexpr(C.BF16_SHIFT)  # bits in a bf16, and the shift to an int32's high half
BF16_MANTISSA_BITS = C.F32_MANTISSA_BITS - C.BF16_SHIFT  # 7: a bf16's exponent field starts here
_PAIR = 1 + (1 << C.BF16_SHIFT)  # times a 16-bit pattern: the pattern in both halves of an int32
_BF16_MAG_SHIFT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS - C.BF16_SHIFT)
_BF16_SIGN_SHIFT: tl.constexpr = tl.constexpr(C.F4_SIGN_TO_F32_SHIFT - C.BF16_SHIFT)
_PAIR_MAG_BITS: tl.constexpr = tl.constexpr((C.F4_E2M1_MAG_MASK << _BF16_MAG_SHIFT.value) * _PAIR)  # 0x01C001C0
PAIR_SIGN_BITS: tl.constexpr = tl.constexpr(_int32((1 << (C.BF16_SHIFT - 1)) * _PAIR))  # 0x80008000 as int32
HIGH_HALF: tl.constexpr = tl.constexpr(_int32(((1 << C.BF16_SHIFT) - 1) << C.BF16_SHIFT))  # 0xFFFF0000 as int32
# 2**126 as a bfloat16 in both halves of an int32: one bf16x2 multiply undoes the
# placement's 2**-126 in two values at once.
PAIR_UNDO: tl.constexpr = tl.constexpr(((C.F32_EXP_BIAS + C.F32_EXP_BIAS - 1) << BF16_MANTISSA_BITS) * _PAIR)

# The scale byte as a bfloat16: byte E is 2**(E - 127), exponent field E; byte 0 is the
# subnormal 2**-127 (the top mantissa bit); byte 255 a quiet NaN (exponent all ones, top mantissa bit).
_BF16_EXP_SHIFT: tl.constexpr = tl.constexpr(BF16_MANTISSA_BITS)
_BF16_SMALLEST_SCALE_BITS: tl.constexpr = tl.constexpr(1 << (BF16_MANTISSA_BITS - 1))  # 0x40
_BF16_NAN_BITS: tl.constexpr = tl.constexpr(
    (C.F32_EXP_NONFINITE << BF16_MANTISSA_BITS) | (1 << (BF16_MANTISSA_BITS - 1))
)  # 0x7FC0
_E8M0_MIN: tl.constexpr = tl.constexpr(C.E8M0_MIN)


@triton.jit
def e8m0_value(e):
    """float32 2**(e - 127) for int32 scale bytes; NaN for 255."""
    bits = tl.where(e == _E8M0_MIN, _SMALLEST_SCALE_BITS, e << _MANT)
    return tl.where(e == _E8M0_NAN, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def e8m0_bf16_pair(scale_bytes):
    """E8M0 scale bytes (int32) -> the scale as bfloat16 in both halves of an int32. Exact:
    byte E is 2**(E - 127); byte 0 is the bf16 subnormal 2**-127; 255 is NaN."""
    bits = tl.where(
        scale_bytes == _E8M0_MIN,
        _BF16_SMALLEST_SCALE_BITS,
        tl.where(scale_bytes == _E8M0_NAN, _BF16_NAN_BITS, scale_bytes << _BF16_EXP_SHIFT),
    )
    return bits | (bits << HALF_SHIFT)


@triton.jit
def code_pair(words, P: tl.constexpr):
    """Codes P and P+4 of each int32 word as the bf16 bits of ``value * 2**-126`` in its low and high half."""
    MAG: tl.constexpr = _BF16_MAG_SHIFT - NIBBLE * P
    SIGN: tl.constexpr = _BF16_SIGN_SHIFT - NIBBLE * P
    if MAG >= 0:
        mag = words << MAG
    else:
        mag = words >> -MAG  # arithmetic shift: the copied sign bits land outside the mask
    return (mag & _PAIR_MAG_BITS) | ((words << SIGN) & PAIR_SIGN_BITS)


@triton.jit
def code_pairs(words):
    """[R, W] int32 words -> [R, W, 4] int32: at [r, w, p] codes p and p + 4 of word w as ``code_pair`` makes them."""
    # join(join(p0, p2), join(p1, p3)) flattens to p0, p1, p2, p3 along the new last axis.
    even = tl.join(code_pair(words, 0), code_pair(words, 2))
    odd = tl.join(code_pair(words, 1), code_pair(words, 3))
    return tl.reshape(tl.join(even, odd), [words.shape[0], words.shape[1], 4])


@triton.jit
def pair_f32(pairs, PTX_MUL: tl.constexpr):
    """int32 pairs from ``code_pair`` -> (low, high) float32 code values, exact and unscaled."""
    if PTX_MUL:
        # One bf16x2 multiply undoes 2**-126 in both halves (exact: at most 2 significant
        # bits, subnormals kept); widening a bf16 to float32 is then a shift or a mask.
        # mul.bf16x2 needs sm_90 (matmul_gemv.BF16X2_MUL_CAPABILITY); elsewhere the float32 multiply runs.
        pairs = tl.inline_asm_elementwise(
            "mul.rn.bf16x2 $0, $1, $2;",
            "=r,r,r",
            [pairs, tl.full(pairs.shape, PAIR_UNDO, tl.int32)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        low = (pairs << HALF_SHIFT).to(tl.float32, bitcast=True)
        high = (pairs & HIGH_HALF).to(tl.float32, bitcast=True)
    else:
        low = (pairs << HALF_SHIFT).to(tl.float32, bitcast=True) * DENORMAL_UNDO
        high = (pairs & HIGH_HALF).to(tl.float32, bitcast=True) * DENORMAL_UNDO
    return low, high


@triton.jit
def code_values(words, PTX_MUL: tl.constexpr):
    """[R, W] int32 words of packed codes -> float32 [R, W, 4, 2], the exact unscaled code values:
    element 8w + p + 4h at [r, w, p, h]."""
    low, high = pair_f32(code_pairs(words), PTX_MUL)
    return tl.join(low, high)


@triton.jit
def load_quad(ptrs, PTX_LOAD: tl.constexpr, STREAM: tl.constexpr = False):
    """Four consecutive int32 at each of ``ptrs`` (16-byte aligned), in ``ptrs``' layout.
    ``STREAM``: bytes read once (weights), not kept in L1, which is left to x."""
    if PTX_LOAD:
        # One 16-byte load a pointer, and its results stay in the registers of the thread
        # that computes with them: a tl.load here would get a layout of Triton's choosing and
        # a conversion through shared memory, with barriers, every step.
        return tl.inline_asm_elementwise(
            "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];"
            if STREAM
            else "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
            "=r,=r,=r,=r,l",
            [ptrs],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    return tl.load(ptrs), tl.load(ptrs + 1), tl.load(ptrs + 2), tl.load(ptrs + 3)


@triton.jit
def load_scale_bytes(ptrs, PTX_LOAD: tl.constexpr):
    """The scale byte at each of ``ptrs`` as int32, in ``ptrs``' layout (see ``load_quad``)."""
    if PTX_LOAD:
        return tl.inline_asm_elementwise(
            "ld.global.nc.u8 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True, pack=1
        )
    return tl.load(ptrs).to(tl.int32)


@triton.jit
def add_bias(acc, bias_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, W_IS_A: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if W_IS_A:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    return acc


@triton.jit
def store_tile(
    acc,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    tile,
    offs_n,
    n_ok,
    tile_mask,
    tile_off,
    out_off,
    mn,
    pid_k,
    HAS_BIAS: tl.constexpr,
    W_IS_A: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Add bias and store an output tile; with split-K, the last of its SPLIT_K programs does it.

    Each split publishes its float32 partial; the last of the SPLIT_K programs of this
    output tile to arrive (acq_rel counter) sums them all and resets the counter (a
    workspace passed to ``mxfp4_matmul_triton`` serves many launches). Split-1 launches pass None for
    ``partial_ptr`` and ``counter_ptr``: no buffer is allocated for them.
    """
    if SPLIT_K > 1:
        counter = counter_ptr + tile
        tl.store(partial_ptr + pid_k * mn + tile_off, acc, mask=tile_mask)
        # Every thread's partial store must precede the release below, not only the
        # storing thread's: the barrier orders them within the program.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for split in range(SPLIT_K):
                acc += tl.load(partial_ptr + split * mn + tile_off, mask=tile_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
            acc = add_bias(acc, bias_ptr, offs_n, n_ok, HAS_BIAS, W_IS_A)
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    else:
        acc = add_bias(acc, bias_ptr, offs_n, n_ok, HAS_BIAS, W_IS_A)
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
