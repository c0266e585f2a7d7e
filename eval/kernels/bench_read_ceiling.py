"""How fast can a GPU read one MXFP4 weight's bytes at all? A ceiling for the M = 1 matmul (GPU only).

At M = 1 the fused matmul is a read of the packed codes and scale bytes (N * K * 17 / 32
bytes) and little else, so no kernel can beat the fastest way of reading that many bytes
once. For each Llama-3-8B layer shape this script times, in one run and the same way
``eval/bench_matmul.py`` times the matmul (CUDA-graph replays, medians, rotating over buffer
copies that do not fit in L2 together):

- an empty kernel: what a launch in a graph costs with no bytes at all;
- bf16 ``F.linear`` at M = 1 on a weight with as many bytes as the MXFP4 one
  (N' = bytes / 2K rows): cuBLAS reading the same bytes;
- ``read_alone`` (``qwantize_hf.evaluation.gpu_bench``, also in ``bench_matmul.py``'s table): the fused kernels'
  tile order, no math;
- ``_stream_read``: the bytes as one flat buffer, 16-byte loads, a grid of 1-8 programs
  an SM, each program taking one contiguous range or striding over the buffer, with 1-4
  loads in flight a thread: the best of the grid is the ceiling this script reports;
- the fused matmul itself at M = 1 (the dispatch's choice) and bf16 ``F.linear`` on the
  real shape, for the ratio an M = 1 kernel reading as fast as the ceiling would reach.

    python eval/kernels/bench_read_ceiling.py --out eval/results/bench_read_ceiling_h100.md
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from qwantize_hf import quantize_mxfp4
from qwantize_hf.evaluation.gpu_bench import ROTATE_BYTES, SHAPES, bench, chosen_config, read_alone
from qwantize_hf.kernels import matmul_dispatch as kmm


@triton.jit
def _empty(out_ptr):
    pass


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _stream_read(
    src_ptr, out_ptr, n_vec, VECS: tl.constexpr, UNROLL: tl.constexpr, CONTIGUOUS: tl.constexpr,
    INTERPRET: tl.constexpr = False,
):  # fmt: skip
    """XOR ``n_vec`` 16-byte vectors of int32 ``src_ptr``: UNROLL x VECS vectors a program and step
    (UNROLL independent loads a thread), each program a contiguous range of steps or every
    ``num_programs``-th step."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    CHUNK: tl.constexpr = UNROLL * VECS
    chunks = tl.cdiv(n_vec, CHUNK)
    u = tl.arange(0, UNROLL)[:, None, None]
    v = tl.arange(0, VECS)[None, :, None]
    e = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros([UNROLL, VECS, 4], tl.int32)
    if CONTIGUOUS:
        per = tl.cdiv(chunks, programs)
        first = pid * per
        last = tl.minimum(chunks, first + per)
        stride = 1
    else:
        first = pid
        last = chunks
        stride = programs
    if INTERPRET:  # the interpreter takes no run-time range() bounds
        c = first
        while c < last:
            vec = c * CHUNK + u * VECS + v
            acc ^= tl.load(src_ptr + vec * 4 + e, mask=vec < n_vec, other=0)
            c += stride
    else:
        for c in range(first, last, stride):
            vec = c * CHUNK + u * VECS + v
            acc ^= tl.load(src_ptr + vec * 4 + e, mask=vec < n_vec, other=0)
    tl.store(out_ptr + pid, tl.reduce(tl.reduce(tl.reduce(acc, 2, _xor), 1, _xor), 0, _xor))


# (programs per SM, warps, UNROLL, CONTIGUOUS)
STREAM_GRID = list(itertools.product((1, 2, 4, 8), (4, 8), (1, 2, 4), (True, False)))


def stream_kwargs(warps: int, unroll: int, contiguous: bool) -> dict:
    """``_stream_read``'s launch keywords for one STREAM_GRID entry: one vector a thread and load."""
    return dict(VECS=32 * warps, UNROLL=unroll, CONTIGUOUS=contiguous, num_warps=warps)


def stream_ceiling(bufs: list[torch.Tensor], sms: int) -> tuple[float, tuple, list]:
    """(ms, config, all rows): the fastest ``_stream_read`` config over ``bufs`` (int32, flat)."""
    n_vec = bufs[0].numel() // 4
    out = torch.empty(16 * sms, dtype=torch.int32, device="cuda")
    rows = []
    for per_sm, warps, unroll, contiguous in STREAM_GRID:
        grid = (per_sm * sms,)
        kw = stream_kwargs(warps, unroll, contiguous)
        t = bench(lambda grid=grid, kw=kw: [_stream_read[grid](b, out, n_vec, **kw) for b in bufs], len(bufs))
        rows.append((t, (per_sm, warps, unroll, contiguous)))
    best = min(rows)
    return best[0], best[1], rows


