"""The grouped MXFP4 matmul for mixture-of-experts batches: pairs sorted by expert, each expert's rows
one group of tiles, every group in one launch (``_mxfp4_grouped_kernel``).

``out[p] = x[p] @ dequant(packed[experts[p]], scales[experts[p]]).T (+ bias[experts[p]])``, as the
routed kernel (``matmul_routed``) computes it for a few pairs; with many pairs each expert's weight
is read once per BLOCK_M of its rows instead of once per pair. ``grouped_matmul`` sorts the pairs by
expert, lays out one tile table on the device (which expert and which first row each row tile takes:
no host synchronisation, so CUDA graphs capture it; the grid is sized for the most tiles P pairs can
need), runs the tensor-core kernel's K loop (``matmul_tiled.tiled_k_loop``: the weight decoded in
registers as the dot's register operand) on each tile, and puts the rows back in the pairs' order.
Its torch twin is ``routed_op.routed_reference``; which path runs a call is ``routed_op``'s choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwantize_hf.backend import interpreting
from qwantize_hf.constants import F4_CODES_PER_BYTE
from qwantize_hf.kernels.matmul_routed import contiguous_stack
from qwantize_hf.kernels.matmul_tiled import tiled_config, tiled_k_loop
from qwantize_hf.kernels.mx_decode import CODES_PER_WORD, add_bias


@triton.jit
def _mxfp4_grouped_kernel(
    x_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    expert_end_ptr,
    packed_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    half_k,  # K // 2, K // 8, K // BLOCK_SIZE
    words_k,
    blocks_k,
    stride_xm,
    stride_om,
    EXPERTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORDS: tl.constexpr,
    PERMUTE_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Output tile (row tile ``program_id(0)`` of the table, BLOCK_N features ``program_id(1)``) of the
    expert the table gives that row tile; row tiles past the table's end (expert id EXPERTS) do nothing."""
    USE_WORDS: tl.constexpr = WORDS and x_ptr.dtype.element_ty == tl.bfloat16
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < EXPERTS:
        first = tl.load(tile_row_ptr + tile)
        end = tl.load(expert_end_ptr + expert)
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < end
        n_ok = offs_n < N
        rows_m = tl.minimum(offs_m, end - 1).to(tl.int64)  # rows past the group's end are masked on load
        rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)  # and weight rows past N load row N - 1, never stored
        expert64 = expert.to(tl.int64)
        x_rows = x_ptr + rows_m[:, None] * stride_xm
        s_rows = scales_ptr + expert64 * N * blocks_k + rows_n[:, None] * blocks_k
        if USE_WORDS:
            words = packed_ptr.to(tl.pointer_type(tl.int32)) + expert64 * N * words_k
            w_rows = words + rows_n[:, None] * words_k
        else:
            w_rows = packed_ptr + expert64 * N * half_k + rows_n[:, None] * half_k
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc = tiled_k_loop(
            acc, x_rows, m_ok, w_rows, s_rows, 0, K, BLOCK_K, BLOCK_SIZE, True, USE_WORDS, PERMUTE_K and USE_WORDS,
            INTERPRET,
        )
        acc = add_bias(acc, bias_ptr + expert64 * N, offs_n, n_ok, HAS_BIAS, True)
        out_off = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def grouped_config(pairs: int, experts: int) -> triton.Config:
    """The launch config for ``pairs`` pairs over ``experts`` experts: a row tile of 16-64 rows by the
    pairs an expert gets on average (a tile wastes at most half its rows on a group of that size), 128
    output features and 128 of K a step (the batch configs' tile)."""
    per_expert = max(1, pairs // max(experts, 1))
    block_m = min(64, max(16, 1 << (per_expert - 1).bit_length()))
    return tiled_config(block_m, 128, 128, 1, True, True, True, 8, 3)


def grouped_matmul(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``[P, N]`` in x's dtype: ``x [P, K]`` (bf16/fp16, K % 32 == 0), ``experts [P]`` (int, each in
    [0, E): a row of another id is left unwritten), ``packed [E, N, K/2]``, ``scales [E, N, K/block_size]``,
    ``bias [E, N]`` or None; shapes checked by the caller. ``config``: a ``tiled_config`` (its BLOCK_M,
    BLOCK_N, BLOCK_K, WORDS, PERMUTE_K, warps and stages are used; default ``grouped_config``)."""
    pairs, k = x.shape
    num_experts, n = packed.shape[:2]
    if pairs == 0 or n == 0:
        return x.new_empty(pairs, n)
    packed, scales, bias = contiguous_stack(packed, scales, bias)
    config = config or grouped_config(pairs, num_experts)
    meta = config.kwargs
    block_m = meta["BLOCK_M"]
    ids, order = experts.sort(stable=True)
    x_sorted = x.index_select(0, order)
    # Each expert's rows in the sorted order ([starts[e], ends[e])), its row tiles and where they start.
    bounds = torch.searchsorted(ids, torch.arange(num_experts + 1, device=x.device, dtype=ids.dtype))
    starts, ends = bounds[:-1], bounds[1:]
    tiles = (ends - starts + block_m - 1) // block_m
    tiles_end = tiles.cumsum(0)
    # At most ceil(P / BLOCK_M) + min(E, P) row tiles: one partial tile per expert hit.
    upper = triton.cdiv(pairs, block_m) + min(num_experts, pairs)
    slots = torch.arange(upper, device=x.device, dtype=tiles_end.dtype)
    tile_expert = torch.searchsorted(tiles_end, slots, right=True)  # E past the last tile
    owner = tile_expert.clamp(max=num_experts - 1)
    tile_row = starts[owner] + (slots - (tiles_end[owner] - tiles[owner])) * block_m
    out_sorted = torch.empty(pairs, n, dtype=x.dtype, device=x.device)
    grid = (upper, triton.cdiv(n, meta["BLOCK_N"]))
    _mxfp4_grouped_kernel[grid](
        x_sorted, tile_expert.to(torch.int32), tile_row.to(torch.int32), ends.to(torch.int32), packed, scales,
        bias if bias is not None else out_sorted, out_sorted,
        n, k, k // F4_CODES_PER_BYTE, k // CODES_PER_WORD.value, k // block_size, x_sorted.stride(0),
        out_sorted.stride(0),
        EXPERTS=num_experts, HAS_BIAS=bias is not None, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=meta["BLOCK_N"], BLOCK_K=meta["BLOCK_K"], WORDS=meta["WORDS"], PERMUTE_K=meta["PERMUTE_K"],
        INTERPRET=interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)


__all__ = ["grouped_config", "grouped_matmul"]
