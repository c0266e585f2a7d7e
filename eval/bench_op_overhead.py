"""Eager per-call cost of the MXFP4 linear op at decode sizes, and where its host time goes (GPU only).

In eager generation a decode step makes hundreds of small linear calls, and each one's
host-side time (dispatch, checks, allocations, the Triton launch) can exceed the GPU
time of the product itself. This times, per call, back to back without CUDA graphs:
bf16 ``F.linear``, the ``mxfp4_linear`` op (what ``MXFP4Linear`` runs), the fused
kernel's Python entry ``mxfp4_matmul_triton``, and that entry with a fixed config and a
preallocated workspace; then profiles the op's host path with cProfile.

    python eval/bench_op_overhead.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from qwantize_hf import quantize_mxfp4
from qwantize_hf.kernels import matmul as kmm
from qwantize_hf.matmul import mxfp4_linear

CALLS = 2000


def per_call_us(fn) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, scales = quantize_mxfp4(w)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    config = kmm.GEMV_CONFIGS[0]  # M = 1 runs the one-row kernel
    work = kmm.split_k_workspace(1, n, (config,), x.device)
    rows = {
        "bf16 F.linear": lambda: F.linear(x, w),
        "mxfp4_linear op": lambda: mxfp4_linear(x, packed, scales),
        "mxfp4_matmul_triton (dispatched)": lambda: kmm.mxfp4_matmul_triton(x, packed, scales, None, 32),
        "mxfp4_matmul_triton (fixed config, workspace)": lambda: kmm.mxfp4_matmul_triton(
            x, packed, scales, None, 32, config=config, workspace=work
        ),
    }
    print(f"{torch.cuda.get_device_name()}; eager, M=1, {n}x{k}, {CALLS} calls back to back")
    for name, fn in rows.items():
        print(f"{name}: {per_call_us(fn):.1f} us per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(CALLS):
        mxfp4_linear(x, packed, scales)
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())


if __name__ == "__main__":
    main()
