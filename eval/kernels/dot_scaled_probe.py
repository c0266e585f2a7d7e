"""Triton's own MXFP4 product, ``tl.dot_scaled`` (bf16 x, e2m1 weight with e8m0 scales), on our layout: a
route the sweep measures next to our fused kernel (issue 19 asks for it before writing one's own).

``packed [N, K/2]`` read as the dot's right operand ``[K/2, N]`` (codes packed along K) and ``scales
[N, K/32]`` as its scale tensor, so no byte changes. On Hopper Triton upcasts the weight to bf16
(there is no native MXFP4 MMA before Blackwell). One output tile a program, no split-K; GPU only
(the interpreter cannot run ``tl.dot_scaled``). Not shipped: an eval probe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_scaled_kernel(
    x_ptr, packed_ptr, scales_ptr, out_ptr, M, N, K, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ks = k0 // BLOCK_SIZE + tl.arange(0, BLOCK_K // BLOCK_SIZE)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + kk[None, :], mask=(kk < K)[None, :], other=0.0)
        w = tl.load(packed_ptr + rows_n[None, :] * (K // 2) + kb[:, None], mask=(kb < K // 2)[:, None], other=0)
        s = tl.load(scales_ptr + rows_n[:, None] * (K // BLOCK_SIZE) + ks[None, :])
        acc = tl.dot_scaled(x, None, "bf16", w, s, "e2m1", acc)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def dot_scaled_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, block_m: int, block_n: int, block_k: int,
    warps: int, stages: int,
) -> torch.Tensor:  # fmt: skip
    """``x [M, K] (bf16) @ dequant(packed, scales).T`` through ``tl.dot_scaled`` (K a multiple of ``block_k``)."""
    m, k = x.shape
    n = packed.shape[0]
    if k % block_k:
        raise ValueError(f"dot_scaled probe: K = {k} is not a multiple of BLOCK_K = {block_k}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _dot_scaled_kernel[grid](
        x, packed, scales, out, m, n, k, x.stride(0), block_m, block_n, block_k, 32, num_warps=warps, num_stages=stages
    )
    return out
