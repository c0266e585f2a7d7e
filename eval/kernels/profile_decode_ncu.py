"""Launch decode-sized fused matmuls once each, for Nsight Compute (GPU only).

Every launch here is a kernel of the ``qwantize_hf.kernels.matmul_*`` families with one forced config on
a Llama-3-8B shape; run it under ``ncu`` to see what limits each (occupancy, stalls, L1
traffic). The reading of the warp-MMA kernel at M = 16 in eval/results/profile_decode_ncu_h100.md came from:

    ncu --clock-control none --kernel-name regex:"_mxfp4_(mma|matmul)_kernel" \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section LaunchStats \\
        python eval/kernels/profile_decode_ncu.py
    ncu --clock-control none --kernel-name regex:"_mxfp4_(mma|matmul)_kernel" \\
        --metrics regex:"smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \\
        python eval/kernels/profile_decode_ncu.py

Kernels are launched in the order printed.
"""

from __future__ import annotations

import argparse

import torch

from qwantize_hf import quantize_mxfp4
from qwantize_hf.kernels import matmul_dispatch as kmm

# (M, config, what it is)
RUNS = (
    (16, kmm.mma_config(2, 2, 1, True), "warp-MMA, 2 tiles a warp, 2 warps: the fastest warp-MMA config at M = 16"),
    (16, kmm.mma_config(1, 4, 1, False), "warp-MMA, 1 tile a warp, 4 warps"),
    (16, kmm.DECODE_CONFIGS[4], "tensor-core decode 128/256/1 (tl.dot)"),
    (8, kmm.mma_config(2, 4, 1, True), "warp-MMA at M = 8"),
    (1, kmm.mma_config(1, 4, 1, False), "warp-MMA at M = 1"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="14336x4096", help="N x K of the weight")
    args = parser.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, scales = quantize_mxfp4(w)
    for m, config, what in RUNS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        kmm.mxfp4_matmul_triton(x, packed, scales, None, 32, config=config)
        torch.cuda.synchronize()
        print(f"{n}x{k} M={m}: {what} ({config})", flush=True)


if __name__ == "__main__":
    main()
