"""The fused MXFP4 matmul for one row of x on the CUDA cores (``_mxfp4_gemv_kernel``).

``y = x @ dequant(W).T (+ bias)`` for M = 1 with no padding of x to 16 rows: each thread
loads groups of 32 codes of a row (one or two scale blocks) in one 16-byte load each, with
the 64 bytes of x they multiply, turns the codes into float32 values and sums the products
in float32; nothing moves between threads until the end. Its torch twin is
``dequantize_blocks_torch`` followed by ``F.linear``; the shared decode helpers are in
``mx_decode``. This module holds the kernel, its config constructor and table
(``gemv_config``, ``GEMV_CONFIGS``) and what a launch of it needs (``gemv_launch``); which
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
    code_pair,
    e8m0_value,
    load_quad,
    load_scale_bytes,
    pair_f32,
    store_tile,
)

_BF16X2_MUL_CAPABILITY = (9, 0)  # PTX mul.bf16x2 needs sm_90
_VECTOR_LOAD_CAPABILITY = (7, 0)  # ld.global.nc.v4: every NVIDIA GPU Triton supports

GEMV_MAX_M = 1  # rows of x up to which the CUDA-core kernel runs
GEMV_K_MULTIPLE = 32  # it takes K in groups of 4 words (32 codes); other K go to the decode configs


@triton.jit
def _x_pair_f32(x_pair, X_BF16: tl.constexpr):
    """int32 holding two 16-bit x elements (memory order: low half first) -> two float32."""
    if X_BF16:
        return (x_pair << HALF_SHIFT).to(tl.float32, bitcast=True), (x_pair & HIGH_HALF).to(tl.float32, bitcast=True)
    low = x_pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (x_pair >> HALF_SHIFT).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _word_dot(total, word, x_quad, X_BF16: tl.constexpr, PTX_MUL: tl.constexpr):
    """``total`` plus the sum over the 8 codes of ``word`` of code value * x element: float32, unscaled.

    ``x_quad``: the word's 8 x elements as 4 int32 pairs (``load_quad``), broadcast over its rows.
    ``code_pair(word, p)`` holds codes p and p + 4.
    """
    x0, x1 = _x_pair_f32(x_quad[0], X_BF16)
    x2, x3 = _x_pair_f32(x_quad[1], X_BF16)
    x4, x5 = _x_pair_f32(x_quad[2], X_BF16)
    x6, x7 = _x_pair_f32(x_quad[3], X_BF16)
    # One multiply-add a code, in a single chain.
    low, high = pair_f32(code_pair(word, 0), PTX_MUL)
    total += low * x0
    total += high * x4
    low, high = pair_f32(code_pair(word, 1), PTX_MUL)
    total += low * x1
    total += high * x5
    low, high = pair_f32(code_pair(word, 2), PTX_MUL)
    total += low * x2
    total += high * x6
    low, high = pair_f32(code_pair(word, 3), PTX_MUL)
    total += low * x3
    return total + high * x7


@triton.jit
def _gemv_load(w_ptrs, s_ptrs, x_ptrs, w0, BLOCK_SIZE: tl.constexpr, PTX_LOAD: tl.constexpr):
    """One step of ``_mxfp4_gemv_kernel``'s operands at word w0, per group of 4 words: the
    words ([BLOCK_N, G] each), their scale bytes, and for each word its 8 x elements as 4
    int32 pairs ([1, G] each)."""
    words = load_quad(w_ptrs + w0, PTX_LOAD)
    xq = x_ptrs + w0 * (CODES_PER_WORD // 2)
    x = (
        load_quad(xq, PTX_LOAD),
        load_quad(xq + 4, PTX_LOAD),
        load_quad(xq + 8, PTX_LOAD),
        load_quad(xq + 12, PTX_LOAD),
    )
    BLOCKS_PER_GROUP: tl.constexpr = 4 * CODES_PER_WORD // BLOCK_SIZE
    s_0 = load_scale_bytes(s_ptrs + w0 // 4 * BLOCKS_PER_GROUP, PTX_LOAD)
    if BLOCKS_PER_GROUP == 2:
        s_1 = load_scale_bytes(s_ptrs + w0 // 4 * BLOCKS_PER_GROUP + 1, PTX_LOAD)
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
    if BLOCK_SIZE == 4 * CODES_PER_WORD:
        d = _word_dot(d, words[2], x[2], X_BF16, PTX_MUL)
        d = _word_dot(d, words[3], x[3], X_BF16, PTX_MUL)
        group = d * e8m0_value(scale_bytes[0])  # the scale is exact: a power of two, or NaN
    else:
        d2 = _word_dot(tl.zeros_like(acc), words[2], x[2], X_BF16, PTX_MUL)
        d2 = _word_dot(d2, words[3], x[3], X_BF16, PTX_MUL)
        group = d * e8m0_value(scale_bytes[0]) + d2 * e8m0_value(scale_bytes[1])
    return acc + tl.where(ok, group, 0.0)


@triton.jit
def gemv_accumulate(
    x_ptr,
    row,
    stride_xm,
    packed_ptr,
    scales_ptr,
    offs_n,
    N,
    words_k,
    blocks_k,
    pid_k,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PTX_MUL: tl.constexpr,
    PTX_LOAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The float32 products ``[BLOCK_N, BLOCK_W // 4]`` of row ``row`` of x with weight rows
    ``offs_n`` of ``packed``/``scales`` over this program's split of K (``pid_k`` of ``SPLIT_K``): the
    body of ``_mxfp4_gemv_kernel``, shared with the routed experts kernel (``matmul_routed``)."""
    tl.static_assert(BLOCK_W % 4 == 0, "BLOCK_W must be whole groups of 4 words")
    tl.static_assert(4 * CODES_PER_WORD % BLOCK_SIZE == 0, "a group of 4 words must hold whole scale blocks")
    G: tl.constexpr = BLOCK_W // 4
    BLOCKS_PER_GROUP: tl.constexpr = 4 * CODES_PER_WORD // BLOCK_SIZE
    X_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
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
    x_row = (x_ptr + row.to(tl.int64) * stride_xm).to(tl.pointer_type(tl.int32))
    x_ptrs = x_row + (4 * g4)[None, :]

    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if w_full > w_begin:
        # Each step's loads are issued before the previous step's arithmetic, so a warp keeps
        # a step of weight bytes in flight while it decodes.
        ops = _gemv_load(w_ptrs, s_ptrs, x_ptrs, w_begin, BLOCK_SIZE, PTX_LOAD)
        if INTERPRET:
            w0 = w_begin + BLOCK_W  # see matmul_tiled: no runtime range() bound in the interpreter
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

    return acc


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
    ``PTX_LOAD`` makes every load a 16-byte vector load in that layout (``load_quad``):
    K is a multiple of 32 and the launcher aligns x's rows to 16 bytes. Without it (the
    interpreter, ``QWANTIZE_HF_NO_INLINE_PTX``) plain loads read the same values, more slowly.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = gemv_accumulate(
        x_ptr, pid_m, stride_xm, packed_ptr, scales_ptr, offs_n, N, words_k, blocks_k, pid_k,
        BLOCK_SIZE, BLOCK_N, BLOCK_W, SPLIT_K, PTX_MUL, PTX_LOAD, INTERPRET,
    )  # fmt: skip

    # A [BLOCK_N, 1] tile, indexed [n, m] like the tensor-core kernel's with the weight as A.
    offs_n64 = offs_n.to(tl.int64)[:, None]
    m64 = pid_m.to(tl.int64)
    store_tile(
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


def gemv_config(block_n: int, block_w: int, split_k: int, warps: int, stages: int) -> triton.Config:
    """A config of ``_mxfp4_gemv_kernel``: BLOCK_N weight rows a program, BLOCK_W words (8 codes
    each) a step, K split over SPLIT_K programs."""
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_W": block_w, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages
    )


