"""Side by side: 4-bit weight-only matmuls of Llama-3-8B layer shapes on one GPU, and bf16 ``F.linear``.

Variants (columns), each built once per N x K weight (random N(0, 0.02), bf16) and called as ``y = f(x)`` on
bf16 ``x [M, K]`` (random, std 1): ``bf16`` ``F.linear`` (cuBLAS), the baseline (``x bf16`` = its time over a
variant's, > 1 = faster); ``ours`` ``mxfp4_linear`` on ``quantize_mxfp4(w)``, the public op (its first call for
a shape and M times its candidate kernels and keeps one: ``ours kernel``); ``torch-int4``
``aten._weight_int4pack_mm`` (tinygemm); ``gemlite-mxfp4`` GemLite's ``A16W4_MXFP`` on ours' very codes and
scales; ``gemlite-int4`` GemLite's ``A16W4_HQQ_INT``; ``bnb-nf4`` bitsandbytes ``Linear4bit`` NF4 (the report's
header says how each quantizes). A peer that is not installed or does not build prints ``skip <name>: <reason>``.

First every output at every shape and M is checked against a float32 product of the variant's own dequantized
weight (relative Frobenius error < 1e-2; of the original weight, < 0.25, where it has none): one that fails reads
``wrong`` and is not timed. That call is also where GemLite autotunes and ours chooses. Times are medians of
CUDA-graph replays (``gpu_bench.bench``), per call, rotating over copies of each variant's weight (one module a
copy for GemLite and bitsandbytes) of >= 200 MiB together up to M = 64, >= 2x L2 above, so decode times are DRAM
times; a variant that a graph cannot capture is timed with ``triton.testing.do_bench`` instead (marked ``*``).

    python eval/bench_peers.py --shapes 4096x4096 --json /tmp/a.json    # ... one run per shape (autotuning is slow)
    python eval/bench_peers.py --merge /tmp/a.json /tmp/b.json ... --out eval/results/bench_peers_h100.md
    python eval/bench_peers.py --device cpu --small      # a check of the script itself, no timing worth reading
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.evaluation.gpu_bench import L2_BYTES, ROTATE_BYTES, SHAPES, bench, chosen_config, errors
from qwantize_hf.format import unpack_codes
from qwantize_hf.linear_op import mxfp4_linear

MS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096]
SMALL_SHAPES, SMALL_MS = [(64, 64)], [1, 17]
PEERS = {"torch-int4": None, "gemlite-mxfp4": "gemlite", "gemlite-int4": "gemlite", "bnb-nf4": "bitsandbytes"}
VARIANTS = ["bf16", "ours", *PEERS]
TORCH_INT4_GROUP, GEMLITE_INT4_GROUP = 32, 64
OWN_BOUND, ORIGINAL_BOUND = 1e-2, 0.25  # relative Frobenius error of the output
HEAVY_M = 64  # above: copies of >= 2x L2 only (the calls are compute-bound, and a graph of many is slow to build)
MAX_COPIES = 32  # more than the Llama shapes need; a tiny (--small) weight gets no more


@dataclass
class Built:
    make: Callable[[], Callable]  # one more copy of the weight in the variant's format, as y = f(x)
    ref: torch.Tensor | None  # the variant's own dequantized weight, float32 [N, K]; None: check against w
    copy_bytes: int  # bytes one copy reads


def build_bf16(w: torch.Tensor, mx: tuple) -> Built:
    return Built(lambda: partial(F.linear, weight=w.clone()), w.float(), w.numel() * w.element_size())


def build_ours(w: torch.Tensor, mx: tuple) -> Built:
    packed, scales = mx
    ref = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    return Built(
        lambda: partial(mxfp4_linear, packed=packed.clone(), scales=scales.clone()), ref, packed.numel() * 17 // 16
    )


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (w as [N, K/group, group], each group's minimum, each group's step (max - min) / 15)."""
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    return g, lo, ((hi - lo) / 15).clamp(min=1e-8)


def build_torch_int4(w: torch.Tensor, mx: tuple) -> Built:
    n, k = w.shape
    g, lo, scale = int4_groups(w, TORCH_INT4_GROUP)
    scale = scale.bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()  # tinygemm's zero: the value of q = 8
    q = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
    ref = ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    q = q.reshape(n, k).to(torch.uint8)
    # torch >= 2.5 takes uint8 [N, K/2], element 2i in the high nibble (common_quantization._group_quantize_tensor)
    q_bytes = (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack(q_bytes, inner_k_tiles)
    scales_and_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().bfloat16()  # [K/group, N, 2]

    def make():
        p, sz = packed.clone(), scales_and_zeros.clone()
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, p, TORCH_INT4_GROUP, sz)

    return Built(make, ref, q_bytes.numel() + scales_and_zeros.numel() * 2)


