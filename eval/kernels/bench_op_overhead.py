"""Eager per-call cost of the MXFP4 linear op at decode sizes, and where its host time goes (GPU only).

In eager generation a decode step makes hundreds of small linear calls, and each one's
host-side time (dispatch, checks, allocations, the Triton launch) can exceed the GPU
time of the product itself. This times, per call, back to back without CUDA graphs, at
M = 1 and 8: bf16 ``F.linear``, the ``mxfp4_linear`` op (what ``MXFP4Linear`` runs), the
fused kernel's Python entry ``mxfp4_matmul_triton`` (a repeated call starts its remembered
launch), and that entry forced to the same config, which goes through Triton's own launch;
then profiles the op's host path with cProfile.

    python eval/kernels/bench_op_overhead.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from qwantize_hf import quantize_mxfp4
from qwantize_hf.kernels import matmul_dispatch as kmm
from qwantize_hf.linear_op import mxfp4_linear

CALLS = 2000
ROUNDS = 3


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
    print(f"{torch.cuda.get_device_name()}; eager, {n}x{k}, {CALLS} calls back to back, median of {ROUNDS} rounds")
    print("| M | call | us per call |\n|---|---|---|")
    for m in (1, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        mxfp4_linear(x, packed, scales)  # chooses the config and remembers the launch
        config = kmm.chosen_config(x, packed, scales, None, 32)
        work = kmm.split_k_workspace(m, n, (config,), x.device)
        rows = {
            "bf16 F.linear": lambda x=x: F.linear(x, w),
            "mxfp4_linear op": lambda x=x: mxfp4_linear(x, packed, scales),
            "mxfp4_matmul_triton, dispatched (remembered launch)": lambda x=x: kmm.mxfp4_matmul_triton(
                x, packed, scales, None, 32
            ),
            "mxfp4_matmul_triton, the same config through Triton's launch": lambda x=x, c=config, ws=work: (
                kmm.mxfp4_matmul_triton(x, packed, scales, None, 32, config=c, workspace=ws)
            ),
        }
        # Rounds of every row in turn: the host's speed drifts, and each row gets its median.
        times = {name: [] for name in rows}
        for _ in range(ROUNDS):
            for name, fn in rows.items():
                times[name].append(per_call_us(fn))
        for name, values in times.items():
            print(f"| {m} | {name} | {sorted(values)[ROUNDS // 2]:.1f} |")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
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
