"""Triton fused MXFP4 matmul: ``y = x @ dequant(W).T (+ bias)`` straight from packed codes and scale bytes.

Its torch twin is ``dequantize_blocks_torch`` followed by ``F.linear``. The bf16/fp16
weight never exists in global memory: each program turns a tile of packed bytes into
``x.dtype`` values in registers and feeds them to ``tl.dot`` (wgmma on Hopper).

Three kernels, and the dispatch (``mxfp4_matmul_triton``) times every config that can take
a shape once, on its first call, and keeps the fastest (eval/results/bench_matmul_h100.md);
a later call with the same launch key starts that compiled kernel directly (``_Launcher``):

- ``_mxfp4_gemv_kernel``, M = 1 on the CUDA cores: no padding of x to 16 rows. Each thread
  loads groups of 32 codes of a row (one or two scale blocks) in one 16-byte load each, with
  the 64 bytes of x they multiply, turns the codes into float32 values and sums the products
  in float32; nothing moves between threads until the end.
- ``_mxfp4_mma_kernel``, M <= 16 with bf16 x: the weight as the A operand of warp-level
  ``mma.sync`` (16 rows), 8 rows of x its B operand; every operand is loaded straight into
  the registers the mma reads, so there is no shared memory and no barrier in the loop.
  Fastest at M = 2..8 on every Llama-3-8B shape and at M = 1 on some.
- ``_mxfp4_matmul_kernel``, the tensor-core kernel through ``tl.dot``; both register kernels
  need K a multiple of 32, so it also takes other K. Its two launch families share one body
  and differ only in their configs:

  - decode (M <= ``DECODE_MAX_M``): memory-bound. The weight tile is the dot's register
    operand (64-128 output features) and the few rows of x, padded to 16, the shared-memory
    one, so no tensor-core row is wasted on a weight. K is split over several programs so
    that every SM streams weight bytes; the last program of an output tile to finish adds
    the others' fp32 partials (one launch, no atomics on the output, no second kernel).
  - prefill (larger M): compute-bound. 64-256 row tiles, grouped tile order for L2 reuse.

Code -> value without a lookup table: the 3 magnitude bits of an E2M1 code placed at the
bottom of a float32/bfloat16 exponent field, and its sign at the sign bit, read as a float
give ``value * 2**-126`` exactly (exponent field 0 is the subnormal range, which is how
E2M1 encodes 0 and 0.5); one multiply by ``2**126`` and one by the block scale finish it.
For bf16 this runs on int32 words, two values per register (``_dequantize_words_bf16``):
about 2 integer ops and 1 bf16x2 multiply a weight. fp16 takes the per-byte float32 path.
The multiplies must keep subnormals (they do: Triton does not flush them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwantize_hf import constants as C
from qwantize_hf.kernels.dequantize import e8m0_value
from qwantize_hf.ops import _interpreting, inline_ptx_allowed

_NIBBLE: tl.constexpr = tl.constexpr(C.F4_NIBBLE_BITS)
# float32 bit positions of an E2M1 code's magnitude bits (22-24) and sign (31).
_F32_MAG_SHIFT: tl.constexpr = tl.constexpr(C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS)
_F32_MAG_BITS: tl.constexpr = tl.constexpr(C.F4_E2M1_MAG_MASK << (C.F32_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS))
_F32_SIGN_SHIFT: tl.constexpr = tl.constexpr(C.F4_SIGN_TO_F32_SHIFT)  # code bit 3 -> float32 bit 31
_F32_SIGN_BITS: tl.constexpr = tl.constexpr(-(1 << C.F32_SIGN_SHIFT))  # 0x80000000 as int32
# The placed bits read as value * 2**-126 (float32 and bfloat16 share the exponent bias):
# one exact multiply by 2**126 undoes that.
_DENORMAL_UNDO: tl.constexpr = tl.constexpr(2.0 ** (C.F32_EXP_BIAS - 1))
# bfloat16 pairs: the same placement in each 16-bit half of an int32, magnitude at
# bits 6-8 (and 22-24), sign at bit 15 (and 31).
_BF16_MANTISSA_BITS = 7
_BF16_MAG_SHIFT: tl.constexpr = tl.constexpr(_BF16_MANTISSA_BITS - C.F4_E2M1_MANTISSA_BITS)
_BF16_SIGN_SHIFT: tl.constexpr = tl.constexpr(15 - 3)
_PAIR_MAG_BITS: tl.constexpr = tl.constexpr((C.F4_E2M1_MAG_MASK << 6) * 0x10001)  # 0x01C001C0
_PAIR_SIGN_BITS: tl.constexpr = tl.constexpr(0x80008000 - (1 << 32))  # as int32
_CODES_PER_WORD: tl.constexpr = tl.constexpr(8)  # E2M1 codes in one int32 of packed bytes
_HIGH_HALF: tl.constexpr = tl.constexpr(-(1 << 16))  # 0xFFFF0000 as int32

# 2**126 as a bfloat16 in both halves of an int32: one bf16x2 multiply undoes the
# placement's 2**-126 in two values at once.
_PAIR_UNDO: tl.constexpr = tl.constexpr(((C.F32_EXP_BIAS + C.F32_EXP_BIAS - 1) << _BF16_MANTISSA_BITS) * 0x10001)

_BF16X2_MUL_CAPABILITY = (9, 0)  # PTX mul.bf16x2 needs sm_90
_VECTOR_LOAD_CAPABILITY = (7, 0)  # ld.global.nc.v4: every NVIDIA GPU Triton supports

GEMV_MAX_M = 1  # rows of x up to which the CUDA-core kernel runs
GEMV_K_MULTIPLE = 32  # it takes K in groups of 4 words (32 codes); other K go to the decode configs
DECODE_MAX_M = 16  # rows of x up to which the decode configs are used
_DECODE_BLOCK_M = 16  # smallest tl.dot extent; x rows are padded to it


@triton.jit
def _dequantize_bytes(packed, scale_bytes, BLOCK_SIZE: tl.constexpr, out_dtype: tl.constexpr):
    """[R, C] packed bytes and [R, 2C/BLOCK_SIZE] scale bytes -> [R, 2C] values in ``out_dtype``, K in order."""
    R: tl.constexpr = packed.shape[0]
    HALF: tl.constexpr = packed.shape[1]
    b = packed.to(tl.int32)
    # Element 2i (low nibble) and 2i+1 (high nibble) as float32 bits of value * 2**-126.
    low = ((b << _F32_MAG_SHIFT) & _F32_MAG_BITS) | ((b << _F32_SIGN_SHIFT) & _F32_SIGN_BITS)
    high_code = b >> _NIBBLE
    high = ((high_code << _F32_MAG_SHIFT) & _F32_MAG_BITS) | ((high_code << _F32_SIGN_SHIFT) & _F32_SIGN_BITS)
    bits = tl.reshape(tl.join(low, high), [R, 2 * HALF])
    tiny = bits.to(tl.float32, bitcast=True) * _DENORMAL_UNDO
    scale = e8m0_value(scale_bytes.to(tl.int32))
    values = tl.reshape(tiny, [R, 2 * HALF // BLOCK_SIZE, BLOCK_SIZE]) * scale[:, :, None]
    return tl.reshape(values, [R, 2 * HALF]).to(out_dtype)


@triton.jit
def _code_pair(words, P: tl.constexpr):
    """Codes P and P+4 of each int32 word as the bf16 bits of ``value * 2**-126`` in its low and high half."""
    MAG: tl.constexpr = _BF16_MAG_SHIFT - _NIBBLE * P
    SIGN: tl.constexpr = _BF16_SIGN_SHIFT - _NIBBLE * P
    if MAG >= 0:
        mag = words << MAG
    else:
        mag = words >> -MAG  # arithmetic shift: the copied sign bits land outside the mask
    return (mag & _PAIR_MAG_BITS) | ((words << SIGN) & _PAIR_SIGN_BITS)


@triton.jit
def _code_pairs(words):
    """[R, W] int32 words -> [R, W, 4] int32: at [r, w, p] codes p and p + 4 of word w as ``_code_pair`` makes them."""
    # join(join(p0, p2), join(p1, p3)) flattens to p0, p1, p2, p3 along the new last axis.
    even = tl.join(_code_pair(words, 0), _code_pair(words, 2))
    odd = tl.join(_code_pair(words, 1), _code_pair(words, 3))
    return tl.reshape(tl.join(even, odd), [words.shape[0], words.shape[1], 4])


@triton.jit
def _dequantize_words_bf16(words, scale_bytes, BLOCK_SIZE: tl.constexpr, INTERPRET: tl.constexpr):
    """[R, W] int32 words of packed codes -> bf16 [R, W, 4, 2]: element 8w + p + 4h at [r, w, p, h].

    Works on pairs of bf16 packed in an int32 (SIMD within a register): two shifts
    and two masks make two values, and each multiply below is one bf16x2 instruction.
    """
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    WORDS_PER_BLOCK: tl.constexpr = BLOCK_SIZE // _CODES_PER_WORD
    scale = e8m0_value(scale_bytes.to(tl.int32))  # exact: a power of two, or NaN
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [R, W // WORDS_PER_BLOCK, WORDS_PER_BLOCK]), [R, W])
    if INTERPRET:
        # The interpreter has no bf16 arithmetic and flushes bf16 subnormals: the float32
        # code values (each half widened to the float32 with the same bits) instead.
        return (_code_values(words, False) * scale[:, :, None, None]).to(tl.bfloat16)
    pairs = _code_pairs(words)
    scale = scale.to(tl.bfloat16)[:, :, None]
    low = pairs.to(tl.int16).to(tl.bfloat16, bitcast=True) * _DENORMAL_UNDO * scale
    high = (pairs >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True) * _DENORMAL_UNDO * scale
    return tl.join(low, high)


@triton.jit
def _words_to_dot_order(values, BLOCK_K: tl.constexpr):
    """bf16 [R, W, 4, 2] from ``_dequantize_words_bf16`` -> [R, BLOCK_K] in a permuted K order.

    The order puts each thread's 16 loaded bytes exactly where the wgmma register
    operand wants them, so no value moves between threads; x is loaded in the same order.
    """
    R: tl.constexpr = values.shape[0]
    v = tl.reshape(values, [R, BLOCK_K // 128, 2, 2, 2, 2, 2, 2, 2])  # [r, uh, u3, u2, u1, u0, p1, p0, h]
    v = tl.permute(v, (0, 1, 4, 5, 6, 7, 2, 3, 8))  # [r, uh, u1, u0, p1, p0, u3, u2, h]
    return tl.reshape(v, [R, BLOCK_K])


@triton.jit
def _words_to_k_order(values, BLOCK_K: tl.constexpr):
    """bf16 [R, W, 4, 2] from ``_dequantize_words_bf16`` -> [R, BLOCK_K] with K in memory order."""
    return tl.reshape(tl.permute(values, (0, 1, 3, 2)), [values.shape[0], BLOCK_K])


@triton.jit
def _x_to_dot_order(x, BLOCK_K: tl.constexpr):
    """x [R, BLOCK_K] in memory order -> the permuted K order of ``_words_to_dot_order``.

    Memory element e = 8u + p + 4h (word u = u0 + 2u1 + 4u2 + 8u3 + 16uh) goes to the
    position with bits, low to high, h, u2, u3, p0, p1, u0, u1, uh: a fixed shuffle of
    each 128 elements, done on the loaded tile so the load itself stays contiguous.
    """
    R: tl.constexpr = x.shape[0]
    v = tl.reshape(x, [R, BLOCK_K // 128, 2, 2, 2, 2, 2, 2, 2])  # [r, uh, u3, u2, u1, u0, h, p1, p0]
    v = tl.permute(v, (0, 1, 4, 5, 7, 8, 2, 3, 6))  # [r, uh, u1, u0, p1, p0, u3, u2, h]
    return tl.reshape(v, [R, BLOCK_K])


@triton.jit
def _add_bias(acc, bias_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, W_IS_A: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if W_IS_A:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    return acc


@triton.jit
def _k_step(
    acc,
    x_rows,
    x_row_ok,
    w_rows,
    s_rows,
    k0,
    k_end,
    BLOCK_K: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    W_IS_A: tl.constexpr,
    WORDS: tl.constexpr,
    PERMUTE_K: tl.constexpr,
    MASKED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One BLOCK_K slice: load x, packed codes and scale bytes, dequantize in registers, accumulate.

    ``WORDS``: ``w_rows`` points at int32 words (bf16 only), and with ``PERMUTE_K`` both
    tiles are shuffled to the K order of ``_words_to_dot_order`` (the weight is the dot's
    register operand); else ``w_rows`` points at bytes. Without ``PERMUTE_K`` K runs in
    memory order. Only the last, partial step of a split is ``MASKED``: full steps need
    no K mask, and rows were clamped in range.
    """
    ks = tl.arange(0, BLOCK_K // BLOCK_SIZE)
    s_ptrs = s_rows + (k0 // BLOCK_SIZE + ks)[None, :]
    if WORDS:
        x_cols = k0 + tl.arange(0, BLOCK_K)
        kw = tl.arange(0, BLOCK_K // _CODES_PER_WORD)
        w_ptrs = w_rows + (k0 // _CODES_PER_WORD + kw)[None, :]
        if MASKED:
            x = tl.load(x_rows + x_cols[None, :], mask=x_row_ok[:, None] & (x_cols < k_end)[None, :], other=0.0)
            words = tl.load(w_ptrs, mask=((k0 + kw * _CODES_PER_WORD) < k_end)[None, :], other=0)
            scale_bytes = tl.load(s_ptrs, mask=((k0 + ks * BLOCK_SIZE) < k_end)[None, :], other=0)
        else:
            x = tl.load(x_rows + x_cols[None, :], mask=x_row_ok[:, None], other=0.0)
            words = tl.load(w_ptrs)
            scale_bytes = tl.load(s_ptrs)
        values = _dequantize_words_bf16(words, scale_bytes, BLOCK_SIZE, INTERPRET)
        if PERMUTE_K:
            w = _words_to_dot_order(values, BLOCK_K)
            x = _x_to_dot_order(x, BLOCK_K)
        else:
            w = _words_to_k_order(values, BLOCK_K)
    else:
        kk = tl.arange(0, BLOCK_K)
        kb = tl.arange(0, BLOCK_K // 2)
        x_ptrs = x_rows + (k0 + kk)[None, :]
        w_ptrs = w_rows + (k0 // 2 + kb)[None, :]
        if MASKED:
            x = tl.load(x_ptrs, mask=x_row_ok[:, None] & ((k0 + kk) < k_end)[None, :], other=0.0)
            packed = tl.load(w_ptrs, mask=((k0 + 2 * kb) < k_end)[None, :], other=0)
            scale_bytes = tl.load(s_ptrs, mask=((k0 + ks * BLOCK_SIZE) < k_end)[None, :], other=0)
        else:
            x = tl.load(x_ptrs, mask=x_row_ok[:, None], other=0.0)
            packed = tl.load(w_ptrs)
            scale_bytes = tl.load(s_ptrs)
        w = _dequantize_bytes(packed, scale_bytes, BLOCK_SIZE, x_rows.dtype.element_ty)
    if INTERPRET:
        # The interpreter's tl.dot multiplies bf16 bit patterns as integers; the same
        # rounded values in float32 give the product the compiled kernel computes.
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    if W_IS_A:
        acc = tl.dot(w, tl.trans(x), acc)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _code_values(words, PTX_MUL: tl.constexpr):
    """[R, W] int32 words of packed codes -> float32 [R, W, 4, 2], the exact unscaled code values:
    element 8w + p + 4h at [r, w, p, h]."""
    low, high = _pair_f32(_code_pairs(words), PTX_MUL)
    return tl.join(low, high)


@triton.jit
def _pair_f32(pairs, PTX_MUL: tl.constexpr):
    """int32 pairs from ``_code_pair`` -> (low, high) float32 code values, exact and unscaled."""
    if PTX_MUL:
        # One bf16x2 multiply undoes 2**-126 in both halves (exact: at most 2 significant
        # bits, subnormals kept); widening a bf16 to float32 is then a shift or a mask.
        # mul.bf16x2 needs sm_90 (_BF16X2_MUL_CAPABILITY); elsewhere the float32 multiply runs.
        pairs = tl.inline_asm_elementwise(
            "mul.rn.bf16x2 $0, $1, $2;",
            "=r,r,r",
            [pairs, tl.full(pairs.shape, _PAIR_UNDO, tl.int32)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        low = (pairs << 16).to(tl.float32, bitcast=True)
        high = (pairs & _HIGH_HALF).to(tl.float32, bitcast=True)
    else:
        low = (pairs << 16).to(tl.float32, bitcast=True) * _DENORMAL_UNDO
        high = (pairs & _HIGH_HALF).to(tl.float32, bitcast=True) * _DENORMAL_UNDO
    return low, high


@triton.jit
def _x_pair_f32(x_pair, X_BF16: tl.constexpr):
    """int32 holding two 16-bit x elements (memory order: low half first) -> two float32."""
    if X_BF16:
        return (x_pair << 16).to(tl.float32, bitcast=True), (x_pair & _HIGH_HALF).to(tl.float32, bitcast=True)
    low = x_pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (x_pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _word_dot(total, word, x_quad, X_BF16: tl.constexpr, PTX_MUL: tl.constexpr):
    """``total`` plus the sum over the 8 codes of ``word`` of code value * x element: float32, unscaled.

    ``x_quad``: the word's 8 x elements as 4 int32 pairs (``_load_quad``), broadcast over its rows.
    ``_code_pair(word, p)`` holds codes p and p + 4.
    """
    x0, x1 = _x_pair_f32(x_quad[0], X_BF16)
    x2, x3 = _x_pair_f32(x_quad[1], X_BF16)
    x4, x5 = _x_pair_f32(x_quad[2], X_BF16)
    x6, x7 = _x_pair_f32(x_quad[3], X_BF16)
    # One multiply-add a code, in a single chain.
    low, high = _pair_f32(_code_pair(word, 0), PTX_MUL)
    total += low * x0
    total += high * x4
    low, high = _pair_f32(_code_pair(word, 1), PTX_MUL)
    total += low * x1
    total += high * x5
    low, high = _pair_f32(_code_pair(word, 2), PTX_MUL)
    total += low * x2
    total += high * x6
    low, high = _pair_f32(_code_pair(word, 3), PTX_MUL)
    total += low * x3
    return total + high * x7


@triton.jit
def _load_quad(ptrs, PTX_LOAD: tl.constexpr, STREAM: tl.constexpr = False):
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
def _load_scale_bytes(ptrs, PTX_LOAD: tl.constexpr):
    """The scale byte at each of ``ptrs`` as int32, in ``ptrs``' layout (see ``_load_quad``)."""
    if PTX_LOAD:
        return tl.inline_asm_elementwise(
            "ld.global.nc.u8 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True, pack=1
        )
    return tl.load(ptrs).to(tl.int32)


@triton.jit
def _gemv_load(w_ptrs, s_ptrs, x_ptrs, w0, BLOCK_SIZE: tl.constexpr, PTX_LOAD: tl.constexpr):
    """One step of ``_mxfp4_gemv_kernel``'s operands at word w0, per group of 4 words: the
    words ([BLOCK_N, G] each), their scale bytes, and for each word its 8 x elements as 4
    int32 pairs ([1, G] each)."""
    words = _load_quad(w_ptrs + w0, PTX_LOAD)
    xq = x_ptrs + w0 * (_CODES_PER_WORD // 2)
    x = (
        _load_quad(xq, PTX_LOAD),
        _load_quad(xq + 4, PTX_LOAD),
        _load_quad(xq + 8, PTX_LOAD),
        _load_quad(xq + 12, PTX_LOAD),
    )
    BLOCKS_PER_GROUP: tl.constexpr = 4 * _CODES_PER_WORD // BLOCK_SIZE
    s_0 = _load_scale_bytes(s_ptrs + w0 // 4 * BLOCKS_PER_GROUP, PTX_LOAD)
    if BLOCKS_PER_GROUP == 2:
        s_1 = _load_scale_bytes(s_ptrs + w0 // 4 * BLOCKS_PER_GROUP + 1, PTX_LOAD)
    else:
        s_1 = s_0
    return words, (s_0, s_1), x


@triton.jit
def _gemv_math(acc, ops, ok, BLOCK_SIZE: tl.constexpr, X_BF16: tl.constexpr, PTX_MUL: tl.constexpr):
    """Add one step's products to ``acc`` [BLOCK_N, G]: each scale block's products are
    summed in float32 before its scale multiplies them once. Groups where ``ok`` is false
    (past the end of a partial last step) add exact zeros, whatever they loaded."""
    words, scale_bytes, x = ops
    # Two blocks (BLOCK_SIZE 16) or one (32) in a group of 4 words.
    d = _word_dot(tl.zeros_like(acc), words[0], x[0], X_BF16, PTX_MUL)
    d = _word_dot(d, words[1], x[1], X_BF16, PTX_MUL)
    if BLOCK_SIZE == 4 * _CODES_PER_WORD:
        d = _word_dot(d, words[2], x[2], X_BF16, PTX_MUL)
        d = _word_dot(d, words[3], x[3], X_BF16, PTX_MUL)
        group = d * e8m0_value(scale_bytes[0])  # the scale is exact: a power of two, or NaN
    else:
        d2 = _word_dot(tl.zeros_like(acc), words[2], x[2], X_BF16, PTX_MUL)
        d2 = _word_dot(d2, words[3], x[3], X_BF16, PTX_MUL)
        group = d * e8m0_value(scale_bytes[0]) + d2 * e8m0_value(scale_bytes[1])
    return acc + tl.where(ok, group, 0.0)


@triton.jit
def _store_tile(
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
            acc = _add_bias(acc, bias_ptr, offs_n, n_ok, HAS_BIAS, W_IS_A)
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    else:
        acc = _add_bias(acc, bias_ptr, offs_n, n_ok, HAS_BIAS, W_IS_A)
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _mxfp4_gemv_kernel(
    x_ptr,
    packed_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    words_k,  # K // 8, K // BLOCK_SIZE: passed so Triton sees their divisibility
    blocks_k,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PTX_MUL: tl.constexpr,
    PTX_LOAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One row of x on the CUDA cores: BLOCK_N weight rows, BLOCK_W words (8 codes each) a step.

    Memory-bound like the decode configs, but with neither the 16-row padding of x nor
    the staging of x in shared memory for the tensor cores. Each thread takes groups of
    4 consecutive words (32 codes, 16 bytes) of its rows and the 64 bytes of x they
    multiply, so a scale block's sum never leaves the thread; every tensor is
    [BLOCK_N, BLOCK_W // 4] in one layout, and nothing moves between threads until the
    final sum over groups. K is split over SPLIT_K programs; grid axis 2 is the row of x
    (each row reads the whole weight, so the dispatch gives this kernel M = 1 only).
    ``PTX_LOAD`` makes every load a 16-byte vector load in that layout (``_load_quad``):
    K is a multiple of 32 and the launcher aligns x's rows to 16 bytes. Without it (the
    interpreter, ``QWANTIZE_HF_NO_INLINE_PTX``) plain loads read the same values, more slowly.
    """
    tl.static_assert(BLOCK_W % 4 == 0, "BLOCK_W must be whole groups of 4 words")
    tl.static_assert(4 * _CODES_PER_WORD % BLOCK_SIZE == 0, "a group of 4 words must hold whole scale blocks")
    G: tl.constexpr = BLOCK_W // 4
    BLOCKS_PER_GROUP: tl.constexpr = 4 * _CODES_PER_WORD // BLOCK_SIZE
    X_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)  # rows past N reload the last row, never stored

    # This program's words, in whole BLOCK_W steps; only the last split can end in a partial step.
    steps = tl.cdiv(words_k, BLOCK_W)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    w_begin = pid_k * steps_per_split * BLOCK_W
    w_end = min(words_k, w_begin + steps_per_split * BLOCK_W)
    w_full = w_begin + tl.maximum(w_end - w_begin, 0) // BLOCK_W * BLOCK_W

    g4 = 4 * tl.arange(0, G)  # first word of each group in a step
    w_ptrs = packed_ptr.to(tl.pointer_type(tl.int32)) + rows_n[:, None] * words_k + g4[None, :]
    s_ptrs = scales_ptr + rows_n[:, None] * blocks_k + (g4 // 4 * BLOCKS_PER_GROUP)[None, :]
    # x as int32 pairs of elements: word w's 8 elements are pairs 4w .. 4w + 3.
    x_row = (x_ptr + pid_m.to(tl.int64) * stride_xm).to(tl.pointer_type(tl.int32))
    x_ptrs = x_row + (4 * g4)[None, :]

    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if w_full > w_begin:
        # Each step's loads are issued before the previous step's arithmetic, so a warp keeps
        # a step of weight bytes in flight while it decodes.
        ops = _gemv_load(w_ptrs, s_ptrs, x_ptrs, w_begin, BLOCK_SIZE, PTX_LOAD)
        if INTERPRET:
            w0 = w_begin + BLOCK_W  # see _mxfp4_matmul_kernel: no runtime range() bound in the interpreter
            while w0 < w_full:
                next_ops = _gemv_load(w_ptrs, s_ptrs, x_ptrs, w0, BLOCK_SIZE, PTX_LOAD)
                acc = _gemv_math(acc, ops, True, BLOCK_SIZE, X_BF16, PTX_MUL)
                ops = next_ops
                w0 += BLOCK_W
        else:
            for w0 in range(w_begin + BLOCK_W, w_full, BLOCK_W):
                next_ops = _gemv_load(w_ptrs, s_ptrs, x_ptrs, w0, BLOCK_SIZE, PTX_LOAD)
                acc = _gemv_math(acc, ops, True, BLOCK_SIZE, X_BF16, PTX_MUL)
                ops = next_ops
        acc = _gemv_math(acc, ops, True, BLOCK_SIZE, X_BF16, PTX_MUL)
    if w_full < w_end:
        # The partial last step: groups past w_end read the last group (a valid address)
        # and add zeros.
        first = w_full + g4
        shift = tl.minimum(first, words_k - 4) - first  # <= 0; 0 for groups in range
        ops = _gemv_load(
            w_ptrs + shift[None, :], s_ptrs + (shift // 4 * BLOCKS_PER_GROUP)[None, :],
            x_ptrs + (4 * shift)[None, :], w_full, BLOCK_SIZE, PTX_LOAD,
        )  # fmt: skip
        acc = _gemv_math(acc, ops, (first < w_end)[None, :], BLOCK_SIZE, X_BF16, PTX_MUL)

    # A [BLOCK_N, 1] tile, indexed [n, m] like the tensor-core kernel's with the weight as A.
    offs_n64 = offs_n.to(tl.int64)[:, None]
    m64 = pid_m.to(tl.int64)
    _store_tile(
        tl.sum(acc, 1, keep_dims=True),
        bias_ptr,
        out_ptr,
        partial_ptr,
        counter_ptr,
        pid_m * tl.num_programs(0) + pid_n,
        offs_n,
        n_ok,
        n_ok[:, None],
        m64 * N + offs_n64,
        m64 * stride_om + offs_n64,
        M * N,
        pid_k,
        HAS_BIAS,
        True,
        SPLIT_K,
    )


# The warp-MMA kernel (``_mxfp4_mma_kernel``): the weight is the A operand of PTX
# mma.sync m16n8k16 (16 weight rows), 8 rows of x its B operand. Lane 4g + t of a warp
# holds A rows g and g + 8 and B column (token) g, each at 4 of the 16 k of a step; which
# 4 is the kernel's choice, as long as A and B agree.
_MMA_ROWS: tl.constexpr = tl.constexpr(16)  # weight rows of one mma
_MMA_TOKENS: tl.constexpr = tl.constexpr(8)  # x rows of one mma
_MMA_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with bf16 operands
_WORDS_PER_LANE: tl.constexpr = tl.constexpr(4)  # one 16-byte load of a weight row per lane and step
_STEP_WORDS: tl.constexpr = tl.constexpr(16)  # lanes t = 0..3 take consecutive quads: 128 codes a warp and step
_BF16_EXP_SHIFT: tl.constexpr = tl.constexpr(_BF16_MANTISSA_BITS)  # a bf16's exponent field starts at bit 7


@triton.jit
def _bf16_pair_bits(scale_bytes):
    """E8M0 scale bytes (int32) -> the scale as bfloat16 in both halves of an int32. Exact:
    byte E is 2**(E - 127); byte 0 is the bf16 subnormal 2**-127; 255 is NaN."""
    bits = tl.where(scale_bytes == 0, 0x40, tl.where(scale_bytes == 255, 0x7FC0, scale_bytes << _BF16_EXP_SHIFT))
    return bits | (bits << 16)


@triton.jit
def _mma_a(word, P: tl.constexpr, scale, PTX: tl.constexpr):
    """Codes P and P + 4 of each word times their block scale: an mma A register, bf16x2
    (``scale`` from ``_bf16_pair_bits``), or without PTX a float32 (low, high) pair (``scale``
    float32). Both are exact: a code has at most 2 significant bits, the scale is a power of two."""
    pair = _code_pair(word, P)
    if PTX:
        # fma with a -0 addend is an exact multiply (+0 stays +0, -0 stays -0); unlike
        # mul.bf16x2 (sm_90), fma.bf16x2 runs on sm_80, like mma.sync.
        a = tl.inline_asm_elementwise(
            "{ .reg .b32 t; fma.rn.bf16x2 t, $1, $2, $4; fma.rn.bf16x2 $0, t, $3, $4; }",
            "=r,r,r,r,r",
            [pair, tl.full(pair.shape, _PAIR_UNDO, tl.int32), scale, tl.full(pair.shape, _PAIR_SIGN_BITS, tl.int32)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        low, high = _pair_f32(pair, False)
        a = (low * scale, high * scale)
    return a


@triton.jit
def _halves(a, b, SELECT: tl.constexpr):
    """One ``prmt``: the low (SELECT 0x5410) or high (0x7632) 16 bits of ``a`` and of ``b``, in that order."""
    return tl.inline_asm_elementwise(
        f"prmt.b32 $0, $1, $2, {SELECT};", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _mma_b(x_quad, ok, PTX: tl.constexpr):
    """A word's 8 x elements (4 int32 pairs, memory order) -> the 4 mma B registers that meet
    ``_mma_a(word, P)`` for P = 0..3: elements P and P + 4 in the low and high half (PTX),
    else as float32 (low, high) pairs. Zeros where ``ok`` is false."""
    x0 = tl.where(ok, x_quad[0], 0)
    x1 = tl.where(ok, x_quad[1], 0)
    x2 = tl.where(ok, x_quad[2], 0)
    x3 = tl.where(ok, x_quad[3], 0)
    if PTX:
        b = (_halves(x0, x2, 0x5410), _halves(x0, x2, 0x7632), _halves(x1, x3, 0x5410), _halves(x1, x3, 0x7632))
    else:
        b = (
            ((x0 << 16).to(tl.float32, bitcast=True), (x2 << 16).to(tl.float32, bitcast=True)),
            ((x0 & _HIGH_HALF).to(tl.float32, bitcast=True), (x2 & _HIGH_HALF).to(tl.float32, bitcast=True)),
            ((x1 << 16).to(tl.float32, bitcast=True), (x3 << 16).to(tl.float32, bitcast=True)),
            ((x1 & _HIGH_HALF).to(tl.float32, bitcast=True), (x3 & _HIGH_HALF).to(tl.float32, bitcast=True)),
        )
    return b


@triton.jit
def _lane_dot(a, b):
    """Per lane (g, t): the sum of its 2 k of A register ``a`` [.., 8, 4] times those of B
    register ``b`` of every lane (n, t') with t' = t, summed over t: [.., 8 (g), 8 (n)]."""
    a_lo, a_hi = a
    b_lo, b_hi = b
    prod = a_lo[:, :, :, None, :] * b_lo[:, :, None, :, :] + a_hi[:, :, :, None, :] * b_hi[:, :, None, :, :]
    return tl.sum(prod, 4)


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c, PTX: tl.constexpr):
    """c += A @ B for one m16n8k16 per warp, over tensors [TILES, WARPS, 8 (g), 4 (t)] whose
    element [.., g, t] is lane 4g + t's register: ``mma.sync`` with PTX, else the same sums
    written out (the interpreter's path, and the specification of the lane layout)."""
    if PTX:
        d = tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            [a0, a1, a2, a3, b0, b1, c[0], c[1], c[2], c[3]],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        d = _mma_sums(a0, a1, a2, a3, b0, b1, c)
    return d


@triton.jit
def _mma_sums(a0, a1, a2, a3, b0, b1, c):
    # Row g (a0, a2) and row g + 8 (a1, a3) against token n: k 2t, 2t + 1 (a0/a1 with b0) and
    # 2t + 8, 2t + 9 (a2/a3 with b1) of every t. Lane (g, t) gets tokens 2t and 2t + 1.
    top = _lane_dot(a0, b0) + _lane_dot(a2, b1)
    bottom = _lane_dot(a1, b0) + _lane_dot(a3, b1)
    R: tl.constexpr = c[0].shape[0]
    W: tl.constexpr = c[0].shape[1]
    d0, d1 = tl.split(tl.reshape(top, [R, W, 8, 4, 2]))
    d2, d3 = tl.split(tl.reshape(bottom, [R, W, 8, 4, 2]))
    return c[0] + d0, c[1] + d1, c[2] + d2, c[3] + d3


@triton.jit
def _mma_word(acc, word_top, word_bottom, scale_top, scale_bottom, xb, TWO: tl.constexpr, PTX: tl.constexpr):
    """Add one word of each of a lane's two weight rows (8 codes each) times its x: two mma
    k-steps, codes (0, 4), (1, 5) then (2, 6), (3, 7). ``xb`` holds the word's B registers
    (``_mma_b``) for each group of 8 tokens; ``acc`` 4 float32 tensors per group."""
    a0 = _mma_a(word_top, 0, scale_top, PTX)
    a1 = _mma_a(word_bottom, 0, scale_bottom, PTX)
    a2 = _mma_a(word_top, 1, scale_top, PTX)
    a3 = _mma_a(word_bottom, 1, scale_bottom, PTX)
    a4 = _mma_a(word_top, 2, scale_top, PTX)
    a5 = _mma_a(word_bottom, 2, scale_bottom, PTX)
    a6 = _mma_a(word_top, 3, scale_top, PTX)
    a7 = _mma_a(word_bottom, 3, scale_bottom, PTX)
    c = _mma(a0, a1, a2, a3, xb[0][0], xb[0][1], (acc[0], acc[1], acc[2], acc[3]), PTX)
    c = _mma(a4, a5, a6, a7, xb[0][2], xb[0][3], c, PTX)
    if TWO:
        c2 = _mma(a0, a1, a2, a3, xb[1][0], xb[1][1], (acc[4], acc[5], acc[6], acc[7]), PTX)
        c2 = _mma(a4, a5, a6, a7, xb[1][2], xb[1][3], c2, PTX)
        c = (c[0], c[1], c[2], c[3], c2[0], c2[1], c2[2], c2[3])
    return c


@triton.jit
def _mma_load(
    w_top,
    w_bottom,
    s_top,
    s_bottom,
    x_ptrs,
    w0,
    BLOCK_SIZE: tl.constexpr,
    TWO: tl.constexpr,
    PTX: tl.constexpr,
    X_AHEAD: tl.constexpr,
):
    """One step's operands at word ``w0`` of each lane's quad: the 4 words of its two rows,
    their scale bytes (1 or 2 a row), and with ``X_AHEAD`` x (``_mma_load_x``), else ``w0``
    for ``_mma_math`` to load x itself."""
    # The weight is read once: not kept in L1, which x, read by every program, then has to itself.
    top = _load_quad(w_top + w0, PTX, True)
    bottom = _load_quad(w_bottom + w0, PTX, True)
    BLOCKS: tl.constexpr = _WORDS_PER_LANE * _CODES_PER_WORD // BLOCK_SIZE
    s0 = w0 // _WORDS_PER_LANE * BLOCKS
    if BLOCKS == 1:
        scales = (_load_scale_bytes(s_top + s0, PTX), _load_scale_bytes(s_bottom + s0, PTX))
    else:
        scales = (
            _load_scale_bytes(s_top + s0, PTX),
            _load_scale_bytes(s_bottom + s0, PTX),
            _load_scale_bytes(s_top + s0 + 1, PTX),
            _load_scale_bytes(s_bottom + s0 + 1, PTX),
        )
    if X_AHEAD:
        x = _mma_load_x(x_ptrs, w0, TWO, PTX)
    else:
        x = w0
    return top, bottom, scales, x


@triton.jit
def _mma_load_x(x_ptrs, w0, TWO: tl.constexpr, PTX: tl.constexpr):
    """Per group of 8 tokens, the 32 x elements of each lane's quad at word ``w0``: 4 quads of int32 pairs."""
    xq = x_ptrs[0] + w0 * (_CODES_PER_WORD // 2)
    x = ((_load_quad(xq, PTX), _load_quad(xq + 4, PTX), _load_quad(xq + 8, PTX), _load_quad(xq + 12, PTX)),)
    if TWO:
        xq = x_ptrs[1] + w0 * (_CODES_PER_WORD // 2)
        x = (
            x[0],
            (_load_quad(xq, PTX), _load_quad(xq + 4, PTX), _load_quad(xq + 8, PTX), _load_quad(xq + 12, PTX)),
        )
    return x


@triton.jit
def _mma_scale(scale_bytes, ok, PTX: tl.constexpr):
    """Scale bytes -> ``_mma_a``'s scale operand; 0 where ``ok`` is false (a quad past the
    end: its codes, whatever they are, then add exact zeros)."""
    if PTX:
        scale = tl.where(ok, _bf16_pair_bits(scale_bytes), 0)
    else:
        scale = tl.where(ok, e8m0_value(scale_bytes), 0.0)
    return scale


@triton.jit
def _mma_math(
    acc, ops, x_ptrs, ok, BLOCK_SIZE: tl.constexpr, TWO: tl.constexpr, PTX: tl.constexpr, X_AHEAD: tl.constexpr
):
    """Add one step's products to ``acc``. Quads where ``ok`` is false add exact zeros: their
    scales and x are zeroed (a clamped address may hold any code, scale or x)."""
    top, bottom, scales, x = ops
    if not X_AHEAD:
        x = _mma_load_x(x_ptrs, x, TWO, PTX)
    BLOCKS: tl.constexpr = _WORDS_PER_LANE * _CODES_PER_WORD // BLOCK_SIZE
    st0 = _mma_scale(scales[0], ok, PTX)
    sb0 = _mma_scale(scales[1], ok, PTX)
    if BLOCKS == 1:
        st1 = st0
        sb1 = sb0
    else:
        st1 = _mma_scale(scales[2], ok, PTX)
        sb1 = _mma_scale(scales[3], ok, PTX)
    xb0 = (_mma_b(x[0][0], ok, PTX),)
    xb1 = (_mma_b(x[0][1], ok, PTX),)
    xb2 = (_mma_b(x[0][2], ok, PTX),)
    xb3 = (_mma_b(x[0][3], ok, PTX),)
    if TWO:
        xb0 = (xb0[0], _mma_b(x[1][0], ok, PTX))
        xb1 = (xb1[0], _mma_b(x[1][1], ok, PTX))
        xb2 = (xb2[0], _mma_b(x[1][2], ok, PTX))
        xb3 = (xb3[0], _mma_b(x[1][3], ok, PTX))
    acc = _mma_word(acc, top[0], bottom[0], st0, sb0, xb0, TWO, PTX)
    acc = _mma_word(acc, top[1], bottom[1], st0, sb0, xb1, TWO, PTX)
    acc = _mma_word(acc, top[2], bottom[2], st1, sb1, xb2, TWO, PTX)
    return _mma_word(acc, top[3], bottom[3], st1, sb1, xb3, TWO, PTX)


@triton.jit
def _mxfp4_mma_kernel(
    x_ptr,
    packed_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    words_k,  # K // 8, K // BLOCK_SIZE: passed so Triton sees their divisibility
    blocks_k,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    TILES: tl.constexpr,
    WARPS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    X_AHEAD: tl.constexpr,
    PTX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """A few rows of x (TOKENS = 8 or 16 a program) on the tensor cores through warp-level
    mma.sync, every operand loaded straight into the registers that feed it.

    Each warp owns TILES tiles of 16 weight rows; lane 4g + t loads 16 bytes (32 codes,
    whole scale blocks) of rows g and g + 8 of each tile, and the 64 bytes of x of token g
    (and g + 8) they multiply. It turns the codes into bf16 in registers, already scaled,
    and each word makes two mma k-steps. No shared memory, no barrier in the loop, and no
    value moves between lanes but inside the mma. The WARPS warps of a program take
    consecutive 128-code slices of K, and their float32 sums are added once at the end; K is
    also split over SPLIT_K programs. Every tensor is [TILES, WARPS, 8, 4] (tile, warp, g, t)
    in Triton's default layout, which puts element [r, w, g, t] in lane 4g + t of warp w:
    the layout the mma's operands need. Needs K % 32 == 0 and bf16 x. Without ``PTX`` (the
    interpreter) the loads are plain and the mma is written out as sums (``_mma``).
    """
    tl.static_assert(_WORDS_PER_LANE * _CODES_PER_WORD % BLOCK_SIZE == 0, "a quad must hold whole scale blocks")
    tl.static_assert(TOKENS == _MMA_TOKENS or TOKENS == 2 * _MMA_TOKENS, "TOKENS is 8 or 16")
    BLOCKS: tl.constexpr = _WORDS_PER_LANE * _CODES_PER_WORD // BLOCK_SIZE
    ROWS: tl.constexpr = _MMA_ROWS * TILES
    TWO: tl.constexpr = TOKENS == 2 * _MMA_TOKENS  # two groups of 8 tokens
    STEP: tl.constexpr = _STEP_WORDS * WARPS  # words of K a program takes a step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    r = tl.arange(0, TILES)[:, None, None, None]
    w = tl.arange(0, WARPS)[None, :, None, None]
    g = tl.arange(0, 8)[None, None, :, None]
    t = tl.arange(0, 4)[None, None, None, :]
    row = pid_n * ROWS + _MMA_ROWS * r + g  # the lane's top row; its bottom row is row + 8
    # Rows past N reload the last row (their results are never stored); tokens past M the last token.
    row_top = tl.minimum(row, N - 1).to(tl.int64)
    row_bottom = tl.minimum(row + 8, N - 1).to(tl.int64)
    quad = _STEP_WORDS * w + _WORDS_PER_LANE * t  # the lane's first word in a step, [1, WARPS, 1, 4]

    # This program's words, in whole steps; only the last split can end in a partial step.
    steps = tl.cdiv(words_k, STEP)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    w_begin = pid_k * steps_per_split * STEP
    w_end = min(words_k, w_begin + steps_per_split * STEP)
    w_full = w_begin + tl.maximum(w_end - w_begin, 0) // STEP * STEP

    words = packed_ptr.to(tl.pointer_type(tl.int32))
    w_top = words + row_top * words_k + quad
    w_bottom = words + row_bottom * words_k + quad
    s_top = scales_ptr + row_top * blocks_k + quad // _WORDS_PER_LANE * BLOCKS
    s_bottom = scales_ptr + row_bottom * blocks_k + quad // _WORDS_PER_LANE * BLOCKS
    token = pid_m * TOKENS + g  # [1, 1, 8, 1]
    x_i32 = x_ptr.to(tl.pointer_type(tl.int32))
    # x as int32 pairs of elements: word q's 8 elements are pairs 4q .. 4q + 3.
    x_first = x_i32 + tl.minimum(token, M - 1).to(tl.int64) * (stride_xm // 2) + 4 * quad
    if TWO:
        x_second = x_i32 + tl.minimum(token + _MMA_TOKENS, M - 1).to(tl.int64) * (stride_xm // 2) + 4 * quad
        x_ptrs = (x_first, x_second)
        zero = tl.zeros((TILES, WARPS, 8, 4), dtype=tl.float32)
        acc = (zero, zero, zero, zero, zero, zero, zero, zero)
    else:
        x_ptrs = (x_first,)
        zero = tl.zeros((TILES, WARPS, 8, 4), dtype=tl.float32)
        acc = (zero, zero, zero, zero)

    if w_full > w_begin:
        # Each step's loads are issued before the previous step's arithmetic.
        ops = _mma_load(w_top, w_bottom, s_top, s_bottom, x_ptrs, w_begin, BLOCK_SIZE, TWO, PTX, X_AHEAD)
        if INTERPRET:
            w0 = w_begin + STEP  # see _mxfp4_matmul_kernel: no runtime range() bound in the interpreter
            while w0 < w_full:
                next_ops = _mma_load(w_top, w_bottom, s_top, s_bottom, x_ptrs, w0, BLOCK_SIZE, TWO, PTX, X_AHEAD)
                acc = _mma_math(acc, ops, x_ptrs, True, BLOCK_SIZE, TWO, PTX, X_AHEAD)
                ops = next_ops
                w0 += STEP
        else:
            for w0 in range(w_begin + STEP, w_full, STEP):
                next_ops = _mma_load(w_top, w_bottom, s_top, s_bottom, x_ptrs, w0, BLOCK_SIZE, TWO, PTX, X_AHEAD)
                acc = _mma_math(acc, ops, x_ptrs, True, BLOCK_SIZE, TWO, PTX, X_AHEAD)
                ops = next_ops
        acc = _mma_math(acc, ops, x_ptrs, True, BLOCK_SIZE, TWO, PTX, X_AHEAD)
    if w_full < w_end:
        # The partial last step: quads past w_end read the last quad (a valid address) and add zeros.
        first = w_full + quad
        shift = tl.minimum(first, words_k - _WORDS_PER_LANE) - first  # <= 0; 0 for quads in range
        x_shift = (x_ptrs[0] + 4 * shift,)
        if TWO:
            x_shift = (x_shift[0], x_ptrs[1] + 4 * shift)
        ops = _mma_load(
            w_top + shift, w_bottom + shift, s_top + shift // _WORDS_PER_LANE * BLOCKS,
            s_bottom + shift // _WORDS_PER_LANE * BLOCKS, x_shift, w_full, BLOCK_SIZE, TWO, PTX, X_AHEAD,
        )  # fmt: skip
        acc = _mma_math(acc, ops, x_shift, first < w_end, BLOCK_SIZE, TWO, PTX, X_AHEAD)

    # Lane (g, t) holds tokens 2t, 2t + 1 (+ 8 for the second group) of rows g (acc 0, 1)
    # and g + 8 (acc 2, 3) of each tile: sum the warps, then one [TILES, 8, 4, 2, 2, groups] tile.
    top = tl.join(tl.sum(acc[0], 1), tl.sum(acc[1], 1))
    bottom = tl.join(tl.sum(acc[2], 1), tl.sum(acc[3], 1))
    tile = tl.join(top, bottom)  # [TILES, 8, 4, 2 (token), 2 (row)]
    r5 = tl.arange(0, TILES)[:, None, None, None, None]
    g5 = tl.arange(0, 8)[None, :, None, None, None]
    t5 = tl.arange(0, 4)[None, None, :, None, None]
    i5 = tl.arange(0, 2)[None, None, None, :, None]
    h5 = tl.arange(0, 2)[None, None, None, None, :]
    rows = pid_n * ROWS + _MMA_ROWS * r5 + g5 + 8 * h5
    tokens = pid_m * TOKENS + 2 * t5 + i5
    if TWO:
        top = tl.join(tl.sum(acc[4], 1), tl.sum(acc[5], 1))
        bottom = tl.join(tl.sum(acc[6], 1), tl.sum(acc[7], 1))
        tile = tl.join(tile, tl.join(top, bottom))
        rows = rows[:, :, :, :, :, None]
        tokens = tokens[:, :, :, :, :, None] + _MMA_TOKENS * tl.arange(0, 2)[None, None, None, None, None, :]
    rows_ok = rows < N
    if HAS_BIAS:
        # Added once: by the first of the SPLIT_K programs, before the partials are summed.
        if pid_k == 0:
            tile += tl.load(bias_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)
    tokens64 = tokens.to(tl.int64)
    tile_mask = rows_ok & (tokens < M)
    _store_tile(
        tile,
        bias_ptr,
        out_ptr,
        partial_ptr,
        counter_ptr,
        pid_m * tl.num_programs(0) + pid_n,
        rows,
        rows_ok,
        tile_mask,
        tokens64 * N + rows64,
        tokens64 * stride_om + rows64,
        M * N,
        pid_k,
        False,
        False,
        SPLIT_K,
    )


@triton.jit
def _mxfp4_matmul_kernel(
    x_ptr,
    packed_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    half_k,  # K // 2, K // 8, K // BLOCK_SIZE: passed so Triton sees their divisibility
    words_k,
    blocks_k,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_N: tl.constexpr,
    W_IS_A: tl.constexpr,
    WORDS: tl.constexpr,
    PERMUTE_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # The word path makes bf16 weights; fp16 activations take the byte path.
    USE_WORDS: tl.constexpr = WORDS and x_ptr.dtype.element_ty == tl.bfloat16
    # Tile order: GROUP_N weight tiles meet every x tile before the next group starts,
    # so a group's packed weight stays in L2 while x streams past it.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tiles_m
    group = pid // per_group
    first_n = group * GROUP_N
    group_n = min(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_m = (pid % per_group) // group_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Weight rows past the end load the last row again (their results are never stored),
    # so weight loads need no row mask. Rows of x past M are masked instead: a decode
    # tile pads 1-16 rows to 16, and loading the last row 16 times moved as many bytes
    # as the weight tile itself.
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)

    # This program's share of K, in whole BLOCK_K steps; only the last split can end in a partial step.
    steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = min(K, k_begin + steps_per_split * BLOCK_K)
    k_full = k_begin + tl.maximum(k_end - k_begin, 0) // BLOCK_K * BLOCK_K

    x_rows = x_ptr + rows_m[:, None] * stride_xm
    s_rows = scales_ptr + rows_n[:, None] * blocks_k
    if USE_WORDS:
        w_rows = packed_ptr.to(tl.pointer_type(tl.int32)) + rows_n[:, None] * words_k
    else:
        w_rows = packed_ptr + rows_n[:, None] * half_k

    if W_IS_A:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRET:
        # The interpreter cannot take a runtime range() bound (numpy >= 2 refuses int() of
        # its 1-element scalars); a while loop runs the same steps but is not
        # software-pipelined, so the GPU build keeps the for loop.
        k0 = k_begin
        while k0 < k_full:
            acc = _k_step(
                acc, x_rows, m_ok, w_rows, s_rows, k0, k_end, BLOCK_K, BLOCK_SIZE, W_IS_A, USE_WORDS, PERMUTE_K,
                False, True,
            )  # fmt: skip
            k0 += BLOCK_K
    else:
        for k0 in range(k_begin, k_full, BLOCK_K):
            acc = _k_step(
                acc, x_rows, m_ok, w_rows, s_rows, k0, k_end, BLOCK_K, BLOCK_SIZE, W_IS_A, USE_WORDS, PERMUTE_K,
                False, False,
            )  # fmt: skip
    if k_full < k_end:
        acc = _k_step(
            acc,
            x_rows,
            m_ok,
            w_rows,
            s_rows,
            k_full,
            k_end,
            BLOCK_K,
            BLOCK_SIZE,
            W_IS_A,
            USE_WORDS,
            PERMUTE_K,
            True,
            INTERPRET,
        )

    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    # acc indexed [n, m] when W_IS_A, else [m, n]; build matching offsets and masks once.
    if W_IS_A:
        tile_mask = n_ok[:, None] & m_ok[None, :]
        tile_off = offs_m64[None, :] * N + offs_n64[:, None]
        out_off = offs_m64[None, :] * stride_om + offs_n64[:, None]
    else:
        tile_mask = m_ok[:, None] & n_ok[None, :]
        tile_off = offs_m64[:, None] * N + offs_n64[None, :]
        out_off = offs_m64[:, None] * stride_om + offs_n64[None, :]

    _store_tile(
        acc,
        bias_ptr,
        out_ptr,
        partial_ptr,
        counter_ptr,
        pid_m * tiles_n + pid_n,
        offs_n,
        n_ok,
        tile_mask,
        tile_off,
        out_off,
        M * N,
        pid_k,
        HAS_BIAS,
        W_IS_A,
        SPLIT_K,
    )


def _config(block_m, block_n, block_k, split_k, w_is_a, words, permute_k, warps, stages, group_n=1) -> triton.Config:
    return triton.Config(
        {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "SPLIT_K": split_k,
            "GROUP_N": group_n,
            "W_IS_A": w_is_a,
            "WORDS": words,
            "PERMUTE_K": permute_k,
        },
        num_warps=warps,
        num_stages=stages,
    )


# Small on purpose: every config is compiled on first use of each dtype. The decode set is
# the winners of eval/sweep_decode.py over 100 configs on the H100
# (eval/results/sweep_decode_h100.md): 64/256/4 is within 15% of the best everywhere;
# 128/128/8 wins where N = 4096 (few output tiles, so K is split wide); the split-1 ones
# win where N = 14336 and need no partial sums.
DECODE_CONFIGS = (
    _config(_DECODE_BLOCK_M, 64, 256, 4, True, True, True, 4, 3),
    _config(_DECODE_BLOCK_M, 128, 128, 8, True, True, True, 4, 4),
    _config(_DECODE_BLOCK_M, 64, 128, 4, True, True, True, 4, 3),
    _config(_DECODE_BLOCK_M, 64, 256, 1, True, True, True, 4, 3),
    _config(_DECODE_BLOCK_M, 128, 256, 1, True, True, True, 8, 3),
)
PREFILL_CONFIGS = (
    # The weight as the register operand of wgmma: its dequantization overlaps the previous
    # step's asynchronous matrix product instead of waiting for a shared-memory buffer.
    _config(64, 128, 128, 1, True, True, True, 8, 3, group_n=8),
    _config(128, 128, 128, 1, True, True, True, 8, 3, group_n=8),
    _config(256, 128, 64, 1, False, True, False, 8, 3, group_n=8),
)


def _gemv_config(block_n, block_w, split_k, warps, stages) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_W": block_w, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages
    )


# BLOCK_N / BLOCK_W (words of 8 codes) / SPLIT_K, warps: the winners of `eval/sweep_decode.py
# --kernels gemv` at M = 1 on the H100 (eval/results/sweep_gemv_h100.md), 8/128/4 warps
# within 4% of the best on the four large Llama-3-8B shapes; 4/256 wins on the k/v projections
# (1024x4096). All split 1: K is shared by the threads of one program, so no partial sums
# and no arrival counters to zero before each call. Stages do not apply with the PTX loads
# (the kernel issues each step's loads before the previous step's math itself); the plain
# tl.load path (QWANTIZE_HF_NO_INLINE_PTX) runs unpipelined with these configs.
GEMV_CONFIGS = (
    _gemv_config(8, 128, 1, 4, 1),
    _gemv_config(16, 128, 1, 8, 1),
    _gemv_config(8, 64, 1, 2, 1),
    _gemv_config(16, 256, 1, 8, 1),
    _gemv_config(4, 256, 1, 4, 1),
)


def _mma_config(tiles, warps, split_k, x_ahead=True) -> triton.Config:
    return triton.Config(
        {"TILES": tiles, "WARPS": warps, "SPLIT_K": split_k, "X_AHEAD": x_ahead},
        num_warps=warps,
        num_stages=1,
    )


# TILES (of 16 weight rows a warp) / WARPS (K slices of a program) / SPLIT_K, x loaded a step
# ahead or not: the winners of `eval/sweep_decode.py --kernels mma` at M = 1, 4, 8 and 16 on the
# H100 (eval/results/sweep_mma_h100.md).
MMA_CONFIGS = (
    _mma_config(1, 4, 1, x_ahead=False),
    _mma_config(1, 8, 1),
    _mma_config(1, 8, 1, x_ahead=False),
    _mma_config(2, 4, 1),
    _mma_config(2, 2, 2, x_ahead=False),
    _mma_config(2, 4, 2),
)
MMA_MAX_M = 16  # rows of x up to which the warp-MMA kernel competes


def is_gemv_config(config: triton.Config) -> bool:
    """Whether ``config`` is one for ``_mxfp4_gemv_kernel``."""
    return "BLOCK_W" in config.kwargs


def is_mma_config(config: triton.Config) -> bool:
    """Whether ``config`` is one for ``_mxfp4_mma_kernel``."""
    return "TILES" in config.kwargs


def _mma_tokens(m: int) -> int:
    """Rows of x a program of ``_mxfp4_mma_kernel`` takes: one or two mma groups of 8."""
    return 8 if m <= 8 else 16


def _output_tiles(m: int, n: int, config: triton.Config) -> int:
    """Output tiles (programs per K split) of a launch of ``config`` on an [m, n] output."""
    if is_mma_config(config):
        return triton.cdiv(m, _mma_tokens(m)) * triton.cdiv(n, 16 * config.kwargs["TILES"])
    # A GEMV config's tiles are one row of x high.
    return triton.cdiv(m, config.kwargs.get("BLOCK_M", 1)) * triton.cdiv(n, config.kwargs["BLOCK_N"])


def _gemv_fits(m: int, k: int) -> bool:
    """Whether the CUDA-core kernel can take an [m, k] x in the dispatch (``_candidates``)."""
    return m <= GEMV_MAX_M and k % GEMV_K_MULTIPLE == 0


def _gemv_x(x: torch.Tensor) -> torch.Tensor:
    """``x`` for the CUDA-core and warp-MMA kernels, which read it 16 bytes at a time (as int32
    pairs of elements): its rows must start 16-byte aligned. A fresh copy's do (K % 32 == 0); a
    decode step's x is small."""
    if x.data_ptr() % 16 or (x.shape[0] > 1 and x.stride(0) * x.element_size() % 16):
        return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return x


def _m_bucket(m: int) -> int:
    """The dispatch's key for M: one choice per power of two, so new prompt lengths don't choose again."""
    return 1 << max(m - 1, 0).bit_length()


def split_k_workspace(
    m: int, n: int, configs: tuple[triton.Config, ...], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float32 partials and zeroed arrival counters for split-K launches of ``configs`` on an [m, n] output."""
    max_split = max(cfg.kwargs["SPLIT_K"] for cfg in configs)
    if max_split == 1:
        # A split-1 launch touches neither buffer: None for both (Triton compiles the launch
        # without them), so no allocation and no memset of counters. Not a cached placeholder
        # either: a tensor allocated during CUDA-graph warm-up belongs to the graph's memory
        # pool, and torch.compile's CUDA graphs refuse live pool tensors they do not track.
        return None, None
    most_tiles = max(_output_tiles(m, n, c) for c in configs)
    partial = torch.empty(max_split * m * n, dtype=torch.float32, device=device)
    counters = torch.zeros(most_tiles, dtype=torch.int32, device=device)
    return partial, counters


def mxfp4_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    config: triton.Config | None = None,
    workspace: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``x [M, K] @ dequant(packed [N, K/2], scales [N, K/block_size]).T + bias`` in ``x.dtype``.

    ``x`` (bf16 or fp16) must be contiguous along K, ``packed`` and ``scales`` contiguous;
    shapes are assumed checked (see ``qwantize_hf.matmul``). ``config`` forces one kernel
    config (benchmarks, tests: a ``GEMV_CONFIGS`` one runs the CUDA-core kernel, an
    ``MMA_CONFIGS`` one the warp-MMA kernel, others the tensor-core one). None picks by M,
    once per shape (``_choose``): the fastest config of the kernels that can take it.
    ``workspace``: (float32 split-K partials, zeroed int32 arrival counters) to use instead of
    fresh ones, large enough for every config that may run (``split_k_workspace``); for
    benchmarks that time the kernel alone. The kernel leaves the counters at zero again.
    """
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device, and _choose's timing runs there too.
        with torch.cuda.device(x.device):
            return mxfp4_matmul_triton(x, packed, scales, bias, block_size, config, workspace)
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    if packed.data_ptr() % 16:
        packed = packed.clone()  # word loads need a 16-byte aligned start; a fresh allocation has one
    operands = (x, packed, scales, bias, out, block_size, workspace)
    # Remembered launches (_Launcher) are for dispatched calls of decode sizes on a GPU, where
    # host time counts and M takes few values (a launch key per exact M).
    if config is not None or workspace is not None or not x.is_cuda or m > DECODE_MAX_M:
        _launch(operands, config or _dispatch(operands))
        return out
    # The choice is made once per key (_dispatch), and a call whose arguments look like an
    # earlier one's, to Triton's specialization, starts that call's compiled kernel directly,
    # with no tuning or argument binding on the way.
    launch_key = _launch_key(x, packed, scales, bias, block_size)
    launcher = _LAUNCHERS.get(launch_key)
    if launcher is not None and _CHOSEN.get(launcher.choice_key) is launcher.config:
        launcher(x, packed, scales, bias, out)
        return out
    config = _dispatch(operands)
    launch = _launch(operands, config)
    if launcher is not None or launch_key not in _LAUNCHERS:
        # None under a Triton this was not tested with: never tried again.
        _LAUNCHERS[launch_key] = _Launcher.make(launch, config, _choice_key(operands))
    return out


def _launch_key(x, packed, scales, bias, block_size) -> tuple:
    """``_LAUNCHERS``' key: everything a launch's compiled kernel depends on but the config
    (chosen per ``_choice_key``, which this determines): exact sizes and x's row stride, and
    the dtype and 16-byte alignment of each tensor (Triton specializes pointers on it). The
    output and split-K buffers are fresh allocations (aligned), ``packed`` aligned by the caller."""
    m, k = x.shape
    aligned = (x.data_ptr() % 16 == 0, scales.data_ptr() % 16 == 0, bias is None or bias.data_ptr() % 16 == 0)
    dtypes = (x.dtype, packed.dtype, scales.dtype, None if bias is None else bias.dtype)
    return (m, packed.shape[0], k, x.stride(0), block_size, aligned, dtypes, x.device)


def _choice_key(operands) -> tuple:
    """``_CHOSEN``'s key for these operands."""
    x, packed, _, bias, _, block_size, _ = operands
    m, k = x.shape
    return (_m_bucket(m), packed.shape[0], k, bias is not None, block_size, x.dtype, x.device)


def _dispatch(operands) -> triton.Config:
    """The config ``_choose`` chose for these operands' key, choosing it on first use."""
    key = _choice_key(operands)
    config = _CHOSEN.get(key)
    if config is None:
        config = _CHOSEN[key] = _choose(operands)
    return config


def _candidates(m: int, k: int, x: torch.Tensor) -> tuple[triton.Config, ...]:
    """The configs of every kernel that may take an [m, k] x."""
    mma = m <= MMA_MAX_M and k % GEMV_K_MULTIPLE == 0 and x.dtype == torch.bfloat16
    mma = mma and inline_ptx_allowed(x.device, _MMA_CAPABILITY)  # its plain-op twin is for the interpreter
    if _gemv_fits(m, k):
        return GEMV_CONFIGS + (MMA_CONFIGS if mma else ())
    if m <= DECODE_MAX_M:
        return (MMA_CONFIGS if mma else ()) + DECODE_CONFIGS
    return PREFILL_CONFIGS


_CHOOSE_REPEATS = 40
_HOST_COVER_CYCLES = 400_000  # GPU clock cycles (about 0.2 ms) per candidate: its flush and launch on the host


def _choose(operands) -> triton.Config:
    """The fastest config for these operands' shape, timed as whole calls (a fresh split-K
    workspace included) with a cold L2, as in a model's forward pass, where a layer's weight
    has left L2 before it is read again. The candidates take turns, each after an L2 flush
    that only reads (Triton's autotuner flushes by writing, and the write-back of the
    flush then competes with the timed kernel), and each gets the median of its times.
    A config that fails to build or run here (registers, shared memory, PTX) is skipped.
    Under the interpreter (CPU tensors) the first candidate that runs is taken, untimed."""
    x = operands[0]
    m, k = x.shape
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"mxfp4 matmul: the first call for an input of {m} rows and {k} features ({x.dtype}) with this "
            "weight shape came inside CUDA-graph capture, where its kernel cannot be chosen (that times the "
            "candidates). Call the model once on inputs of the same shape before capturing (a warm-up step), "
            "as torch.compile's CUDA graphs do."
        )
    candidates, failures = [], []
    for config in _candidates(m, k, x):
        try:
            _launch(operands, config)  # compiles it
        except Exception as exc:  # does not fit this GPU, or its PTX does not build for it: skipped
            failures.append(f"{config}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        candidates.append(config)
    if not candidates:
        raise RuntimeError("mxfp4 matmul: no kernel config could run here:\n" + "\n".join(failures))
    if len(candidates) == 1 or not x.is_cuda:
        return candidates[0]
    try:
        size = 2 * torch.cuda.get_device_properties(x.device).L2_cache_size
        flush = torch.empty(size // 4, dtype=torch.int32, device=x.device)
    except torch.cuda.OutOfMemoryError:
        flush = None  # timed with whatever L2 holds: a worse choice, not a failed call
    times = [[] for _ in candidates]
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in candidates]
    for _ in range(_CHOOSE_REPEATS):
        # The GPU spins while the host queues a round, so no launch waits on the host: a
        # kernel of a few microseconds takes less time than its launch takes on the host,
        # and timed back to back with the host in the loop, host time would decide.
        torch.cuda._sleep(_HOST_COVER_CYCLES * len(candidates))
        for i, config in enumerate(candidates):
            if flush is not None:
                flush.amax()
            events[i][0].record()
            _launch(operands, config)
            events[i][1].record()
        events[-1][1].synchronize()
        for i in range(len(candidates)):
            times[i].append(events[i][0].elapsed_time(events[i][1]))
    medians = [sorted(t)[len(t) // 2] for t in times]
    return candidates[medians.index(min(medians))]


def _launch(operands, config: triton.Config) -> tuple:
    """One launch of ``config`` on ``mxfp4_matmul_triton``'s operands. Returns the launch:
    the kernel, grid, arguments, keyword arguments, and what Triton's launch returned (on a
    GPU, the compiled kernel)."""
    kernel, grid, args, kwargs = _launch_args(operands, config)
    return kernel, grid, args, kwargs, kernel[grid](*args, **kwargs)


def _launch_args(operands, config: triton.Config):
    """The kernel, grid, arguments and keyword arguments of a launch of ``config`` on these operands."""
    x, packed, scales, bias, out, block_size, workspace = operands
    m, k = x.shape
    n = packed.shape[0]
    gemv = is_gemv_config(config)
    mma = is_mma_config(config)
    if gemv and k % GEMV_K_MULTIPLE:
        raise ValueError(f"the CUDA-core (GEMV) configs need K a multiple of {GEMV_K_MULTIPLE}, got K = {k}")
    if mma and (k % GEMV_K_MULTIPLE or x.dtype != torch.bfloat16):
        raise ValueError(
            f"the warp-MMA configs need bf16 x and K a multiple of {GEMV_K_MULTIPLE}, got {x.dtype} and K = {k}"
        )
    if gemv or mma:
        x = _gemv_x(x)
    # Split-K arrival counters, one per output tile, fresh for every call: a buffer shared
    # between calls would be shared by calls on concurrent streams too.
    if workspace is None:
        partial, counters = split_k_workspace(m, n, (config,), x.device)
    else:
        partial, counters = workspace
        split = config.kwargs["SPLIT_K"]
        if split > 1 and (partial.numel() < split * m * n or counters.numel() < _output_tiles(m, n, config)):
            raise ValueError(f"workspace too small for {config}: make it with split_k_workspace for every config")
    common = (x, packed, scales, bias if bias is not None else out, out, partial, counters, m, n)
    kwargs = {"HAS_BIAS": bias is not None, "BLOCK_SIZE": block_size, "INTERPRET": _interpreting()}
    meta = config.kwargs
    if gemv or mma:
        args = (*common, k // 8, k // block_size, x.stride(0), n)
    else:
        args = (*common, k, k // 2, k // 8, k // block_size, x.stride(0), n)
    if gemv:
        kwargs["PTX_MUL"] = inline_ptx_allowed(x.device, _BF16X2_MUL_CAPABILITY)
        kwargs["PTX_LOAD"] = inline_ptx_allowed(x.device, _VECTOR_LOAD_CAPABILITY)
        kernel, grid = _mxfp4_gemv_kernel, (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)
    elif mma:
        tokens = _mma_tokens(m)
        kwargs["TOKENS"] = tokens
        kwargs["PTX"] = inline_ptx_allowed(x.device, _MMA_CAPABILITY)
        grid = (triton.cdiv(n, 16 * meta["TILES"]), meta["SPLIT_K"], triton.cdiv(m, tokens))
        kernel = _mxfp4_mma_kernel
    else:
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        kernel = _mxfp4_matmul_kernel
    kwargs.update(meta, num_warps=config.num_warps, num_stages=config.num_stages)
    return kernel, grid, args, kwargs


# The tensors every kernel takes first: x, packed, scales, bias (or out), out, split-K partials and counters.
_TENSOR_ARGS = 7


# Triton versions whose compiled kernels' launcher _Launcher calls the way JITFunction.run does.
_LAUNCHER_TRITON = ("3.6",)


class _Launcher:
    """A dispatched call's launch, remembered: the compiled kernel of its config, started through
    the launcher Triton compiled for it, with the arguments in the order Triton's own launch
    passes them. ``kernel[grid](...)`` binds and specializes every argument on every call; in
    eager decoding that host time is most of a call's (eval/bench_op_overhead.py). A launcher is
    kept per exact launch key (sizes, x's row stride, and the dtype and 16-byte alignment of
    every tensor: finer than Triton's specialization, see the tests, so the compiled kernel is
    the one Triton would pick); per call only the tensors change. Like the dispatch's choice,
    what a first call read from the environment (QWANTIZE_HF_NO_INLINE_PTX, Triton's debug
    knobs) holds for later calls with its key; Triton's pre-run hooks and its check that the
    kernels' global constants did not change are skipped (these kernels have neither)."""

    __slots__ = ("choice_key", "config", "_compiled", "_grid", "_fixed", "_rows16", "_split", "_device", "_stream")

    @classmethod
    def make(cls, launch: tuple, config: triton.Config, choice_key: tuple) -> _Launcher | None:
        """A launcher for a launch ``_launch`` just made on a GPU, or None under a Triton
        version not in ``_LAUNCHER_TRITON`` (the dispatch then launches through Triton)."""
        kernel, grid, args, kwargs, compiled = launch
        if not triton.__version__.startswith(_LAUNCHER_TRITON):
            return None
        values = dict(zip(kernel.arg_names, args))
        values.update(kwargs)
        self = cls()
        self.choice_key = choice_key
        self.config = config
        self._compiled = compiled
        self._grid = (*grid, 1, 1)[:3]  # the tensor-core kernel's grid has two axes
        self._fixed = tuple(values[name] for name in kernel.arg_names[_TENSOR_ARGS:])
        self._rows16 = is_gemv_config(config) or is_mma_config(config)
        self._split = config.kwargs["SPLIT_K"]
        self._device = args[0].device
        # Triton's own way to the current stream (torch's raw stream handle, for a device index).
        get_stream = triton.runtime.driver.active.get_current_stream
        index = self._device.index
        self._stream = lambda: get_stream(index)
        return self

    def __call__(self, x, packed, scales, bias, out) -> None:
        m, n = out.shape
        if self._rows16:
            x = _gemv_x(x)
        if self._split > 1:
            partial, counters = split_k_workspace(m, n, (self.config,), self._device)
        else:
            partial = counters = None
        args = (x, packed, scales, bias if bias is not None else out, out, partial, counters, *self._fixed)
        compiled, grid = self._compiled, self._grid
        stream = self._stream()
        hooks = triton.knobs.runtime
        compiled.run(
            grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata(grid, stream, *args), hooks.launch_enter_hook, hooks.launch_exit_hook, *args,
        )  # fmt: skip


# (M bucket, N, K, bias?, block size, dtype, device) -> the config ``_choose`` chose for it.
_CHOSEN: dict[tuple, triton.Config] = {}
# mxfp4_matmul_triton's launch key -> the launcher of its last dispatched call with that key.
_LAUNCHERS: dict[tuple, _Launcher | None] = {}
