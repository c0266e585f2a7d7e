"""Timing and checking helpers the GPU benchmark scripts under ``eval/`` share (GPU only).

``bench`` times CUDA-graph replays over rotating weight copies (so decode numbers
are DRAM numbers, not L2 numbers); ``errors`` and its two bounds check a product
against a float32 matmul of the exact dequantized weight; ``read_alone`` times a
kernel that only reads an MXFP4 weight's bytes in the fused kernels' tile order;
``chosen_config`` names the config the matmul dispatch kept. ``SHAPES`` are the
Llama-3-8B layer shapes the scripts time.

Imports Triton at import time: the library must never import this file.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from qwantize_hf.kernels import matmul_dispatch as kmm

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K): qkv/o, gate/up, down, fused qkv
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # weight bytes a timed graph streams through, per candidate


@triton.jit
def _read_weight_bytes(
    words_ptr, scales_ptr, out_ptr, N, words_k, blocks_k,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr, WORDS_PER_BLOCK: tl.constexpr,
):  # fmt: skip
    """Read the packed words and scale bytes in the fused kernels' tile order and XOR them: the bytes, no math."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    steps_per_split = tl.cdiv(tl.cdiv(words_k, BLOCK_W), SPLIT_K)
    acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)
    acc_s = tl.zeros([BLOCK_N, BLOCK_W // WORDS_PER_BLOCK], tl.int32)
    for step in range(pid_k * steps_per_split, (pid_k + 1) * steps_per_split):
        kw = step * BLOCK_W + tl.arange(0, BLOCK_W)
        acc ^= tl.load(words_ptr + rows[:, None] * words_k + kw[None, :], mask=(kw < words_k)[None, :], other=0)
        kb = step * (BLOCK_W // WORDS_PER_BLOCK) + tl.arange(0, BLOCK_W // WORDS_PER_BLOCK)
        acc_s ^= tl.load(scales_ptr + rows[:, None] * blocks_k + kb[None, :], mask=(kb < blocks_k)[None, :], other=0)
    tl.store(out_ptr + pid_n * SPLIT_K + pid_k, tl.sum(tl.sum(acc, 1), 0) + tl.sum(tl.sum(acc_s, 1), 0))


# (BLOCK_N, BLOCK_W, SPLIT_K, warps, stages); the best of them is reported
READ_CONFIGS = [(64, 32, 4, 4, 3), (64, 32, 4, 4, 4), (64, 32, 1, 4, 3), (128, 64, 4, 4, 3), (32, 32, 4, 4, 3)]


def read_alone(qs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, tuple]:
    """(ms, config): the fastest of READ_CONFIGS at reading one weight's packed words and scale bytes."""
    n, half_k = qs[0][0].shape
    words_k, blocks_k = half_k // 4, qs[0][1].shape[1]
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    best = None
    for bn, bw, split, warps, stages in READ_CONFIGS:
        grid = (triton.cdiv(n, bn), split)
        kw = dict(BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split, WORDS_PER_BLOCK=words_k // blocks_k, num_warps=warps,
                  num_stages=stages)  # fmt: skip
        t = bench(
            lambda grid=grid, kw=kw: [
                _read_weight_bytes[grid](p.view(torch.int32), s, out, n, words_k, blocks_k, **kw) for p, s in qs
            ],
            len(qs),
        )
        if best is None or t < best[0]:
            best = (t, (bn, bw, split, warps, stages))
    return best


def chosen_config(m: int, n: int, k: int, x: torch.Tensor) -> str:
    """The config the dispatch chose and remembered for this call, as text."""
    # The choice is kept per shape: stand-ins of the weight's shape (on "meta": no memory) find it.
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
    scales = torch.empty(n, k // 32, dtype=torch.uint8, device="meta")
    config = kmm.chosen_config(x[:m], packed, scales, None, 32)
    if config is None:
        return "?"
    if kmm.kernel_family(config) == "gemv":
        return "gemv " + "/".join(str(config.kwargs[key]) for key in ("BLOCK_N", "BLOCK_W", "SPLIT_K"))
    if kmm.kernel_family(config) == "mma":
        return "mma " + "/".join(str(config.kwargs[key]) for key in ("TILES", "WARPS", "SPLIT_K", "X_AHEAD"))
    if kmm.kernel_family(config) == "dequantize":
        return "dequantize + cuBLAS"
    return "/".join(str(config.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))


def bench(fn, calls: int) -> float:
    """Median ms of one call; ``fn`` makes ``calls`` calls over rotating weight copies."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / calls


def errors(out: torch.Tensor, x: torch.Tensor, w_ref: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error of the whole output, worst output feature's error).

    The second is each feature's error over the size of its terms, ``|x| @ |w_j|``: a
    relative error per feature would be ill-conditioned (one of 14336 outputs of a
    single row is often near zero by cancellation, and any summation order then
    looks wrong), while one norm over the whole output would hide a wrong small-scale
    column. Float32 sums in another order stay near 1e-6 of the terms and bf16 output
    rounding under 2**-9; one 32-block with a wrong scale in K = 4096 is near 1e-2.
    """
    ref = x.float() @ w_ref.T
    diff = out.float() - ref
    terms = x.float().abs() @ w_ref.abs().T
    return float(diff.norm() / ref.norm()), float((diff.norm(dim=0) / terms.norm(dim=0)).max())


MAX_FROBENIUS_ERR = 1e-2  # issue 5's bound for bf16 activations
MAX_FEATURE_ERR = 4e-3  # bf16 output rounding (<= 2**-9 of |y|) passes, a wrong block does not
