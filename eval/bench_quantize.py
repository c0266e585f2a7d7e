"""Benchmark the MXFP4 quantize kernel on a GPU: every scale method, the torch twin,
the one-program-per-block baseline, and a device-to-device copy, in one run.

    python eval/bench_quantize.py [--sweep] [--out DIR]

Effective bandwidth counts the bf16 weight read once and the packed codes and
scale bytes written once. The copy moves a bf16 tensor of the same size (bytes
read + written) and is the ceiling. Each variant is checked byte for byte
against the torch twin on the same GPU before it is timed. Timings are medians
of triton.testing.do_bench_cudagraph (launch overhead excluded); inputs rotate
over enough copies to defeat the L2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import triton
import triton.testing

from qwantize_hf.format import normalize_mse_weights, quantize_blocks_torch
from qwantize_hf.kernels.quantize import quantize_triton

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
METHODS = ["naive", "even", "mse", "mse+weights", "mse-f32"]
# mse-f32: the same search with its rounding in float32 (half_search=False), the kernel
# before the float16 search; mse-plain: the float16 search without inline PTX, timed in a
# subprocess with QWANTIZE_HF_NO_INLINE_PTX=1 (read when the kernel module is imported).
ROTATE_BYTES = 512 * 2**20  # keep the rotated inputs well above the 50 MB L2


def effective_bytes(n: int, k: int) -> int:
    return n * k * 2 + n * k // 2 + n * k // 32


def input_copies(n: int, k: int) -> list[torch.Tensor]:
    """Random bf16 [n, k] weights, enough copies to rotate over ROTATE_BYTES."""
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, ROTATE_BYTES // (n * k * 2)))]


def rotating(tensors, fn):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(tensors)
        return fn(tensors[state["i"]])

    return call


def median_ms(fn, graph: bool = True) -> float:
    # CUDA-graph replay: the kernel's time without Python launch overhead (which
    # would dominate the smallest shape); median of the replays. The torch twin
    # builds small CPU tables as it goes and cannot be captured: timed eagerly.
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def split_method(method: str) -> tuple[str, bool]:
    return ("mse", True) if method == "mse+weights" else ("mse" if method == "mse-f32" else method, False)


def launch_options(method: str) -> dict:
    return {"half_search": False} if method == "mse-f32" else {}


def check_bytes(w, method, weights, **launch) -> None:
    scale_method, _ = split_method(method)
    got = quantize_triton(w, 32, scale_method, weights, **launch_options(method), **launch)
    want = quantize_blocks_torch(w, 32, scale_method, weights)
    if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
        raise SystemExit(f"MISMATCH: {method} {tuple(w.shape)} {launch}")


def sweep(out: dict) -> dict:
    """Blocks per program × warps for naive and mse on 14336×4096; returns the best of each."""
    n, k = 14336, 4096
    copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    best = {}
    rows = []
    for method in ("naive", "mse"):
        for bpp in (16, 32, 64, 128, 256):
            for warps in (2, 4, 8):
                launch = {"blocks_per_prog": bpp, "num_warps": warps}
                check_bytes(copies[0][:256], method, None, **launch)
                ms = median_ms(rotating(copies, lambda w, m=method, lp=launch: quantize_triton(w, 32, m, **lp)))
                gbs = effective_bytes(n, k) / ms / 1e6
                rows.append({"method": method, **launch, "ms": ms, "GB/s": gbs})
                print(f"sweep {method:6s} bpp={bpp:4d} warps={warps}: {ms:.4f} ms {gbs:8.1f} GB/s", flush=True)
                if method not in best or ms < best[method]["ms"]:
                    best[method] = {**launch, "ms": ms}
    out["sweep"] = rows
    out["sweep_best"] = best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep blocks per program and warps")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_quantize.json")
    parser.add_argument("--mse-only", action="store_true", help="(internal) time mse alone, print JSON rows")
    args = parser.parse_args()
    if args.mse_only:
        time_mse_only()
        return
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    out = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "results": [],
    }
    if args.sweep:
        sweep(out)
    for n, k in SHAPES:
        copies = input_copies(n, k)
        weights = normalize_mse_weights(torch.rand(k, device="cuda") ** 4, k, torch.device("cuda"))
        nbytes = effective_bytes(n, k)
        row = {"shape": [n, k]}
        copy_dst = torch.empty_like(copies[0])
        row["copy_ms"] = median_ms(rotating(copies, lambda w, dst=copy_dst: dst.copy_(w)))
        row["copy_GB/s"] = 2 * n * k * 2 / row["copy_ms"] / 1e6
        for method in METHODS:
            scale_method, weighted = split_method(method)
            wts = weights if weighted else None
            check_bytes(copies[0], method, wts)
            opts = launch_options(method)
            ms = median_ms(
                rotating(copies, lambda w, m=scale_method, ws=wts, o=opts: quantize_triton(w, 32, m, ws, **o))
            )
            row[f"{method}_ms"] = ms
            row[f"{method}_GB/s"] = nbytes / ms / 1e6
        for method in ("naive", "mse"):
            ms = median_ms(rotating(copies, lambda w, m=method: quantize_blocks_torch(w, 32, m)), graph=False)
            row[f"torch_{method}_ms"] = ms
        # the design we replace: one program per 32-element block
        check_bytes(copies[0], "naive", None, blocks_per_prog=1, num_warps=1)
        ms = median_ms(rotating(copies, lambda w: quantize_triton(w, 32, "naive", blocks_per_prog=1, num_warps=1)))
        row["per_block_naive_ms"] = ms
        row["per_block_naive_GB/s"] = nbytes / ms / 1e6
        out["results"].append(row)
        print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()

    plain = subprocess.run(
        [sys.executable, __file__, "--mse-only"],
        env={**os.environ, "QWANTIZE_HF_NO_INLINE_PTX": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    plain_ms = json.loads(plain.stdout.strip().splitlines()[-1])
    for row in out["results"]:
        n, k = row["shape"]
        row["mse-plain_ms"] = plain_ms[f"{n}x{k}"]
        row["mse-plain_GB/s"] = effective_bytes(n, k) / row["mse-plain_ms"] / 1e6
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_quantize.json"), "w") as f:
        json.dump(out, f, indent=1)
    print_table(out)


def time_mse_only() -> None:
    """The mse kernel alone on every shape (byte-checked first); one JSON line {shape: ms}."""
    result = {}
    for n, k in SHAPES:
        copies = input_copies(n, k)
        check_bytes(copies[0], "mse", None)
        result[f"{n}x{k}"] = median_ms(rotating(copies, lambda w: quantize_triton(w, 32, "mse")))
        del copies
        torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)


def print_table(out: dict) -> None:
    print(f"\n{out['device']} ({out['sms']} SMs), torch {out['torch']}, triton {out['triton']}")
    print("effective GB/s = (bf16 read + packed + scales written) / median time; ratio vs a bf16 copy")
    header = "| shape | copy GB/s | " + " | ".join(f"{m} GB/s (×copy)" for m in [*METHODS, "mse-plain"])
    header += " | torch mse ms (× slower than kernel) | per-block naive GB/s (kernel naive ×) |"
    print(header)
    print("|" + "---|" * (5 + len(METHODS)))
    for row in out["results"]:
        n, k = row["shape"]
        cells = [f"{n}×{k}", f"{row['copy_GB/s']:.0f}"]
        for m in [*METHODS, "mse-plain"]:
            cells.append(f"{row[f'{m}_GB/s']:.0f} ({row[f'{m}_GB/s'] / row['copy_GB/s']:.2f})")
        cells.append(f"{row['torch_mse_ms']:.3f} ({row['torch_mse_ms'] / row['mse_ms']:.1f}×)")
        speedup = row["naive_GB/s"] / row["per_block_naive_GB/s"]
        cells.append(f"{row['per_block_naive_GB/s']:.0f} ({speedup:.1f}×)")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
