"""The fused MXFP4 matmul for a few rows of x through warp-level ``mma.sync`` (``_mxfp4_mma_kernel``).

``y = x @ dequant(W).T (+ bias)`` for M <= 16 with bf16 x: the weight is the A operand of
``mma.sync`` (16 rows), 8 rows of x its B operand; every operand is loaded straight into
the registers the mma reads, so there is no shared memory and no barrier in the loop.
Fastest at M = 2..8 on every Llama-3-8B shape and at M = 1 on some. Without inline PTX (the
interpreter) the same lane layout runs as plain sums. Its torch twin is
``dequantize_blocks_torch`` followed by ``F.linear``; the shared decode helpers are in
``mx_decode``. This module holds the kernel, its config constructor and table
(``mma_config``, ``MMA_CONFIGS``) and what a launch of it needs (``mma_launch``); which
kernel runs a call is ``matmul_dispatch``'s choice, never this module's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwantize_hf.backend import inline_ptx_allowed
from qwantize_hf.kernels.mx_decode import (
    CODES_PER_WORD,
    HALF_SHIFT,
    HIGH_HALF,
    PAIR_SIGN_BITS,
    PAIR_UNDO,
    code_pair,
    e8m0_bf16_pair,
    e8m0_value,
    load_quad,
    load_scale_bytes,
    pair_f32,
    store_tile,
)

# The warp-MMA kernel (``_mxfp4_mma_kernel``): the weight is the A operand of PTX
# mma.sync m16n8k16 (16 weight rows), 8 rows of x its B operand. Lane 4g + t of a warp
# holds A rows g and g + 8 and B column (token) g, each at 4 of the 16 k of a step; which
# 4 is the kernel's choice, as long as A and B agree.
_MMA_ROWS: tl.constexpr = tl.constexpr(16)  # weight rows of one mma
_MMA_TOKENS: tl.constexpr = tl.constexpr(8)  # x rows of one mma
MMA_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with bf16 operands
_WORDS_PER_LANE: tl.constexpr = tl.constexpr(4)  # one 16-byte load of a weight row per lane and step
_STEP_WORDS: tl.constexpr = tl.constexpr(16)  # lanes t = 0..3 take consecutive quads: 128 codes a warp and step


@triton.jit
def _mma_a(word, P: tl.constexpr, scale, PTX: tl.constexpr):
    """Codes P and P + 4 of each word times their block scale: an mma A register, bf16x2
    (``scale`` from ``e8m0_bf16_pair``), or without PTX a float32 (low, high) pair (``scale``
    float32). Both are exact: a code has at most 2 significant bits, the scale is a power of two."""
    pair = code_pair(word, P)
    if PTX:
        # fma with a -0 addend is an exact multiply (+0 stays +0, -0 stays -0); unlike
        # mul.bf16x2 (sm_90), fma.bf16x2 runs on sm_80, like mma.sync.
        a = tl.inline_asm_elementwise(
            "{ .reg .b32 t; fma.rn.bf16x2 t, $1, $2, $4; fma.rn.bf16x2 $0, t, $3, $4; }",
            "=r,r,r,r,r",
            [pair, tl.full(pair.shape, PAIR_UNDO, tl.int32), scale, tl.full(pair.shape, PAIR_SIGN_BITS, tl.int32)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        low, high = pair_f32(pair, False)
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
            ((x0 << HALF_SHIFT).to(tl.float32, bitcast=True), (x2 << HALF_SHIFT).to(tl.float32, bitcast=True)),
            ((x0 & HIGH_HALF).to(tl.float32, bitcast=True), (x2 & HIGH_HALF).to(tl.float32, bitcast=True)),
            ((x1 << HALF_SHIFT).to(tl.float32, bitcast=True), (x3 << HALF_SHIFT).to(tl.float32, bitcast=True)),
            ((x1 & HIGH_HALF).to(tl.float32, bitcast=True), (x3 & HIGH_HALF).to(tl.float32, bitcast=True)),
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
    top = load_quad(w_top + w0, PTX, True)
    bottom = load_quad(w_bottom + w0, PTX, True)
    BLOCKS: tl.constexpr = _WORDS_PER_LANE * CODES_PER_WORD // BLOCK_SIZE
    s0 = w0 // _WORDS_PER_LANE * BLOCKS
    if BLOCKS == 1:
        scales = (load_scale_bytes(s_top + s0, PTX), load_scale_bytes(s_bottom + s0, PTX))
    else:
        scales = (
            load_scale_bytes(s_top + s0, PTX),
            load_scale_bytes(s_bottom + s0, PTX),
            load_scale_bytes(s_top + s0 + 1, PTX),
            load_scale_bytes(s_bottom + s0 + 1, PTX),
        )
    if X_AHEAD:
        x = _mma_load_x(x_ptrs, w0, TWO, PTX)
    else:
        x = w0
    return top, bottom, scales, x


@triton.jit
def _mma_load_x(x_ptrs, w0, TWO: tl.constexpr, PTX: tl.constexpr):
    """Per group of 8 tokens, the 32 x elements of each lane's quad at word ``w0``: 4 quads of int32 pairs."""
    xq = x_ptrs[0] + w0 * (CODES_PER_WORD // 2)
    x = ((load_quad(xq, PTX), load_quad(xq + 4, PTX), load_quad(xq + 8, PTX), load_quad(xq + 12, PTX)),)
    if TWO:
        xq = x_ptrs[1] + w0 * (CODES_PER_WORD // 2)
        x = (
            x[0],
            (load_quad(xq, PTX), load_quad(xq + 4, PTX), load_quad(xq + 8, PTX), load_quad(xq + 12, PTX)),
        )
    return x


@triton.jit
def _mma_scale(scale_bytes, ok, PTX: tl.constexpr):
    """Scale bytes -> ``_mma_a``'s scale operand; 0 where ``ok`` is false (a quad past the
    end: its codes, whatever they are, then add exact zeros)."""
    if PTX:
        scale = tl.where(ok, e8m0_bf16_pair(scale_bytes), 0)
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
    BLOCKS: tl.constexpr = _WORDS_PER_LANE * CODES_PER_WORD // BLOCK_SIZE
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
    tl.static_assert(_WORDS_PER_LANE * CODES_PER_WORD % BLOCK_SIZE == 0, "a quad must hold whole scale blocks")
    tl.static_assert(TOKENS == _MMA_TOKENS or TOKENS == 2 * _MMA_TOKENS, "TOKENS is 8 or 16")
    BLOCKS: tl.constexpr = _WORDS_PER_LANE * CODES_PER_WORD // BLOCK_SIZE
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
            w0 = w_begin + STEP  # see matmul_tiled: no runtime range() bound in the interpreter
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
    store_tile(
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


def mma_config(tiles: int, warps: int, split_k: int, x_ahead: bool = True) -> triton.Config:
    """A config of ``_mxfp4_mma_kernel``: TILES tiles of 16 weight rows a warp, WARPS warps (K
    slices) a program, K split over SPLIT_K programs, x loaded a step ahead (X_AHEAD) or not."""
    return triton.Config(
        {"TILES": tiles, "WARPS": warps, "SPLIT_K": split_k, "X_AHEAD": x_ahead},
        num_warps=warps,
        num_stages=1,
    )


# TILES (of 16 weight rows a warp) / WARPS (K slices of a program) / SPLIT_K, x loaded a step
# ahead or not: the winners of `eval/kernels/sweep_decode.py --kernels mma` at M = 1, 4, 8 and 16 on
# the H100 (eval/results/sweep_mma_h100.md).
MMA_CONFIGS = (
    mma_config(1, 4, 1, x_ahead=False),
    mma_config(1, 8, 1),
    mma_config(1, 8, 1, x_ahead=False),
    mma_config(2, 4, 1),
    mma_config(2, 2, 2, x_ahead=False),
    mma_config(2, 4, 2),
)
MMA_MAX_M = 16  # rows of x up to which the warp-MMA kernel competes


def is_mma_config(config: triton.Config) -> bool:
    """Whether ``config`` is one for ``_mxfp4_mma_kernel``."""
    return "TILES" in config.kwargs


def mma_tokens(m: int) -> int:
    """Rows of x a program of ``_mxfp4_mma_kernel`` takes: one or two mma groups of 8."""
    return _MMA_TOKENS.value if m <= _MMA_TOKENS.value else 2 * _MMA_TOKENS.value


def mma_grid(config: triton.Config, m: int, n: int) -> tuple[int, int, int]:
    """(weight tiles, K splits, groups of tokens): the grid of a launch of ``config`` on an [m, n] output."""
    rows = _MMA_ROWS.value * config.kwargs["TILES"]
    return triton.cdiv(n, rows), config.kwargs["SPLIT_K"], triton.cdiv(m, mma_tokens(m))


def mma_launch(config: triton.Config, m: int, n: int, device: torch.device) -> tuple:
    """The kernel, grid and launch keywords (rows of x a program, the inline-PTX switch, read
    per launch) of a launch of ``config`` on an [m, n] output on ``device``."""
    kwargs = {"TOKENS": mma_tokens(m), "PTX": inline_ptx_allowed(device, MMA_CAPABILITY)}
    return _mxfp4_mma_kernel, mma_grid(config, m, n), kwargs