def build_gemlite_mxfp4(w: torch.Tensor, mx: tuple) -> Built:
    from gemlite.helper import A16W4_MXFP

    packed, scales = mx
    codes = unpack_codes(packed)  # a code a byte [N, K]: E2M1 bits, GemLite's index order (8..15 negative)
    e8m0 = scales.view(torch.float8_e8m0fnu)  # same bits, 2**(byte - 127): GemLite's pack keeps e8m0 as is

    ref = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    return Built(
        lambda: A16W4_MXFP(str(w.device), torch.bfloat16).from_weights(codes, e8m0), ref, packed.numel() * 17 // 16
    )


def build_gemlite_int4(w: torch.Tensor, mx: tuple) -> Built:
    from gemlite.helper import A16W4_HQQ_INT

    n, k = w.shape
    g, lo, step = int4_groups(w, GEMLITE_INT4_GROUP)
    scale = step.bfloat16()
    zero = (-lo / scale.float()).bfloat16()  # HQQ's zero point, in q units
    q = (g / scale.float()[..., None] + zero.float()[..., None]).round().clamp(0, 15)
    # GemLite's pack stores -zero * scale in bf16 and computes q * scale + that (core.py, fma_mode)
    shift = (-zero.float() * scale.float()).bfloat16().float()
    ref = (q * scale.float()[..., None] + shift[..., None]).reshape(n, k)
    q = q.reshape(n, k).to(torch.uint8)

    return Built(
        lambda: A16W4_HQQ_INT(str(w.device), torch.bfloat16).from_weights(q, scale, zero),
        ref,
        q.numel() // 2 + 4 * scale.numel(),
    )


def build_bnb_nf4(w: torch.Tensor, mx: tuple) -> Built:
    import bitsandbytes as bnb

    n, k = w.shape

    def make():
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", module=layer)
        return layer.to(w.device)  # Params4bit quantizes on its move to the GPU

    data, state = (probe := make()).weight.data, probe.weight.quant_state  # quantizing is deterministic
    ref = bnb.functional.dequantize_4bit(data, state).float()
    return Built(make, ref, data.numel() + state.absmax.numel() * state.absmax.element_size())


BUILDERS = dict(
    zip(VARIANTS, (build_bf16, build_ours, build_torch_int4, build_gemlite_mxfp4, build_gemlite_int4, build_bnb_nf4))
)


def copies(copy_bytes: int, m: int, device: str) -> int:
    """Weight copies a timed call rotates over (one on the CPU: no timing worth reading there)."""
    rotate = ROTATE_BYTES if m <= HEAVY_M else 2 * L2_BYTES
    return 1 if device == "cpu" else min(MAX_COPIES, max(1, math.ceil(rotate / copy_bytes)))


def time_ms(calls: list[Callable], x: torch.Tensor) -> tuple[float, bool]:
    """(median ms of one call, whether it was timed as CUDA-graph replays)."""

    def fn():
        return [f(x) for f in calls]

    if not x.is_cuda:  # a check of the script: one plain loop
        start = time.perf_counter()
        for _ in range(5):
            fn()
        return (time.perf_counter() - start) * 1e3 / (5 * len(calls)), False
    try:
        return bench(fn, len(calls)), True
    except Exception:  # a host sync or another uncapturable step: timed without a graph
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, rep=100, return_mode="median") / len(calls), False


