"""Time of one mixture-of-experts experts layer, MXFP4 (the ``qwantize_mxfp4`` experts implementation)
against the same experts in bf16 run by each of transformers' own implementations, and their weight bytes.

The layer is Qwen3-30B-A3B's experts module shape (128 experts, top 8, hidden 2048, expert
intermediate 768; random N(0, 0.02) weights), transformers' ``Qwen3MoeExperts`` class; the MXFP4 copy
holds each projection quantized with plain ``mse`` (``experts.install``). For each token count, routings
are drawn at random (distinct top-8 experts per token, softmax weights) and a pool of them is cycled,
so that the experts a call reads are not the ones the call before left in L2. Each variant is checked
first against a fake-quant reference (the bf16 module holding the dequantized MXFP4 weights, eager).
Times are medians over the pool: of CUDA-graph replays where the variant captures (one graph per
routing), else of eager calls (host time included, marked). ``ours (auto)`` is what a model runs
(``experts_forward``: on CUDA the routed op, whose routed CUDA-core kernel takes up to
``routed_op.gemv_pairs`` pairs and the grouped kernel more; on CPU the per-expert loop above 16 pairs);
``routed-gemv``, ``grouped`` and ``loop`` force each path.

    python eval/bench_moe.py --out eval/results/bench_moe_h100.md
    python eval/bench_moe.py --device cpu --small       # a check of the script itself, no timing worth reading
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from qwantize_hf import dequantize_mxfp4, routed_op
from qwantize_hf import experts as ex

SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
    "small": dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4),
}
BF16_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
POOL = 8  # routings cycled per token count
# transformers' batched_mm gathers every pair's expert weights in bf16 (pairs x 9.4 MiB here): skipped above
BATCHED_MM_MAX_PAIRS = 512


def build(shape: dict, device: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(bf16 module, MXFP4 module, fake-quant reference module)."""
    torch.manual_seed(0)
    module = Qwen3MoeExperts(Qwen3MoeConfig(**shape)).to(device, torch.bfloat16)
    with torch.no_grad():
        for projection in ex.PROJECTIONS:
            getattr(module, projection).normal_(0.0, 0.02)
    quantized, reference = copy.deepcopy(module), copy.deepcopy(module)
    done = ex.quantize_float(module, block_size=32)
    with torch.no_grad():
        for projection, (packed, scales) in done.items():
            getattr(reference, projection).copy_(dequantize_mxfp4(packed, scales, dtype=torch.bfloat16))
    ex.install(quantized, done, block_size=32)
    ex.register_implementation()
    quantized.config._experts_implementation = ex.IMPLEMENTATION
    reference.config._experts_implementation = "eager"
    return module, quantized, reference


def routings(shape: dict, tokens: int, device: str, seed: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL):
        hidden = torch.randn(tokens, shape["hidden_size"], generator=generator).to(device, torch.bfloat16)
        scores = torch.rand(tokens, shape["num_experts"], generator=generator)
        index = scores.topk(shape["num_experts_per_tok"], dim=-1).indices.to(device)
        weights = torch.rand(index.shape, generator=generator).softmax(-1).to(device, torch.bfloat16)
        pool.append((hidden, index, weights))
    return pool


def variants(module, quantized) -> dict:
    def bf16(name):
        def run(*args):
            module.config._experts_implementation = name
            return module(*args)

        return run

    out = {f"bf16 {name}": bf16(name) for name in BF16_IMPLEMENTATIONS if name == "eager" or name in _registered()}
    out["ours (auto)"] = lambda *args: quantized(*args)
    out["ours routed-gemv"] = _forced(quantized, gemv_pairs=10**9)
    out["ours grouped"] = _forced(quantized, gemv_pairs=0)
    out["ours loop"] = lambda *args: ex._looped(quantized, *args)
    return out


def _forced(quantized, gemv_pairs: int):
    """The routed calls with the routed op's CUDA path forced: every count to the routed CUDA-core kernel
    (``gemv_pairs`` huge) or to the grouped kernel (0). Set around each call, so a captured graph holds it."""

    def run(*args):
        saved = routed_op.GEMV_MAX_PAIRS, routed_op.GEMV_PAIRS_PER_EXPERT
        routed_op.GEMV_MAX_PAIRS = routed_op.GEMV_PAIRS_PER_EXPERT = gemv_pairs
        try:
            return ex._gathered(quantized, *args)
        finally:
            routed_op.GEMV_MAX_PAIRS, routed_op.GEMV_PAIRS_PER_EXPERT = saved

    return run


def _registered() -> set[str]:
    from transformers.integrations.moe import ExpertsInterface

    return set(ExpertsInterface._global_mapping)


