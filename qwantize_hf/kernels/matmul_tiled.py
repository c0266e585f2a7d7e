"""The fused MXFP4 matmul on the tensor cores through ``tl.dot`` (``_mxfp4_matmul_kernel``).

``y = x @ dequant(W).T (+ bias)`` straight from packed codes and scale bytes: each program
turns a tile of packed bytes into ``x.dtype`` values in registers and feeds them to
``tl.dot`` (wgmma on Hopper); the bf16/fp16 weight never exists in global memory. Its torch
twin is ``dequantize_blocks_torch`` followed by ``F.linear``. The register kernels
(``matmul_gemv``, ``matmul_mma``) need K a multiple of 32, so this one also takes other K.
Its two launch families share one body and differ only in their configs:

- decode (M <= ``DECODE_MAX_M``, ``DECODE_CONFIGS``): memory-bound. The weight tile is the
  dot's register operand (64-128 output features) and the few rows of x, padded to 16, the
  shared-memory one, so no tensor-core row is wasted on a weight. K is split over several
  programs so that every SM streams weight bytes; the last program of an output tile to
  finish adds the others' fp32 partials (one launch, no atomics on the output, no second kernel).
- batch (``DECODE_MAX_M`` < M <= ``BATCH_MAX_M``, ``BATCH_CONFIGS``): still memory-bound. The
  decode layout with 32-128 rows of x a tile and K split, so that a few output tiles still
  keep every SM streaming weight bytes.
- prefill (larger M, ``PREFILL_CONFIGS``): compute-bound. 64-256 row tiles, grouped tile
  order for L2 reuse.

For bf16 the codes are decoded on int32 words, two values per register
(``_dequantize_words_bf16``, see ``mx_decode``); fp16 takes the per-byte float32 path. This
module holds the kernel, its config constructor and tables (``tiled_config``) and what a
launch of it needs (``tiled_launch``); which kernel runs a call is ``matmul_dispatch``'s
choice, never this module's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwantize_hf.kernels.mx_decode import (
    CODES_PER_WORD,
    DENORMAL_UNDO,
    F32_MAG_BITS,
    F32_MAG_SHIFT,
    F32_SIGN_BITS,
    F32_SIGN_SHIFT,
    HALF_SHIFT,
    NIBBLE,
    code_pairs,
    code_values,
    e8m0_value,
    store_tile,
)

DECODE_MAX_M = 16  # rows of x up to which the decode configs are used
BATCH_MAX_M = 512  # rows of x up to which the batch configs compete too
DECODE_BLOCK_M = 16  # smallest tl.dot extent; x rows are padded to it


@triton.jit
def _dequantize_bytes(packed, scale_bytes, BLOCK_SIZE: tl.constexpr, out_dtype: tl.constexpr):
    """[R, C] packed bytes and [R, 2C/BLOCK_SIZE] scale bytes -> [R, 2C] values in ``out_dtype``, K in order."""
    R: tl.constexpr = packed.shape[0]
    HALF: tl.constexpr = packed.shape[1]
    b = packed.to(tl.int32)
    # Element 2i (low nibble) and 2i+1 (high nibble) as float32 bits of value * 2**-126.
    low = ((b << F32_MAG_SHIFT) & F32_MAG_BITS) | ((b << F32_SIGN_SHIFT) & F32_SIGN_BITS)
    high_code = b >> NIBBLE
    high = ((high_code << F32_MAG_SHIFT) & F32_MAG_BITS) | ((high_code << F32_SIGN_SHIFT) & F32_SIGN_BITS)
    bits = tl.reshape(tl.join(low, high), [R, 2 * HALF])
    tiny = bits.to(tl.float32, bitcast=True) * DENORMAL_UNDO
    scale = e8m0_value(scale_bytes.to(tl.int32))
    values = tl.reshape(tiny, [R, 2 * HALF // BLOCK_SIZE, BLOCK_SIZE]) * scale[:, :, None]
    return tl.reshape(values, [R, 2 * HALF]).to(out_dtype)


@triton.jit
def _dequantize_words_bf16(words, scale_bytes, BLOCK_SIZE: tl.constexpr, INTERPRET: tl.constexpr):
    """[R, W] int32 words of packed codes -> bf16 [R, W, 4, 2]: element 8w + p + 4h at [r, w, p, h].

    Works on pairs of bf16 packed in an int32 (SIMD within a register): two shifts
    and two masks make two values, and each multiply below is one bf16x2 instruction.
    """
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    WORDS_PER_BLOCK: tl.constexpr = BLOCK_SIZE // CODES_PER_WORD
    scale = e8m0_value(scale_bytes.to(tl.int32))  # exact: a power of two, or NaN
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [R, W // WORDS_PER_BLOCK, WORDS_PER_BLOCK]), [R, W])
    if INTERPRET:
        # The interpreter has no bf16 arithmetic and flushes bf16 subnormals: the float32
        # code values (each half widened to the float32 with the same bits) instead.
        return (code_values(words, False) * scale[:, :, None, None]).to(tl.bfloat16)
    pairs = code_pairs(words)
    scale = scale.to(tl.bfloat16)[:, :, None]
    low = pairs.to(tl.int16).to(tl.bfloat16, bitcast=True) * DENORMAL_UNDO * scale
    high = (pairs >> HALF_SHIFT).to(tl.int16).to(tl.bfloat16, bitcast=True) * DENORMAL_UNDO * scale
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
        kw = tl.arange(0, BLOCK_K // CODES_PER_WORD)
        w_ptrs = w_rows + (k0 // CODES_PER_WORD + kw)[None, :]
        if MASKED:
            x = tl.load(x_rows + x_cols[None, :], mask=x_row_ok[:, None] & (x_cols < k_end)[None, :], other=0.0)
            words = tl.load(w_ptrs, mask=((k0 + kw * CODES_PER_WORD) < k_end)[None, :], other=0)
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
def tiled_k_loop(
    acc,
    x_rows,
    x_row_ok,
    w_rows,
    s_rows,
    k_begin,
    k_end,
    BLOCK_K: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    W_IS_A: tl.constexpr,
    WORDS: tl.constexpr,
    PERMUTE_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``acc`` plus the product of K in [k_begin, k_end): whole BLOCK_K steps, then one masked partial
    step if K ends inside one (``_k_step`` has the operands). Shared by the dense and grouped kernels."""
    k_full = k_begin + tl.maximum(k_end - k_begin, 0) // BLOCK_K * BLOCK_K
    if INTERPRET:
        # The interpreter cannot take a runtime range() bound (numpy >= 2 refuses int() of
        # its 1-element scalars); a while loop runs the same steps but is not
        # software-pipelined, so the GPU build keeps the for loop.
        k0 = k_begin
        while k0 < k_full:
            acc = _k_step(
                acc, x_rows, x_row_ok, w_rows, s_rows, k0, k_end, BLOCK_K, BLOCK_SIZE, W_IS_A, WORDS, PERMUTE_K,
                False, True,
            )  # fmt: skip
            k0 += BLOCK_K
    else:
        for k0 in range(k_begin, k_full, BLOCK_K):
            acc = _k_step(
                acc, x_rows, x_row_ok, w_rows, s_rows, k0, k_end, BLOCK_K, BLOCK_SIZE, W_IS_A, WORDS, PERMUTE_K,
                False, False,
            )  # fmt: skip
    if k_full < k_end:
        acc = _k_step(
            acc, x_rows, x_row_ok, w_rows, s_rows, k_full, k_end, BLOCK_K, BLOCK_SIZE, W_IS_A, WORDS, PERMUTE_K,
            True, INTERPRET,
        )  # fmt: skip
    return acc


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
    acc = tiled_k_loop(
        acc, x_rows, m_ok, w_rows, s_rows, k_begin, k_end, BLOCK_K, BLOCK_SIZE, W_IS_A, USE_WORDS, PERMUTE_K, INTERPRET
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

    store_tile(
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


def tiled_config(
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    w_is_a: bool,
    words: bool,
    permute_k: bool,
    warps: int,
    stages: int,
    group_n: int = 1,
) -> triton.Config:
    """A config of ``_mxfp4_matmul_kernel``: BLOCK_M x BLOCK_N output tiles, BLOCK_K of K a step,
    K split over SPLIT_K programs, GROUP_N weight tiles a group of the tile order; the weight as
    the dot's first operand (W_IS_A), decoded from int32 words for bf16 (WORDS) into the
    permuted K order (PERMUTE_K)."""
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
# the winners of eval/kernels/sweep_decode.py over 100 configs on the H100
# (eval/results/sweep_decode_h100.md): 64/256/4 is within 15% of the best everywhere;
# 128/128/8 wins where N = 4096 (few output tiles, so K is split wide); the split-1 ones
# win where N = 14336 and need no partial sums.
DECODE_CONFIGS = (
    tiled_config(DECODE_BLOCK_M, 64, 256, 4, True, True, True, 4, 3),
    tiled_config(DECODE_BLOCK_M, 128, 128, 8, True, True, True, 4, 4),
    tiled_config(DECODE_BLOCK_M, 64, 128, 4, True, True, True, 4, 3),
    tiled_config(DECODE_BLOCK_M, 64, 256, 1, True, True, True, 4, 3),
    tiled_config(DECODE_BLOCK_M, 128, 256, 1, True, True, True, 8, 3),
)
# Each competes where its BLOCK_M is half to all of M's power-of-two bucket (``batch_fits``).
BATCH_CONFIGS = (
    tiled_config(32, 64, 256, 4, True, True, True, 4, 3),
    tiled_config(32, 128, 128, 4, True, True, True, 8, 4),
    tiled_config(64, 64, 256, 2, True, True, True, 4, 3),
    tiled_config(64, 128, 128, 4, True, True, True, 8, 3),
    tiled_config(64, 128, 128, 1, True, True, True, 8, 3),
    tiled_config(128, 128, 128, 2, True, True, True, 8, 3),
    tiled_config(128, 128, 128, 1, True, True, True, 8, 3),
)
PREFILL_CONFIGS = (
    # The weight as the register operand of wgmma: its dequantization overlaps the previous
    # step's asynchronous matrix product instead of waiting for a shared-memory buffer.
    tiled_config(64, 128, 128, 1, True, True, True, 8, 3, group_n=8),
    tiled_config(128, 128, 128, 1, True, True, True, 8, 3, group_n=8),
    tiled_config(256, 128, 64, 1, False, True, False, 8, 3, group_n=8),
)


def batch_fits(config: triton.Config, m: int) -> bool:
    """Whether batch config ``config`` competes for M = ``m``: its BLOCK_M is half to all of M's
    power-of-two bucket (capped at 128: a 256-row tile's accumulator spills registers on the
    H100, 255 registers and 4-10 KB of spills a thread in ptxas), so a tile wastes at most half
    its rows."""
    bucket = min(1 << max(m - 1, 0).bit_length(), 128)
    return DECODE_MAX_M < m <= BATCH_MAX_M and bucket // 2 <= config.kwargs["BLOCK_M"] <= bucket


def tiled_launch(config: triton.Config, m: int, n: int) -> tuple:
    """The kernel, grid and extra launch keywords (none) of a launch of ``config`` on an [m, n] output."""
    meta = config.kwargs
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    return _mxfp4_matmul_kernel, grid, {}