# BLOCK_N / BLOCK_W (words of 8 codes) / SPLIT_K, warps: the winners of
# `eval/kernels/sweep_decode.py --kernels gemv` at M = 1 on the H100 (eval/results/sweep_gemv_h100.md),
# 8/128/4 warps within 4% of the best on the four large Llama-3-8B shapes; 4/256 wins on the
# k/v projections (1024x4096). All split 1: K is shared by the threads of one program, so no partial sums
# and no arrival counters to zero before each call. Stages do not apply with the PTX loads
# (the kernel issues each step's loads before the previous step's math itself); the plain
# tl.load path (QWANTIZE_HF_NO_INLINE_PTX) runs unpipelined with these configs.
GEMV_CONFIGS = (
    gemv_config(8, 128, 1, 4, 1),
    gemv_config(16, 128, 1, 8, 1),
    gemv_config(8, 64, 1, 2, 1),
    gemv_config(16, 256, 1, 8, 1),
    gemv_config(4, 256, 1, 4, 1),
)


def is_gemv_config(config: triton.Config) -> bool:
    """Whether ``config`` is one for ``_mxfp4_gemv_kernel``."""
    return "BLOCK_W" in config.kwargs


def gemv_fits(m: int, k: int) -> bool:
    """Whether the CUDA-core kernel can take an [m, k] x in the dispatch (``matmul_dispatch.candidate_configs``)."""
    return m <= GEMV_MAX_M and k % GEMV_K_MULTIPLE == 0


def gemv_launch(config: triton.Config, m: int, n: int, device: torch.device) -> tuple:
    """The kernel, grid and inline-PTX switches of a launch of ``config`` on an [m, n] output on
    ``device``. The switches are read per launch (``backend.inline_ptx_allowed``)."""
    ptx = {
        "PTX_MUL": inline_ptx_allowed(device, _BF16X2_MUL_CAPABILITY),
        "PTX_LOAD": inline_ptx_allowed(device, _VECTOR_LOAD_CAPABILITY),
    }
    return _mxfp4_gemv_kernel, (triton.cdiv(n, config.kwargs["BLOCK_N"]), config.kwargs["SPLIT_K"], m), ptx
