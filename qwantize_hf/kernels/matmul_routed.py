"""The routed MXFP4 matmul for mixture-of-experts decode: each row of x times its own expert's weight.

``out[p] = x[p] @ dequant(packed[experts[p]], scales[experts[p]]).T (+ bias[experts[p]])`` for a few
(token, expert) pairs ``p``, in one launch that reads only the routed experts' bytes where they lie
(no gathered copy of them): grid axis 1 is the pair, and each program runs the CUDA-core kernel's
body (``matmul_gemv.gemv_accumulate``) on its expert's rows. Its torch twin is ``routed_op.routed_reference``:
each pair's expert dequantized and ``F.linear``. Which path runs a call is ``routed_op``'s choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwantize_hf.backend import interpreting
from qwantize_hf.kernels.matmul_dispatch import x_with_aligned_rows
from qwantize_hf.kernels.matmul_gemv import gemv_accumulate, gemv_config, gemv_launch


@triton.jit
def _mxfp4_routed_gemv_kernel(
    x_ptr,
    experts_ptr,
    packed_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    N,
    words_k,  # K // 8, K // BLOCK_SIZE
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
    """BLOCK_N rows of pair ``program_id(1)``'s expert against that pair's row of x (split-K 1)."""
    tl.static_assert(SPLIT_K == 1, "the routed kernel does not split K")
    pid_n = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # the expert's codes (N rows of 4 * words_k bytes; 16-byte aligned since K % 32 == 0) and scales
    packed = packed_ptr + expert * N * words_k * 4
    scales = scales_ptr + expert * N * blocks_k
    acc = gemv_accumulate(
        x_ptr, pair, stride_xm, packed, scales, offs_n, N, words_k, blocks_k, 0,
        BLOCK_SIZE, BLOCK_N, BLOCK_W, 1, PTX_MUL, PTX_LOAD, INTERPRET,
    )  # fmt: skip
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + expert * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pair * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def routed_config(k: int) -> triton.Config:
    """The launch config for reduction length ``k``: the CUDA-core kernel's M = 1 winners on the H100
    (``matmul_gemv.GEMV_CONFIGS``): 128 words a step when K holds at least two steps, else 64."""
    return gemv_config(8, 128, 1, 4, 1) if k >= 2048 else gemv_config(8, 64, 1, 2, 1)


def routed_gemv(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``[P, N]`` in x's dtype: ``x [P, K]`` (bf16/fp16, K % 32 == 0), ``experts [P]`` (int, each < E),
    ``packed [E, N, K/2]``, ``scales [E, N, K/block_size]``, ``bias [E, N]`` or None; shapes checked by
    the caller. ``config``: a ``gemv_config`` with split 1 (tests; default ``routed_config``)."""
    pairs, k = x.shape
    n = packed.shape[1]
    out = torch.empty(pairs, n, dtype=x.dtype, device=x.device)
    if pairs == 0 or n == 0:
        return out
    config = config or routed_config(k)
    x = x_with_aligned_rows(x.contiguous())
    packed, scales, bias = contiguous_stack(packed, scales, bias)
    experts = experts.contiguous()
    _, (tiles_n, _, _), ptx = gemv_launch(config, 1, n, x.device)
    for first in range(0, pairs, MAX_PAIRS_PER_LAUNCH):  # grid axis 1 holds at most 65535 programs
        last = min(pairs, first + MAX_PAIRS_PER_LAUNCH)
        _mxfp4_routed_gemv_kernel[(tiles_n, last - first)](
            x[first:last], experts[first:last], packed, scales, bias if bias is not None else out, out[first:last],
            n, k // 8, k // block_size, x.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_SIZE=block_size, INTERPRET=interpreting(),
            num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs, **ptx,
        )  # fmt: skip
    return out


MAX_PAIRS_PER_LAUNCH = 65535


def contiguous_stack(
    packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An expert stack as the stack kernels (routed, grouped) read it: contiguous, since they step through
    whole experts, and ``packed`` 16-byte aligned, since they read it as int32 words (a fresh allocation is)."""
    packed, scales = packed.contiguous(), scales.contiguous()
    if packed.data_ptr() % 16:
        packed = packed.clone()
    return packed, scales, None if bias is None else bias.contiguous()


__all__ = ["MAX_PAIRS_PER_LAUNCH", "contiguous_stack", "routed_config", "routed_gemv"]
