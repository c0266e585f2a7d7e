"""Sweep the fused MXFP4 matmul's configs on a GPU: which kernel, tile, split and pipeline depth win at each M.

Three kernels: "tc", the tensor-core kernel's decode configs (the weight as the wgmma register
operand, x padded to 16 rows), "gemv", the CUDA-core kernel (``_mxfp4_gemv_kernel``), and
"mma", the warp-MMA kernel (``_mxfp4_mma_kernel``: mma.sync with operands loaded into registers).
Above 16 rows: "tcm", the tensor-core kernel with 32-128 row tiles of x (the weight still the
register operand) and split-K, "tc-prefill", the shipped ``PREFILL_CONFIGS``, and "ds", Triton's own
``tl.dot_scaled`` on our layout (``dot_scaled_probe``). Each config runs only at the M it is for
(``applies``); every (shape, M) also times dequantize + bf16 ``F.linear``, what runs without a kernel.
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
    python eval/kernels/sweep_decode.py --kernels tcm,tc-prefill,ds --ms 32,64,128,256,512,1024 \
        --out eval/results/sweep_tiled_h100.md
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
    ("gemv", BLOCK_N, BLOCK_W, SPLIT_K, warps, stages) or ("mma", TILES, WARPS, SPLIT_K, warps, X_AHEAD)
    or ("tcm", BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) or ("tcp", index into PREFILL_CONFIGS)
    or ("ds", BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); "tc-shipped" and "gemv-shipped" are the shipped
    DECODE_CONFIGS and GEMV_CONFIGS, "tc-prefill" the shipped PREFILL_CONFIGS."""
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
    if "tcm" in kernels:
        tiles = ((64, 128, 4), (64, 256, 4), (128, 128, 8))  # BLOCK_N, BLOCK_K, warps (the decode winners')
        for block_m, (block_n, block_k, warps) in itertools.product((32, 64, 128, 256), tiles):
            for split, stages in itertools.product((1, 2, 4, 8), (2, 3, 4)):
                if (block_m >= 128 and split == 8) or (stages == 2) != (block_m == 256):
                    continue  # 128+ row tiles are for M > 64: enough tiles without splitting K 8 ways
                if stages * (block_n * block_k // 2 + block_m * block_k * 2) <= 200 * 1024:
                    grid.append(("tcm", block_m, block_n, block_k, split, warps, stages))
    if "tc-prefill" in kernels:
        grid.extend(("tcp", i) for i in range(len(kmm.PREFILL_CONFIGS)))
    if "ds" in kernels:
        for block_m, (block_n, warps) in itertools.product((64, 128), ((64, 4), (128, 8))):
            grid.append(("ds", block_m, block_n, 128, warps, 3))
    return list(dict.fromkeys(grid))  # the shipped configs are also in the full grids


def applies(cfg_t: tuple, m: int) -> bool:
    """Whether config ``cfg_t`` is one for M = ``m``: the decode kernels up to their row limits, the
    larger tiles above 16 rows, each BLOCK_M from half to all of M's power-of-two bucket (up to 256)."""
    from qwantize_hf.kernels import matmul_dispatch as kmm

    kernel = cfg_t[0]
    if kernel == "gemv":
        return kmm.gemv_fits(m, 4096)
    if kernel == "mma":
        return m <= kmm.MMA_MAX_M
    if kernel == "tc":
        return m <= kmm.DECODE_MAX_M
    if kernel == "tcm":
        bucket = min(1 << (m - 1).bit_length(), 256)
        return m > kmm.DECODE_MAX_M and bucket // 2 <= cfg_t[1] <= bucket
    return m > kmm.DECODE_MAX_M


def make_config(kernel, *params):
    """The kernel config of a config tuple (None for "ds", which is not a config of ours)."""
    from qwantize_hf.kernels import matmul_dispatch as kmm

    if kernel == "tcm":
        block_m, block_n, block_k, split, warps, stages = params
        return kmm.tiled_config(block_m, block_n, block_k, split, True, True, True, warps, stages, group_n=8)
    if kernel == "tcp":
        return kmm.PREFILL_CONFIGS[params[0]]
    if kernel == "ds":
        return None
    block_n, block_k, split, warps, stages = params
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


def run(cfg_t: tuple, x, packed, scales, workspace=None):
    """One product of config ``cfg_t`` (our dispatch's launch, or the ``tl.dot_scaled`` probe)."""
    from qwantize_hf.kernels import matmul_dispatch as kmm

    if cfg_t[0] == "ds":
        from dot_scaled_probe import dot_scaled_matmul

        return dot_scaled_matmul(x, packed, scales, *cfg_t[1:])
    return kmm.mxfp4_matmul_triton(x, packed, scales, None, 32, config=make_config(*cfg_t), workspace=workspace)


def _compile_and_check(job):
    """Worker: run one (config, shape, M) once, which compiles it into the shared cache; return its error."""
    cfg_t, n, k, m = job
    try:
        _, packed, scales, w_ref = weights_for(n, k)
        gen = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        return job, errors(run(cfg_t, x, packed, scales), x, w_ref), None
    except Exception as exc:  # out of shared memory or registers: the config is skipped, with its reason
        return job, None, f"{type(exc).__name__}: {str(exc)[:120]}"


REP_MS = 20  # CUDA-graph replay length (ms) per timing; --rep


def bench(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=REP_MS, return_mode="median") / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown report here (and .json beside it)")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--top", type=int, default=5, help="configs listed per shape and M")
    parser.add_argument("--kernels", default="tc", help="comma-separated kernel grids: see config_grid")
    parser.add_argument("--rep", type=int, default=REP_MS, help="ms of CUDA-graph replay per timing")
    args = parser.parse_args()
    globals()["REP_MS"] = args.rep
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms_list = [int(v) for v in args.ms.split(",")]
    grid = config_grid(args.kernels.split(","))
    t0 = time.time()

    jobs = [(cfg, n, k, m) for n, k in shapes for m in ms_list for cfg in grid if applies(cfg, m)]
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
        from qwantize_hf import dequantize_mxfp4

        w, packed, scales, _ = weights_for(n, k)
        q_bytes = packed.numel() + scales.numel()
        copies = max(1, math.ceil(ROTATE_BYTES / q_bytes))
        qs = [(packed.clone(), scales.clone()) for _ in range(copies)]
        ws = [w.clone() for _ in range(max(1, math.ceil(ROTATE_BYTES / (w.numel() * 2))))]
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench(lambda x=x, wl=ws: [F.linear(x, wc) for wc in wl], len(ws))
            t_deq = bench(
                lambda x=x, qc=qs: [F.linear(x, dequantize_mxfp4(p, s, dtype=x.dtype)) for p, s in qc], copies
            )
            rows = []
            for cfg_t in grid:
                if not applies(cfg_t, m):
                    continue
                err, why = checks[(cfg_t, n, k, m)]
                if err is None:
                    continue
                config = make_config(*cfg_t)
                work = kmm.split_k_workspace(m, n, (config,), x.device) if config is not None else None
                t = bench(lambda x=x, c=cfg_t, ws_=work, qc=qs: [run(c, x, p, s, ws_) for p, s in qc], copies)
                rows.append((t, cfg_t))
                records.append(
                    {"n": n, "k": k, "m": m, "config": cfg_t, "us": t * 1e3}
                    | {"bf16_us": t_bf16 * 1e3, "deq_us": t_deq * 1e3}
                )
            rows.sort()
            first_line = len(lines)
            best_t, best_cfg = rows[0]
            t_call = bench(lambda x=x, c=best_cfg, qc=qs: [run(c, x, p, s) for p, s in qc], copies)
            lines.append(
                f"## {n}x{k}, M={m}: bf16 F.linear {t_bf16 * 1e3:.1f} us; dequantize + F.linear {t_deq * 1e3:.1f} us "
                f"({t_bf16 / t_deq:.2f}x); best kernel {best_t * 1e3:.1f} us "
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
            if args.out:  # so far, in case the run is cut short
                with open(args.out, "w") as fh:
                    fh.write("\n".join(lines) + "\n")
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
