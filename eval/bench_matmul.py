"""Benchmark the fused MXFP4 matmul against bf16 F.linear and dequantize-then-F.linear (GPU only).

For Llama-3-8B-shaped layers (N x K) and M rows of activations, in one run:
the fused kernel (``mxfp4_matmul_triton``, autotuned decode configs for M <= 16 and
prefill configs above), bf16 ``F.linear`` (cuBLAS), and ``dequantize_mxfp4`` +
``F.linear``. ``mxfp4_linear`` (what MXFP4Linear runs) takes the fused kernel for
M <= 16 and dequantize + F.linear above. Every candidate is checked first (worst
relative Frobenius error over output features vs a float32 matmul of the exact dequantized weight, fresh random
inputs per shape and M), then timed as CUDA-graph replays (``do_bench_cudagraph``,
median) over enough weight copies that they don't fit in L2 together, so decode
numbers are DRAM numbers, not cache numbers. Reports medians, ratios, achieved
weight-read bandwidth and a device-to-device copy for scale.

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
from qwantize_hf.kernels import matmul as kmm
from qwantize_hf.matmul import mxfp4_linear

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K): qkv/o, gate/up, down, fused qkv
MS = [1, 4, 16, 64, 256, 1024, 4096]
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # weight bytes a timed graph streams through, per candidate


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench(fn, calls: int) -> float:
    """Median ms of one call; ``fn`` makes ``calls`` calls over rotating weight copies."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / calls


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    # worst output feature: one norm over the whole output would hide a wrong small column
    return float(((out.float() - ref).norm(dim=0) / ref.norm(dim=0)).max())


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
        "| fused weight GB/s | bf16 weight GB/s | rel err | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t_start = time.time()
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
            ref = x.float() @ w_ref.T
            out = kmm.mxfp4_matmul_triton(x, packed, scales, None, 32)
            err = max(rel_err(out, ref), rel_err(mxfp4_linear(x, packed, scales), ref))
            deq_err = rel_err(F.linear(x, dequantize_mxfp4(packed, scales)), ref)
            assert err < 1e-2 and deq_err < 1e-2, (n, k, m, err, deq_err)
            # Heavy M: fewer copies are needed to hide the cache, and a graph of many big calls is slow to build.
            cq = copies_q if m <= 64 else 2
            cb = copies_b if m <= 64 else 2
            t_ours = bench(lambda x=x, qc=qs[:cq]: [kmm.mxfp4_matmul_triton(x, p, s, None, 32) for p, s in qc], cq)
            t_bf16 = bench(lambda x=x, wc=ws[:cb]: [F.linear(x, w) for w in wc], cb)
            t_deq = bench(lambda x=x, qc=qs[:cq]: [F.linear(x, dequantize_mxfp4(p, s)) for p, s in qc], cq)
            tuned = kmm._decode_kernel if m <= kmm.DECODE_MAX_M else kmm._prefill_kernel
            best = tuned.best_config.kwargs if tuned.best_config is not None else {}
            cfg = "/".join(str(best.get(key)) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
            line = (
                f"| {n}x{k} | {m} | {t_ours * 1e3:.1f} | {t_bf16 * 1e3:.1f} | {t_deq * 1e3:.1f} | "
                f"{t_bf16 / t_ours:.2f} | {t_deq / t_ours:.2f} | {q_bytes / (t_ours * 1e-3) / 1e9:.0f} | "
                f"{b_bytes / (t_bf16 * 1e-3) / 1e9:.0f} | {err:.1e} | {cfg} |"
            )
            lines.append(line)
            print(line, flush=True)
        del qs, ws, w_ref
        torch.cuda.empty_cache()
    lines += [
        "",
        f"weight memory, quantized / bf16: {(packed.numel() + scales.numel()) / (w.numel() * 2):.4f} "
        "(packed codes + scale bytes; 4.25 bits a weight)",
        f"config = BLOCK_M/BLOCK_N/BLOCK_K/SPLIT_K chosen by the autotuner; wall time {time.time() - t_start:.0f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