def reason(exc: Exception) -> str:
    """An exception as one short line (torch's dispatcher errors run to pages)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def run_shape(n: int, k: int, ms: list[int], device: str, skipped: dict, log: Callable) -> list[dict]:
    """One record per variant and M: check, then time."""
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    mx = quantize_mxfp4(w)
    built, made, records = {}, {}, []
    for name in VARIANTS:
        if name in skipped:
            continue
        try:
            variant = BUILDERS[name](w, mx)
            made[name] = [variant.make() for _ in range(copies(variant.copy_bytes, min(ms), device))]
            built[name] = variant
        except ImportError as exc:
            skipped[name] = f"does not import ({reason(exc)})"
            log(f"skip {name}: {skipped[name]}")
        except Exception as exc:  # a peer that does not build on this GPU, or for this shape
            log(f"skip {name}: does not build for {n}x{k}: {reason(exc)}")
    weight_err = {
        name: float((b.ref - w.float()).norm() / w.float().norm()) for name, b in built.items() if b.ref is not None
    }
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        for name in built:
            record = {"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "variant": name, "weight_err": weight_err.get(name)}
            records.append(record)
            ref, bound = (built[name].ref, OWN_BOUND) if built[name].ref is not None else (w.float(), ORIGINAL_BOUND)
            try:  # also the call in which GemLite autotunes and ours chooses its kernel, before any timing
                record["err"] = errors(made[name][0](x), x, ref)[0]
            except Exception as exc:  # a peer's kernel that fails for this M: its cell reads "-"
                record["status"] = "failed"
                log(f"skip {name}: fails at {n}x{k}, M = {m}: {reason(exc)}")
                continue
            record["status"] = "ok" if record["err"] < bound else "wrong"
            if record["status"] == "wrong":
                log(f"{name} is wrong at {n}x{k}, M = {m}: rel err {record['err']:.2e} >= {bound}")
                continue
            record["ms"], record["graph"] = time_ms(made[name][: copies(built[name].copy_bytes, m, device)], x)
            if name == "ours":
                record["config"] = chosen_config(m, n, k, x) if x.is_cuda else "torch (cpu)"
        timed = [f"{r['variant']} {r['ms'] * 1e3:.1f} us" for r in records if r["m"] == m and "ms" in r]
        log(f"{n}x{k} M={m}: " + ", ".join(timed), table=False)
    return records


def cell(record: dict | None, base: dict | None) -> tuple[str, str]:
    """(us, x bf16) as table text."""
    if record is None or record["status"] != "ok":
        return ("wrong" if record and record["status"] == "wrong" else "-"), "-"
    us = f"{record['ms'] * 1e3:.1f}{'' if record['graph'] else '*'}"
    ratio = f"{base['ms'] / record['ms']:.2f}" if base and "ms" in base else "-"
    return us, ratio


def shape_table(records: list[dict], n: int, k: int, ms: list[int]) -> list[str]:
    peers = VARIANTS[1:]
    lines = [f"### N x K = {n}x{k}", "", "| M | bf16 us | " + " | ".join(f"{v} us | {v} x bf16" for v in peers)]
    lines[-1] += " | ours kernel |"
    lines.append("|---:|" + "---:|" * (1 + 2 * len(peers)) + "---|")
    for m in ms:
        row = {r["variant"]: r for r in records if r["m"] == m}
        base = row.get("bf16")
        cells = [cell(base, None)[0]] + [c for v in peers for c in cell(row.get(v), base)]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {row.get('ours', {}).get('config', '-')} |")
    worst = {v: max((r["err"] for r in records if r["variant"] == v and "err" in r), default=None) for v in VARIANTS}
    weight = {r["variant"]: r["weight_err"] for r in records if r["weight_err"] is not None}
    lines += [
        "",
        "output rel err vs the variant's own dequantized weight, worst over M: "
        + ", ".join(f"{v} {e:.1e}" for v, e in worst.items() if e is not None),
        "",
        "weight rel err vs the bf16 weight: " + ", ".join(f"{v} {e:.3f}" for v, e in weight.items()),
        "",
    ]
    return lines


def summary(records: list[dict], ms: list[int]) -> list[str]:
    lines = [
        "### Summary",
        "",
        "| M | ours x bf16 (min-max over shapes) | best peer x bf16 (name, min-max) | ours >= every peer? |",
        "|---:|---|---|---|",
    ]
    for m in ms:
        timed = [r for r in records if r["m"] == m and "ms" in r]
        ours, best, best_names, lost = [], [], set(), []
        for shape in dict.fromkeys(r["shape"] for r in timed):
            row = {r["variant"]: r["ms"] for r in timed if r["shape"] == shape}
            peers = {v: t for v, t in row.items() if v in PEERS}
            if "bf16" not in row:
                continue
            if "ours" in row:
                ours.append(row["bf16"] / row["ours"])
                lost += [f"{shape} {v}" for v, t in peers.items() if t < row["ours"]]
            if peers:
                name = min(peers, key=peers.get)
                best.append(row["bf16"] / peers[name])
                best_names.add(name)
        ours_text = f"{min(ours):.2f}-{max(ours):.2f}" if ours else "-"
        best_text = f"{'/'.join(sorted(best_names))}, {min(best):.2f}-{max(best):.2f}" if best else "-"
        verdict = "-" if not ours or not best else "yes" if not lost else "no: " + ", ".join(lost)
        lines.append(f"| {m} | {ours_text} | {best_text} | {verdict} |")
    return lines


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(meta: dict, records: list[dict]) -> str:
    """The markdown: header, one table per shape, the summary."""
    shapes, ms = list(dict.fromkeys((r["n"], r["k"]) for r in records)), sorted({r["m"] for r in records})
    timing = (
        "median per call of CUDA-graph replays (do_bench_cudagraph), rotating over weight copies of "
        f">= {ROTATE_BYTES >> 20} MiB per variant up to M = {HEAVY_M}, >= {2 * L2_BYTES >> 20} MiB above; `*`: not "
        "capturable, timed by triton.testing.do_bench"
        if meta["cuda"]
        else "5 calls timed by time.perf_counter (`*`), no timing worth reading"
    )
    lines = [
        f"# 4-bit weight-only matmuls vs bf16 F.linear ({meta['device']})",
        "",
        f"- {', '.join(f'{p} {v}' for p, v in meta['versions'].items())}; {meta['date']}; wall {meta['wall_s']:.0f} s",
        f"- Command: `{meta['command']}`",
        "- Weights random N(0, 0.02) bf16 [N, K], activations random bf16 [M, K], std 1; variants: `bf16` "
        "F.linear; `ours` mxfp4_linear (MXFP4, blocks of 32); `torch-int4` aten._weight_int4pack_mm, "
        f"asymmetric int4 groups of {TORCH_INT4_GROUP}; `gemlite-mxfp4` A16W4_MXFP on ours' codes and scales; "
        f"`gemlite-int4` A16W4_HQQ_INT, asymmetric int4 groups of {GEMLITE_INT4_GROUP}; `bnb-nf4` "
        "Linear4bit NF4, blocks of 64, double-quantized absmax",
        f"- us: {timing}; x bf16 = bf16 us / variant us (> 1 = faster than bf16); `wrong`: output off its own "
        f"dequantized weight's product by >= {OWN_BOUND} (not timed); `-`: skipped",
        "",
        *(meta["notes"] or ["no variant skipped"]),
        "",
    ]
    for n, k in shapes:
        lines += shape_table([r for r in records if (r["n"], r["k"]) == (n, k)], n, k, ms)
    return "\n".join(lines + summary(records, ms)) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help='N x K list, e.g. "4096x4096,14336x4096"')
    parser.add_argument("--ms", default=None, help='rows of x, e.g. "1,16,256"')
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 64x64 weight, M in {1, 17} (a check of the script)")
    parser.add_argument("--out", default=None, help="write the markdown here too")
    parser.add_argument("--json", default=None, help="write one record per shape, M and variant here")
    parser.add_argument("--merge", nargs="+", default=None, help="run nothing: report these --json files as one")
    args = parser.parse_args(argv)
    command = " ".join(["python eval/bench_peers.py", *(sys.argv[1:] if argv is None else argv)])
    if args.merge:  # e.g. one run per shape, each within a time limit
        runs = [json.loads(Path(path).read_text()) for path in args.merge]
        meta = runs[0]["meta"] | {"command": "; ".join(run["meta"]["command"] for run in runs) + f"; {command}"}
        meta |= {"notes": list(dict.fromkeys(note for run in runs for note in run["meta"]["notes"]))}
        meta["wall_s"] = sum(run["meta"]["wall_s"] for run in runs)
        records = [record for run in runs for record in run["records"]]
    else:
        meta, records = measure(args, command)
    text = report(meta, records)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "records": records}, file, indent=1)


def measure(args: argparse.Namespace, command: str) -> tuple[dict, list[dict]]:
    """(run metadata, records) of the variants on args' shapes and Ms."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    shapes = shapes or (SMALL_SHAPES if args.small else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (SMALL_MS if args.small else MS)
    torch.manual_seed(0)
    notes = []

    def log(line: str, table: bool = True) -> None:
        print(line, flush=True)
        if table:
            notes.append(line)

    skipped = {}
    for name, package in PEERS.items():
        if package is not None and importlib.util.find_spec(package) is None:
            skipped[name] = f"not installed (no module {package!r})"
        elif args.device == "cpu":
            skipped[name] = "runs on CUDA only here (--device cpu times bf16 and ours)"
        if name in skipped:
            log(f"skip {name}: {skipped[name]}")
    t_start, records = time.time(), []
    with torch.no_grad():
        for n, k in shapes:
            records += run_shape(n, k, ms, args.device, skipped, log)
            if args.device == "cuda":
                torch.cuda.empty_cache()  # the shape's copies are gone
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    versions |= {package: version(package) for package in ("gemlite", "bitsandbytes")}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    meta = {"device": device, "cuda": args.device == "cuda", "versions": versions, "command": command}
    meta |= {"date": datetime.date.today().isoformat(), "wall_s": time.time() - t_start, "notes": notes}
    return meta, records


if __name__ == "__main__":
    main()
