"""Benchmark the fused MXFP4 matmul against bf16 F.linear and dequantize-then-F.linear (GPU only).

For Llama-3-8B-shaped layers (N x K) and M rows of activations, in one run:
``mxfp4_matmul_triton`` with its dispatch (for M <= 16 the fastest of the CUDA-core,
warp-MMA and tensor-core decode configs; above, of the tensor-core batch configs up to
M = 512, the prefill configs and dequantize + cuBLAS), bf16 ``F.linear`` (cuBLAS), and
``dequantize_mxfp4`` + ``F.linear``. ``mxfp4_linear`` (what MXFP4Linear runs) takes the
dispatch at every M. Every candidate is checked first against a
float32 matmul of the exact dequantized weight on fresh random inputs per shape and M
(relative Frobenius error of the output, and each output feature's error over the size
of its terms: see ``errors``), then timed as CUDA-graph replays (``do_bench_cudagraph``,
median) over enough weight copies that they don't fit in L2 together, so decode
numbers are DRAM numbers, not cache numbers. Reports medians, ratios, achieved
weight-read bandwidth and a device-to-device copy for scale, and per shape the time a
kernel that only reads the packed codes and scale bytes takes (``read_alone``, the best
of a few tile configs): a measured baseline for "x vs bf16" at M = 1, since a matmul
must read the same bytes (a cleverer read could still beat it).

    python eval/bench_matmul.py --out eval/results/bench_matmul_h100.md
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.evaluation.gpu_bench import (
    MAX_FEATURE_ERR,
    MAX_FROBENIUS_ERR,
    ROTATE_BYTES,
    SHAPES,
    bench,
    chosen_config,
    errors,
    read_alone,
)
from qwantize_hf.kernels import matmul_dispatch as kmm
from qwantize_hf.linear_op import mxfp4_linear

MS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096]


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    args = parser.parse_args()
    ms_list = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    lines = [
        f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}",
        f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (bytes read + written)",
        "times: median of CUDA-graph replays (triton.testing.do_bench_cudagraph), per call, "
        f"rotating over weight copies of >= {ROTATE_BYTES >> 20} MiB per candidate",
        "",
        "| N x K | M | fused us | bf16 F.linear us | deq+F.linear us | fused x vs bf16 | fused x vs deq "
        "| fused weight GB/s | bf16 weight GB/s | rel err | feature err | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t_start = time.time()
    floors = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, scales = quantize_mxfp4(w, backend="triton")
        q_bytes = packed.numel() + scales.numel()
        b_bytes = w.numel() * w.element_size()
        copies_q = max(1, math.ceil(ROTATE_BYTES / q_bytes))
        copies_b = max(1, math.ceil(ROTATE_BYTES / b_bytes))
        qs = [(packed.clone(), scales.clone()) for _ in range(copies_q)]
        ws = [w.clone() for _ in range(copies_b)]
        w_ref = dequantize_mxfp4(packed, scales, dtype=torch.float32)
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fused = errors(kmm.mxfp4_matmul_triton(x, packed, scales, None, 32), x, w_ref)
            op = errors(mxfp4_linear(x, packed, scales), x, w_ref)
            deq = errors(F.linear(x, dequantize_mxfp4(packed, scales)), x, w_ref)
            for frob, feature in (fused, op, deq):
                assert frob < MAX_FROBENIUS_ERR and feature < MAX_FEATURE_ERR, (n, k, m, fused, op, deq)
            err = max(fused[0], op[0])
            # Heavy M: fewer copies are needed to hide the cache, and a graph of many big calls is slow to build.
            cq = copies_q if m <= 64 else 2
            cb = copies_b if m <= 64 else 2
            t_ours = bench(lambda x=x, qc=qs[:cq]: [kmm.mxfp4_matmul_triton(x, p, s, None, 32) for p, s in qc], cq)
            t_bf16 = bench(lambda x=x, wc=ws[:cb]: [F.linear(x, w) for w in wc], cb)
            t_deq = bench(lambda x=x, qc=qs[:cq]: [F.linear(x, dequantize_mxfp4(p, s)) for p, s in qc], cq)
            cfg = chosen_config(m, n, k, x)
            line = (
                f"| {n}x{k} | {m} | {t_ours * 1e3:.1f} | {t_bf16 * 1e3:.1f} | {t_deq * 1e3:.1f} | "
                f"{t_bf16 / t_ours:.2f} | {t_deq / t_ours:.2f} | {q_bytes / (t_ours * 1e-3) / 1e9:.0f} | "
                f"{b_bytes / (t_bf16 * 1e-3) / 1e9:.0f} | {err:.1e} | {max(fused[1], op[1]):.1e} | {cfg} |"
            )
            lines.append(line)
            print(line, flush=True)
        t_read, read_cfg = read_alone(qs)
        floors.append((n, k, t_read, read_cfg, q_bytes))
        del qs, ws, w_ref
        torch.cuda.empty_cache()
    lines += ["", "weight bytes read alone (no math; best of READ_CONFIGS, a baseline for the matmul):", ""]
    lines += ["| N x K | us | TB/s | BLOCK_N/BLOCK_W/SPLIT_K/warps/stages |", "|---|---|---|---|"]
    for n, k, t_read, read_cfg, q_bytes in floors:
        tb_s = q_bytes / (t_read * 1e-3) / 1e12
        lines.append(f"| {n}x{k} | {t_read * 1e3:.1f} | {tb_s:.2f} | {'/'.join(map(str, read_cfg))} |")
    lines += [
        "",
        f"weight memory, quantized / bf16: {(packed.numel() + scales.numel()) / (w.numel() * 2):.4f} "
        "(packed codes + scale bytes; 4.25 bits a weight)",
        "config = the tensor-core kernel's BLOCK_M/BLOCK_N/BLOCK_K/SPLIT_K, gemv BLOCK_N/BLOCK_W/SPLIT_K or mma "
        "TILES/WARPS/SPLIT_K/X_AHEAD, chosen by the dispatch (every candidate config timed as a whole call with a "
        f"cold L2); wall time {time.time() - t_start:.0f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