def time_graphs(fn, pool) -> float | None:
    """Median ms of CUDA-graph replays, one graph per routing of the pool; None when capture fails."""
    try:
        graphs = []
        shared = None  # one memory pool for the pool's graphs (replayed in turn, never at once)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for args in pool:
                fn(*args)  # warm-up (compiles, chooses configs) outside the capture
        torch.cuda.synchronize()
        for args in pool:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=shared):
                fn(*args)
            shared = graph.pool()
            graphs.append(graph)
    except Exception:  # a host sync or an uncapturable op: timed eagerly instead
        torch.cuda.synchronize()
        return None
    return _median(lambda i: graphs[i % len(graphs)].replay(), reps=20 * len(graphs))


def time_eager(fn, pool) -> float:
    for args in pool:
        fn(*args)
    return _median(lambda i: fn(*pool[i % len(pool)]), reps=5 * len(pool))


def _median(call, reps: int) -> float:
    if not torch.cuda.is_available():
        times = []
        for i in range(reps):
            start = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(fn, reference, pool) -> float:
    """Worst relative error of the variant against the fake-quant reference over the pool."""
    worst = 0.0
    with torch.no_grad():
        for args in pool:
            got, want = fn(*args).float(), reference(*args).float()
            worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 8, 32, 512])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small layer (a check of the script)")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    shape = SHAPES["small" if args.small else "qwen3-30b-a3b"]
    module, quantized, reference = build(shape, args.device)
    bf16_bytes = sum(getattr(module, p).numel() * 2 for p in ex.PROJECTIONS)
    mxfp4_bytes = sum(t.numel() for pair in ex.stored_pairs(quantized) for t in map(quantized.get_parameter, pair))
    runs = variants(module, quantized)
    rows, errors = [], {}
    with torch.no_grad():
        for tokens in args.tokens:
            pool = routings(shape, tokens, args.device, seed=tokens)
            row = {"tokens": tokens, "pairs": tokens * shape["num_experts_per_tok"]}
            for name, fn in runs.items():
                if name == "bf16 batched_mm" and row["pairs"] > BATCHED_MM_MAX_PAIRS:
                    row[name] = None
                    continue
                if name.startswith("ours"):
                    errors[(tokens, name)] = check(fn, reference, pool)
                graphed = time_graphs(fn, pool) if args.device == "cuda" else None
                row[name] = (graphed, True) if graphed is not None else (time_eager(fn, pool), False)
            rows.append(row)
            print(row, flush=True)
    worst = max(errors.values())
    assert worst < 1e-2, f"a variant is off the fake-quant reference: {worst:.2e}"
    names = list(runs)
    probe = torch.empty(1, shape["hidden_size"], dtype=torch.bfloat16, device=args.device)
    routed_up_to = ex.gather_pairs(quantized, probe)  # what experts_forward uses on this device
    if routed_up_to is None:
        auto = (
            f"the routed CUDA-core kernel up to {routed_op.gemv_pairs(shape['num_experts'])} (token, expert) "
            "pairs, the grouped kernel above"
        )
    else:
        auto = f"the routed op's torch twin up to {routed_up_to} (token, expert) pairs, the loop above"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"# One MoE experts layer, MXFP4 vs bf16 ({device})",
        "",
        f"- {'a small' if args.small else 'Qwen3-30B-A3B' + chr(39) + 's'} experts shape: {shape}; "
        "transformers `Qwen3MoeExperts`, random N(0, 0.02) weights, "
        f"bf16 activations; routings drawn at random, a pool of {POOL} cycled; torch {torch.__version__}",
        f"- Command: `python eval/bench_moe.py{' --small' if args.small else ''}`",
        f"- Expert weight bytes: bf16 {bf16_bytes / 2**20:.1f} MiB, MXFP4 {mxfp4_bytes / 2**20:.1f} MiB "
        f"({mxfp4_bytes / bf16_bytes:.3f}x)",
        f"- Checked first: every `ours` variant against the fake-quant reference, worst relative error {worst:.1e}",
        f"- Milliseconds per call, median; `g`: CUDA-graph replays, `e`: eager calls (host time included). "
        f"`ours (auto)` takes {auto}; `bf16 batched_mm` is skipped above "
        f"{BATCHED_MM_MAX_PAIRS} pairs (it gathers every pair's bf16 weights); the last column compares with "
        "the fastest bf16 implementation, whichever way each was timed",
        "",
        "| tokens | pairs | " + " | ".join(names) + " | ours (auto) vs fastest bf16 |",
        "|---:|---:|" + "---:|" * (len(names) + 1),
    ]
    for row in rows:
        best_bf16 = min(row[n][0] for n in names if n.startswith("bf16") and row[n] is not None)
        cells = [f"{row[n][0]:.3f} {'g' if row[n][1] else 'e'}" if row[n] is not None else "-" for n in names]
        speedup = best_bf16 / row["ours (auto)"][0]
        lines.append(f"| {row['tokens']} | {row['pairs']} | " + " | ".join(cells) + f" | {speedup:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)


if __name__ == "__main__":
    main()
