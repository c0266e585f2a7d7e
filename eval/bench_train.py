"""One LoRA training step on a Llama-3-8B-shaped model: bf16 base, MXFP4 base, bitsandbytes NF4 base (GPU only).

The model is built from Llama-3-8B's config with random bf16 weights on the GPU (nothing is downloaded).
For each base format, the decoder layers' Linears are kept in bf16, replaced by ``MXFP4Linear`` (mse
scales, quantized on the GPU) or by bitsandbytes' ``Linear4bit`` (NF4, blocksize 64, bf16 compute, the
QLoRA default); then PEFT puts rank-16 LoRA adapters (alpha 32, dropout 0.05) on q/k/v/o/gate/up/down
(``qwantize_hf.lora.lora_config`` for MXFP4, ``peft.LoraConfig`` for the others), gradient checkpointing
is on (non-reentrant), and AdamW trains the adapters on batch 4 x 1024 random tokens. The embeddings
and ``lm_head`` stay bf16 in every run.

Reported per format: the median wall time of a step (forward, backward, optimizer step) over
``--steps`` steps after ``--warmup``, and the peak GPU memory allocated during those steps (base
weights, adapters and their optimizer state, activations and logits). Before timing, each format's
loss on the first batch is checked to be finite, and the MXFP4 base's LoRA layer output is checked
against the dequantized float reference. A missing bitsandbytes is skipped with a line saying so.

    python eval/bench_train.py --out eval/results/bench_train_h100.md
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qwantize_hf.evaluation.shapes import CONFIGS
from qwantize_hf.linear import MXFP4Linear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, layers: int | None) -> LlamaForCausalLM:
    config = LlamaConfig(**{**CONFIGS[shape], **({"num_hidden_layers": layers} if layers else {})})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def replace_decoder_linears(model: nn.Module, make) -> int:
    count = 0
    for layer in model.model.layers:
        for _, parent in list(layer.named_modules()):
            for attr, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, attr, make(child))
                    count += 1
    return count


def to_mxfp4(linear: nn.Linear) -> nn.Module:
    return MXFP4Linear.from_linear(linear, scale_method="mse")


def to_nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.bfloat16,
        quant_type="nf4", device="meta",
    )  # fmt: skip
    module.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return module.cuda()  # quantizes the weight on the GPU


def lora_model(model: nn.Module, fmt: str, rank: int):
    import peft

    kwargs = dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    if fmt == "mxfp4":
        from qwantize_hf.lora import lora_config

        config = lora_config(**kwargs)
    else:
        config = peft.LoraConfig(**kwargs)
    return peft.get_peft_model(model, config)


def check_mxfp4_layer(peft_model) -> str:
    from qwantize_hf.lora import MXFP4LoraLinear

    layer = next(m for m in peft_model.modules() if isinstance(m, MXFP4LoraLinear))
    base = layer.get_base_layer()
    x = torch.randn(1, 64, base.in_features, device="cuda", dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = F.linear(x.float(), base.dequantized_weight(torch.float32)) + layer.scaling["default"] * (
            x.float() @ a.T @ b.T
        )
        error = float((layer(x).float() - expected).abs().max() / expected.abs().max())
    if error > 1e-2:
        raise RuntimeError(f"MXFP4 LoRA layer output differs from the float reference by {error:.2e} (relative)")
    return f"{error:.1e}"


def measure(fmt: str, args) -> dict:
    model = build(args.shape, args.layers)
    maker = {"bf16": None, "mxfp4": to_mxfp4, "nf4": to_nf4}[fmt]
    replaced = replace_decoder_linears(model, maker) if maker else 0
    gc.collect()
    torch.cuda.empty_cache()
    peft_model = lora_model(model, fmt, args.rank)
    if hasattr(peft_model, "activation_checkpointing_enable"):
        peft_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.config.use_cache = False
    peft_model.train()
    check = check_mxfp4_layer(peft_model) if fmt == "mxfp4" else "-"
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=generator).cuda()

    def step() -> float:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = step()
    if not torch.isfinite(torch.tensor(first_loss)):
        raise RuntimeError(f"{fmt}: the loss is not finite ({first_loss})")
    for _ in range(args.warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {
        "format": fmt,
        "replaced": replaced,
        "step_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "base_gib": sum(t.numel() * t.element_size() for t in model.model.layers.parameters() if not t.requires_grad)
        / 2**30,
        "trainable": sum(p.numel() for p in trainable),
        "loss": first_loss,
        "check": check,
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the architecture's (a quick run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--formats", default="bf16,mxfp4,nf4")
    parser.add_argument("--out", help="write the Markdown table here too")
    args = parser.parse_args()
    rows, skipped = [], []
    for fmt in args.formats.split(","):
        if fmt == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                skipped.append("nf4: bitsandbytes is not installed (pip install bitsandbytes)")
                continue
        rows.append(measure(fmt, args))
        print(rows[-1], flush=True)
        gc.collect()  # the format's model, adapters and optimizer state go before the next is built
        torch.cuda.empty_cache()
    import peft

    base = next((r for r in rows if r["format"] == "bf16"), None)
    nf4 = any(r["format"] == "nf4" for r in rows)
    bnb_version = f", bitsandbytes {__import__('bitsandbytes').__version__}" if nf4 else ""
    lines = [
        f"# One LoRA training step, Llama-3-{args.shape.upper()}-shaped model ({torch.cuda.get_device_name()})",
        "",
        f"- {rows[0]['replaced'] if rows and rows[0]['replaced'] else 'all'} decoder Linears per quantized base; "
        f"LoRA rank {args.rank} on {'/'.join(TARGETS)}; batch {args.batch} x {args.seq_len} random tokens; "
        f"gradient checkpointing (non-reentrant); AdamW; {args.steps} timed steps after {args.warmup}; "
        f"torch {torch.__version__}, peft {peft.__version__}{bnb_version}",
        f"- Command: `python eval/bench_train.py{f' --layers {args.layers}' if args.layers else ''}`",
        *(f"- Skipped: {line}" for line in skipped),
        "",
        "| base | frozen decoder weights GiB | step s, median (min-max) | step vs bf16 LoRA | peak GPU GiB | "
        "first loss | MXFP4 LoRA layer vs float reference |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['step_s'] / base['step_s']:.3f}x" if base else "-"
        lines.append(
            f"| {r['format']} | {r['base_gib']:.2f} | {r['step_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
            f"{ratio} | {r['peak_gib']:.2f} | {r['loss']:.3f} | {r['check']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(text)


if __name__ == "__main__":
    main()