def xor_all(t: torch.Tensor) -> int:
    """XOR of every int32 of ``t`` (on the GPU, by halving)."""
    t = t.flatten()
    while t.numel() > 1:
        if t.numel() % 2:
            t = torch.cat([t, t.new_zeros(1)])
        t = t[: t.numel() // 2] ^ t[t.numel() // 2 :]
    return int(t.item())


def check_stream(buf: torch.Tensor, sms: int) -> None:
    """Every ``_stream_read`` config XORs the whole buffer exactly once (a config that skipped or
    repeated bytes would time a different read)."""
    n_vec = buf.numel() // 4
    want = xor_all(buf)
    for per_sm, warps, unroll, contiguous in STREAM_GRID:
        out = torch.zeros(per_sm * sms, dtype=torch.int32, device="cuda")
        _stream_read[(per_sm * sms,)](buf, out, n_vec, **stream_kwargs(warps, unroll, contiguous))
        if xor_all(out) != want:
            raise SystemExit(f"_stream_read {(per_sm, warps, unroll, contiguous)} read the wrong bytes")


def measure_shape(n: int, k: int, sms: int) -> tuple[str, list]:
    """One table row for an N x K weight, and every stream-read config's time."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, scales = quantize_mxfp4(w, backend="triton")
    nbytes = packed.numel() + scales.numel()
    copies = max(1, math.ceil(ROTATE_BYTES / nbytes))
    qs = [(packed.clone(), scales.clone()) for _ in range(copies)]
    # The same bytes as one flat int32 buffer (scales appended; padded to whole 16-byte vectors).
    flat = torch.cat([packed.flatten(), scales.flatten(), packed.new_zeros(-nbytes % 16)]).view(torch.int32)
    check_stream(flat, sms)
    bufs = [flat.clone() for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ws = [w.clone() for _ in range(max(1, math.ceil(ROTATE_BYTES / (2 * n * k))))]
    t_bf16 = bench(lambda: [F.linear(x, wi) for wi in ws], len(ws))
    n_same = nbytes // (2 * k)
    same = torch.randn(n_same, k, device="cuda", dtype=torch.bfloat16)
    sames = [same.clone() for _ in range(max(1, math.ceil(ROTATE_BYTES / same.numel() / 2)))]
    t_same = bench(lambda: [F.linear(x, s) for s in sames], len(sames))
    kmm.mxfp4_matmul_triton(x, packed, scales, None, 32)  # the dispatch picks and remembers its config
    t_fused = bench(lambda: [kmm.mxfp4_matmul_triton(x, p, s, None, 32) for p, s in qs], len(qs))
    t_read, _ = read_alone(qs)
    t_stream, cfg, rows = stream_ceiling(bufs, sms)
    tbs = nbytes / (t_stream * 1e-3) / 1e12
    row = (
        f"| {n}x{k} | {nbytes / 2**20:.1f} MiB | {t_bf16 * 1e3:.1f} | {t_fused * 1e3:.1f} "
        f"({chosen_config(1, n, k, x)}) | {t_read * 1e3:.1f} | {t_same * 1e3:.1f} (N'={n_same}) "
        f"| {t_stream * 1e3:.1f} ({'/'.join(map(str, cfg))}) | {tbs:.2f} | {t_bf16 / t_fused:.2f} "
        f"| {t_bf16 / t_stream:.2f} | {t_fused / t_stream:.2f} |"
    )
    return row, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    start = time.time()
    lines = [
        f"device: {props.name}; {sms} SMs; torch {torch.__version__}, triton {triton.__version__}",
        f"times: median of CUDA-graph replays (do_bench_cudagraph), per call, rotating over >= {ROTATE_BYTES >> 20} "
        "MiB of buffer copies per candidate",
        "",
    ]
    out = torch.empty(1, dtype=torch.int32, device="cuda")
    t_empty = bench(lambda: [_empty[(sms,)](out) for _ in range(64)], 64)
    lines += [f"empty kernel ({sms} programs), per launch: {t_empty * 1e3:.2f} us", ""]
    lines += [
        "| N x K | MXFP4 bytes | bf16 F.linear us | fused M=1 us (config) | read_alone us | cuBLAS same bytes us "
        "| stream read us (programs/SM, warps, loads in flight, contiguous) | stream TB/s "
        "| fused x bf16 | ceiling x bf16 (bf16 / stream) | fused / stream |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_rows = {}
    for n, k in SHAPES:
        row, rows = measure_shape(n, k, sms)
        all_rows[(n, k)] = rows
        lines.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    lines += ["", "every stream-read config (us), per shape:", ""]
    shapes = list(all_rows)
    lines.append(
        "| programs/SM, warps, loads in flight, contiguous | " + " | ".join(f"{n}x{k}" for n, k in shapes) + " |"
    )
    lines.append("|---|" + "---|" * len(shapes))
    for i, (_, cfg) in enumerate(all_rows[shapes[0]]):
        lines.append(
            f"| {'/'.join(map(str, cfg))} | " + " | ".join(f"{all_rows[s][i][0] * 1e3:.1f}" for s in shapes) + " |"
        )
    lines += ["", "the fastest stream read (us) at each number of resident warps an SM (programs/SM x warps):", ""]
    lines.append("| warps an SM | " + " | ".join(f"{n}x{k}" for n, k in shapes) + " |")
    lines.append("|---|" + "---|" * len(shapes))
    for level in sorted({per_sm * warps for per_sm, warps, _, _ in STREAM_GRID}):
        best = [min(t for t, c in all_rows[s] if c[0] * c[1] == level) for s in shapes]
        lines.append(f"| {level} | " + " | ".join(f"{t * 1e3:.1f}" for t in best) + " |")
    lines += ["", f"wall time {time.time() - start:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                "# Reading one MXFP4 weight's bytes: the ceiling for M = 1 (`eval/kernels/bench_read_ceiling.py`)\n\n"
            )
            f.write(text + "\n")


if __name__ == "__main__":
    main()
