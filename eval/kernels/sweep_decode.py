"""Sweep the fused MXFP4 matmul's decode configs on a GPU (M <= 16): which kernel, tile, split and pipeline depth win.

Three kernels: "tc", the tensor-core kernel's decode configs (the weight as the wgmma register
operand, x padded to 16 rows), "gemv", the CUDA-core kernel (``_mxfp4_gemv_kernel``), and
"mma", the warp-MMA kernel (``_mxfp4_mma_kernel``: mma.sync with operands loaded into registers).
For each Llama-3-8B layer shape and M, every config in the grids below is compiled (in
parallel worker processes that fill Triton's on-disk cache), checked against a float32
matmul of the exact dequantized weight, then timed as CUDA-graph replays over weight
copies that do not fit in L2. Timed alone, the kernel gets a preallocated split-K
workspace (``mxfp4_matmul_triton(..., workspace=...)``); the best config is timed
again as a whole call (fresh workspace: one small memset more) next to bf16 ``F.linear``.

    python eval/kernels/sweep_decode.py --out eval/results/sweep_decode_h100.md
    python eval/kernels/sweep_decode.py --kernels gemv,tc-shipped --ms 1 --out eval/results/sweep_gemv_h100.md
    python eval/kernels/sweep_decode.py --kernels mma,gemv-shipped,tc-shipped --ms 1,2,4,8,16 \
        --out eval/results/sweep_mma_h100.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from qwantize_hf.evaluation.gpu_bench import MAX_FEATURE_ERR, MAX_FROBENIUS_ERR, errors

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]
MS = [1, 16]
ROTATE_BYTES = 200 * 2**20


def config_grid(kernels: list[str]) -> list[tuple]:
    """Config tuples, kernel name first: ("tc", BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) or
    ("gemv", BLOCK_N, BLOCK_W, SPLIT_K, warps, stages) or ("mma", TILES, WARPS, SPLIT_K, warps, X_AHEAD);
    "tc-shipped" and "gemv-shipped" are the shipped DECODE_CONFIGS and GEMV_CONFIGS."""
    from qwantize_hf.kernels import matmul_dispatch as kmm

    grid = []
    if "tc" in kernels:
        for block_n, warps in ((64, 4), (128, 4), (128, 8)):
            for block_k, split, stages in itertools.product((128, 256, 512), (1, 2, 4, 8), (3, 4, 5)):
                smem = stages * (block_n * block_k // 2 + 16 * block_k * 2)
                if smem <= 200 * 1024:
                    grid.append(("tc", block_n, block_k, split, warps, stages))
    if "tc-shipped" in kernels:
        for c in kmm.DECODE_CONFIGS:
            kw = c.kwargs
            grid.append(("tc", kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"], c.num_warps, c.num_stages))
    if "gemv" in kernels:
        # Stages do not matter to this kernel (its loads are not Triton's to pipeline): 1.
        for block_n, block_w, warps in itertools.product((2, 4, 8, 16, 32), (64, 128, 256, 512), (2, 4, 8)):
            grid.append(("gemv", block_n, block_w, 1, warps, 1))
        for block_n, block_w, split in itertools.product((4, 8, 16), (128, 256), (2, 4)):
            grid.append(("gemv", block_n, block_w, split, 4, 1))
    if "gemv-shipped" in kernels:
        for c in kmm.GEMV_CONFIGS:
            kw = c.kwargs
            grid.append(("gemv", kw["BLOCK_N"], kw["BLOCK_W"], kw["SPLIT_K"], c.num_warps, c.num_stages))
    if "mma" in kernels:
        for tiles, warps, split, x_ahead in itertools.product((1, 2, 4), (2, 4, 8), (1, 2), (1, 0)):
            grid.append(("mma", tiles, warps, split, warps, x_ahead))
    return list(dict.fromkeys(grid))  # the shipped configs are also in the full grids


def make_config(kernel, block_n, block_k, split, warps, stages):
    from qwantize_hf.kernels import matmul_dispatch as kmm

    if kernel == "gemv":
        return kmm.gemv_config(block_n, block_k, split, warps, stages)
    if kernel == "mma":
        return kmm.mma_config(block_n, warps, split, bool(stages))
    return kmm.tiled_config(kmm.DECODE_BLOCK_M, block_n, block_k, split, True, True, True, warps, stages)


def weights_for(n: int, k: int, seed: int = 0):
    from qwantize_hf import dequantize_mxfp4, quantize_mxfp4

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    packed, scales = quantize_mxfp4(w, backend="triton")
    return w, packed, scales, dequantize_mxfp4(packed, scales, dtype=torch.float32)


def _compile_and_check(job):
    """Worker: run one (config, shape, M) once, which compiles it into the shared cache; return its error."""
    cfg_t, n, k, m = job
    from qwantize_hf.kernels import matmul_dispatch as kmm

    try:
        _, packed, scales, w_ref = weights_for(n, k)
        gen = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = kmm.mxfp4_matmul_triton(x, packed, scales, None, 32, config=make_config(*cfg_t))
        return job, errors(out, x, w_ref), None
    except Exception as exc:  # out of shared memory or registers: the config is skipped, with its reason
        return job, None, f"{type(exc).__name__}: {str(exc)[:120]}"


def bench(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown report here (and .json beside it)")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--top", type=int, default=5, help="configs listed per shape and M")
    parser.add_argument("--kernels", default="tc", help="tc, tc-shipped, gemv, gemv-shipped, mma: see config_grid")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms_list = [int(v) for v in args.ms.split(",")]
    grid = config_grid(args.kernels.split(","))
    t0 = time.time()

    jobs = [(cfg, n, k, m) for n, k in shapes for m in ms_list for cfg in grid]
    checks: dict = {}
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for job, err, why in pool.imap_unordered(_compile_and_check, jobs):
            checks[job] = (err, why)
    t_compile = time.time() - t0
    bad = [
        (job, e)
        for job, (e, _) in checks.items()
        if e is not None and (e[0] >= MAX_FROBENIUS_ERR or e[1] >= MAX_FEATURE_ERR)
    ]
    if bad:
        raise SystemExit(f"{len(bad)} wrong results, e.g. {bad[:5]}")

    from qwantize_hf.kernels import matmul_dispatch as kmm

    dev = torch.cuda.get_device_name()
    lines = [
        f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}; {len(grid)} configs; "
        f"compile+check {t_compile:.0f} s",
        "times: median us of CUDA-graph replays over >= 200 MiB of weight copies; kernel alone (preallocated split-K "
        "workspace) unless said",
        "",
    ]
    records = []
    for n, k in shapes:
        w, packed, scales, _ = weights_for(n, k)
        q_bytes = packed.numel() + scales.numel()
        copies = max(1, math.ceil(ROTATE_BYTES / q_bytes))
        qs = [(packed.clone(), scales.clone()) for _ in range(copies)]
        ws = [w.clone() for _ in range(max(1, math.ceil(ROTATE_BYTES / (w.numel() * 2))))]
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench(lambda x=x, wl=ws: [F.linear(x, wc) for wc in wl], len(ws))
            rows = []
            for cfg_t in grid:
                err, why = checks[(cfg_t, n, k, m)]
                if err is None:
                    continue
                config = make_config(*cfg_t)
                work = kmm.split_k_workspace(m, n, (config,), x.device)
                t = bench(
                    lambda x=x, c=config, ws_=work, qc=qs: [
                        kmm.mxfp4_matmul_triton(x, p, s, None, 32, config=c, workspace=ws_) for p, s in qc
                    ],
                    copies,
                )
                rows.append((t, cfg_t))
                records.append({"n": n, "k": k, "m": m, "config": cfg_t, "us": t * 1e3, "bf16_us": t_bf16 * 1e3})
            rows.sort()
            first_line = len(lines)
            best_t, best_cfg = rows[0]
            best = make_config(*best_cfg)
            t_call = bench(
                lambda x=x, c=best, qc=qs: [kmm.mxfp4_matmul_triton(x, p, s, None, 32, config=c) for p, s in qc], copies
            )
            lines.append(
                f"## {n}x{k}, M={m}: bf16 F.linear {t_bf16 * 1e3:.1f} us; best kernel {best_t * 1e3:.1f} us "
                f"({t_bf16 / best_t:.2f}x bf16, {q_bytes / (best_t * 1e-3) / 1e9:.0f} GB/s of weight read); "
                f"whole call with a fresh workspace {t_call * 1e3:.1f} us ({t_bf16 / t_call:.2f}x)"
            )
            for kernel in sorted({c[0] for _, c in rows}):
                t, cfg_t = min(r for r in rows if r[1][0] == kernel)
                lines.append(f"- best {kernel}: {t * 1e3:.1f} us ({t_bf16 / t:.2f}x bf16), {'/'.join(map(str, cfg_t))}")
            lines.append("")
            lines.append(
                "| kernel/BLOCK_N/BLOCK_K or BLOCK_W/SPLIT_K/warps/stages "
                "(mma: TILES/WARPS/SPLIT_K/warps/X_AHEAD) | us | x bf16 | weight GB/s |"
            )
            lines.append("|---|---|---|---|")
            for t, cfg_t in rows[: args.top]:
                lines.append(
                    f"| {'/'.join(map(str, cfg_t))} | {t * 1e3:.1f} | {t_bf16 / t:.2f} | "
                    f"{q_bytes / (t * 1e-3) / 1e9:.0f} |"
                )
            lines.append("")
            print("\n".join(lines[first_line:]), flush=True)
        del qs, ws
        torch.cuda.empty_cache()
    skipped = sorted({(job[0], why) for job, (err, why) in checks.items() if err is None})
    lines.append(f"skipped configs: {len(skipped)} ({'; '.join(f'{c}: {w[:60]}' for c, w in skipped[:8])})")
    lines.append(f"wall time {time.time() - t0:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
