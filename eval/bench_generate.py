"""Generation benchmark: a causal LM (random weights, Llama or Qwen3-MoE shapes) in bf16 vs MXFP4 (GPU only).

Builds the model from a config dict (Llama-3.2-1B or Llama-3-8B shapes, or Qwen3-30B-A3B's with
8 of its 48 decoder layers, a mixture-of-experts model; nothing is downloaded), measures bf16, then
swaps every ``nn.Linear`` inside the decoder layers for an MXFP4 layer whose product is the fused
kernel (``mxfp4_linear``), and makes every fused experts module MXFP4 (the ``qwantize_mxfp4`` experts
implementation: routed kernel at decode), and measures again with identical settings: greedy decode
tokens/s at batch 1 and 8 (static KV cache; generate() then compiles the decode step with CUDA graphs, for both,
unless ``--no-compile``), prefill time for a 2k-token prompt, weight bytes
and peak GPU memory. The embeddings and ``lm_head`` stay bf16 in both runs.
generate() synchronises every step, so its tokens/s include 2-3 ms of host time a step
that varies by machine; ``--graph-loop`` also times the compiled step replayed as one
CUDA graph with no synchronisation between steps (the model's own decode rate).

    python eval/bench_generate.py --model 8b --out eval/results/bench_generate_h100.md

Compiling the 8B decode step takes minutes per weight format and batch size; ``--only
bf16`` / ``--only mxfp4`` measure one format per process (the table then has its row alone).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, StaticCache

from qwantize_hf import experts as ex
from qwantize_hf.evaluation.shapes import CONFIGS
from qwantize_hf.linear import MXFP4Linear

# Qwen3-30B-A3B's shapes (its config.json), 8 of its 48 decoder layers: the experts' share of the weights and
# of each decode step as in the full model, a fifth of its memory
MOE_CONFIGS = {
    "qwen3-30b-a3b-8l": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}


def quantize_decoder_linears(model: nn.Module) -> int:
    """Replace every nn.Linear under ``model.model.layers`` in place; returns how many."""
    count = 0
    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            for attr, sub in list(child.named_children()):
                if type(sub) is nn.Linear:
                    setattr(child, attr, MXFP4Linear.from_linear(sub, name=f"{name}.{attr}"))
                    count += 1
    return count


def quantize_experts(model: nn.Module) -> int:
    """Make every fused experts module under ``model.model.layers`` MXFP4 (plain mse, blocks of 32 along each
    expert's reduction dimension) and run them as the ``qwantize_mxfp4`` implementation; returns how many."""
    names = [f"model.layers.{i}.{name}" for i, layer in enumerate(model.model.layers)
             for name, module in layer.named_modules() if ex.is_fused_experts(module)]  # fmt: skip
    for name in names:
        module = model.get_submodule(name)
        ex.install(module, ex.quantize_float(module, block_size=32, name=name), block_size=32)
    if names:
        ex.use_implementation(model, names)
    return len(names)


def build_model(name: str) -> nn.Module:
    """The bf16 model of ``--model`` on the GPU (the CPU when there is none), random weights."""
    moe = name in MOE_CONFIGS
    config = Qwen3MoeConfig(**MOE_CONFIGS[name]) if moe else LlamaConfig(**CONFIGS[name])
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = (Qwen3MoeForCausalLM if moe else LlamaForCausalLM)(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def decoder_weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.model.layers.parameters())


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def profile_decode(model, ids, kwargs) -> None:
    """Print the GPU kernels of one decode step by total time, and the host operations by
    their own CPU time, from torch.profiler."""
    one = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
    tokens = kwargs["max_new_tokens"] - 1  # the same cache length as the timed run: no recompilation
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    gpu_tables, cpu_tables = [], []
    for run_kwargs in (one, kwargs):
        with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
            model.generate(ids, **run_kwargs)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_tables.append({e.key: (e.device_time_total, e.count) for e in events if e.device_time_total > 0})
        cpu_tables.append({e.key: (e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0})
    # The prefill and first token appear in both runs: the difference is the decode steps.
    host = "host (self CPU) time, waits for the GPU (cudaStreamSynchronize) included,"
    for title, tables in (("GPU kernel time", gpu_tables), (host, cpu_tables)):
        rows = []
        for name, (total, count) in tables[1].items():
            base_total, base_count = tables[0].get(name, (0.0, 0))
            if count > base_count:
                rows.append(((total - base_total) / tokens, (count - base_count) / tokens, name))
        rows.sort(reverse=True)
        step = sum(r[0] for r in rows)
        print(f"{title} per decode step: {step:.0f} us, top entries (us per step, calls per step):")
        for us, calls, name in rows[:15]:
            print(f"  {us:8.1f} us  {calls:6.1f}  {name[:110]}")


def graph_decode_tok_s(model, batch: int, args, backend: str = "inductor") -> float:
    """Greedy decode tokens/s of the model alone: the compiled decode step (static cache) captured
    in one CUDA graph with its argmax and position update, replayed step after step with no
    synchronisation in between, so no host time of generate() is counted (how a serving loop
    that keeps the GPU fed would see it). ``backend``: torch.compile's (a CPU smoke test uses
    "eager", without the graph)."""
    total = args.prompt_tokens + args.new_tokens
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), device=device, generator=gen)
    cache = StaticCache(config=model.config, max_cache_len=total)
    # Static shapes: Dynamo would otherwise compile a later batch size with a symbolic batch.
    forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=backend)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1], device=device)).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([ids.shape[1]], device=device)

        def step():
            out = forward(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
            token.copy_(out[:, -1:].argmax(-1))
            position.add_(1)

        # The cache holds prompt + new_tokens positions: 3 warm-up steps, one untimed replay
        # (the graph's upload), the timed ones.
        warmup, steps = 3, args.new_tokens - 5
        if steps < 1:
            raise ValueError(f"--graph-loop needs --new-tokens of at least 6, got {args.new_tokens}")
        if device.type != "cuda":
            for _ in range(warmup + 1 + steps):
                step()
            return float("nan")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # compiles, autotunes
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        seconds = sync_time(lambda: [graph.replay() for _ in range(steps)])
    return batch * steps / seconds


def measure(model, label: str, args) -> dict:
    t_start = time.perf_counter()
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {"label": label, "weights_gb": weight_bytes(model) / 1e9, "decoder_gb": decoder_weight_bytes(model) / 1e9}
    # Prefill: one forward over a 2k-token prompt (no cache), median of a few.
    prompt = torch.randint(0, vocab, (1, args.prefill_tokens), device="cuda", generator=gen)
    with torch.inference_mode():
        model(prompt, use_cache=False)
        times = sorted(sync_time(lambda: model(prompt, use_cache=False)) for _ in range(5))
    results["prefill_ms"] = times[len(times) // 2] * 1e3
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, args.prompt_tokens), device="cuda", generator=gen)
        kwargs = dict(
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            cache_implementation="static",
            pad_token_id=0,
        )
        with torch.inference_mode():
            for _ in range(2):  # compile, capture and autotune outside the timed run
                model.generate(ids, **kwargs)
            one = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
            short = sync_time(lambda ids=ids, one=one: model.generate(ids, **one))
            full = sync_time(lambda ids=ids, kwargs=kwargs: model.generate(ids, **kwargs))
        # Subtract the prefill-and-first-token time so the rate is decode steps alone.
        results[f"tok_s_b{batch}"] = batch * (args.new_tokens - 1) / (full - short)
        print(f"batch {batch}: {(full - short) / (args.new_tokens - 1) * 1e3:.2f} ms a decode step (wall)", flush=True)
        if args.graph_loop:
            results[f"graph_tok_s_b{batch}"] = graph_decode_tok_s(model, batch, args)
            print(f"batch {batch}: CUDA-graph decode loop {results[f'graph_tok_s_b{batch}']:.1f} tok/s", flush=True)
        if args.profile:
            profile_decode(model, ids, kwargs)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model.generate(torch.randint(0, vocab, (max(args.batches), args.prompt_tokens), device="cuda"), **kwargs)
    results["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    results["wall_s"] = time.perf_counter() - t_start
    print(results, flush=True)  # a run stopped by a time limit still shows the formats it finished
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS) + sorted(MOE_CONFIGS), default="8b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="print the GPU kernels and host operations of a decode step (each batch)"
    )
    parser.add_argument("--only", choices=("bf16", "mxfp4"), default=None, help="measure one weight format")
    parser.add_argument(
        "--graph-loop",
        action="store_true",
        help="also time a CUDA-graph decode loop with no per-step synchronisation (compiles once more per batch)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    torch.manual_seed(0)
    model = build_model(args.model)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    # With a static cache, generate() compiles the decode step itself (fullgraph, CUDA graphs).
    model.generation_config.disable_compile = args.no_compile

    rows = [] if args.only == "mxfp4" else [measure(model, "bf16", args)]
    n_quantized = n_experts = 0
    bf16_experts = getattr(model.config, "_experts_implementation", None)
    if args.only != "bf16":
        n_quantized = quantize_decoder_linears(model)
        n_experts = quantize_experts(model)
        # Drop the bf16 compiled step (and the weights its CUDA graphs keep alive) before measuring again.
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(measure(model, "mxfp4 (fused kernel)", args))
    # Rate columns: generate()'s tokens/s for each batch, then the CUDA-graph loop's.
    rates = [(f"tok_s_b{b}", f"generate() tok/s b{b}") for b in args.batches]
    if args.graph_loop:
        rates += [(f"graph_tok_s_b{b}", f"graph-loop tok/s b{b}") for b in args.batches]
    lines = [
        f"model: {args.model if args.model in MOE_CONFIGS else 'Llama-' + args.model} shapes from config (random "
        f"weights), {n_quantized} decoder Linears and {n_experts} experts modules quantized"
        + (f" (bf16 experts run as transformers' {bf16_experts!r})" if n_experts else "")
        + "; "
        f"device {torch.cuda.get_device_name()}; torch {torch.__version__}",
        f"settings: greedy, static KV cache, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
        f"generate's static-cache compile={not args.no_compile}; "
        f"prefill = one forward over {args.prefill_tokens} tokens",
        "",
        "| weights | total weight GB | decoder-layer weight GB | prefill 2k ms | "
        + " | ".join(title for _, title in rates)
        + " | peak GPU GB |",
        "|---" * (5 + len(rates)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['weights_gb']:.2f} | {r['decoder_gb']:.2f} | {r['prefill_ms']:.1f} | "
            + " | ".join(f"{r[key]:.1f}" for key, _ in rates)
            + f" | {r['peak_gb']:.2f} |"
        )
    if len(rows) == 2:
        base, quant = rows
        lines.append(
            f"| ratio mxfp4/bf16 | {quant['weights_gb'] / base['weights_gb']:.3f} | "
            f"{quant['decoder_gb'] / base['decoder_gb']:.3f} | {quant['prefill_ms'] / base['prefill_ms']:.2f} | "
            + " | ".join(f"{quant[key] / base[key]:.2f}" for key, _ in rates)
            + f" | {quant['peak_gb'] / base['peak_gb']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
