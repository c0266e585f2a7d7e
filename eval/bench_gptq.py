"""Wall time and peak GPU memory of GPTQ (``algorithm="gptq"``) on a Llama-3-8B-shaped model.

The model is built from Llama-3-8B's config with random weights (nothing is downloaded) and
kept in CPU memory in bf16, as ``from_pretrained(path)`` without a device_map leaves it; the
layer-by-layer pipeline (``qwantize_hf.sequential.gptq_sequential``) moves one decoder layer
at a time to the GPU, calibrates it on random token sequences (the timing does not depend on
the text), quantizes its Linears and moves it back. Reports the whole time (the calibration
forward passes included), the time per layer, and the peak GPU memory the pipeline
allocated, beside the bf16 size of one layer and of the whole model. The final norm's fit
through the LM head (KL against the float model's logits) and the end-to-end fit of every norm
weight (``end_to_end_norms``: the layers move to the GPU for it when they fit in three quarters of
its free memory, else each comes there for each forward and each backward) are
part of the time and the peak; the end-to-end fit's own time is reported too. Also checks, on layer
0's largest Linear, that GPTQ's output error is below round-to-nearest's on the calibration
inputs (a correctness check before anything is timed). GPU only.

    python eval/bench_gptq.py --out eval/results/bench_gptq_h100.md
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qwantize_hf import dequantize_mxfp4, norm_fits, quantize_mxfp4
from qwantize_hf.calibration import eligible_linear_names
from qwantize_hf.evaluation.shapes import CONFIGS
from qwantize_hf.gptq import gptq_quantize
from qwantize_hf.sequential import gptq_sequential


def random_model(shape: str, layers: int | None, device: torch.device) -> LlamaForCausalLM:
    """The architecture with N(0, 0.02) bf16 weights (norms at 1), built on meta and held on the CPU; the
    numbers are drawn on ``device`` (a CUDA generator draws 8B of them in seconds, the CPU's in minutes)."""
    config = LlamaConfig(**{**CONFIGS[shape], **({"num_hidden_layers": layers} if layers else {})})
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator(device).manual_seed(0)
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.data.fill_(1.0)
        else:
            drawn = torch.empty(parameter.shape, dtype=parameter.dtype, device=device)
            parameter.data.copy_(drawn.normal_(0.0, 0.02, generator=generator))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers, not filled above
    return model.eval()


def check_first_layer(model: LlamaForCausalLM, sequences: list[torch.Tensor], device: torch.device) -> str:
    """GPTQ vs round to nearest on layer 0's down_proj: output error on its calibration inputs."""
    inputs = []
    down = model.model.layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().float()))
    layer0 = model.model.layers[0].to(device)
    try:
        with torch.no_grad():
            hidden = model.model.embed_tokens(torch.stack(sequences[:4])).to(device)
            position = torch.arange(hidden.shape[1], device=device)[None]
            layer0(hidden, position_embeddings=model.model.rotary_emb.to(device)(hidden, position))
    finally:
        handle.remove()
    x = torch.cat(inputs).reshape(-1, down.in_features)
    weight = down.weight.detach().float()
    gptq = dequantize_mxfp4(*gptq_quantize(weight, x.T @ x), dtype=torch.float32)
    rtn = dequantize_mxfp4(*quantize_mxfp4(weight, scale_method="mse"), dtype=torch.float32)
    errors = {label: float((x @ (weight - q).T).square().mean()) for label, q in (("gptq", gptq), ("rtn", rtn))}
    layer0.to("cpu")
    if not errors["gptq"] < errors["rtn"]:
        raise RuntimeError(f"GPTQ's output error is not below round-to-nearest's: {errors}")
    return f"layer 0 down_proj output MSE on its calibration inputs: GPTQ {errors['gptq']:.3e}, RTN {errors['rtn']:.3e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the architecture's (a quick run)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-act-order", dest="act_order", action="store_false")
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--no-end-to-end-norms", dest="end_to_end_norms", action="store_false")
    parser.add_argument(
        "--stream-end-to-end", action="store_true",
        help="the end-to-end fit streams each layer to the GPU even where all of them fit there (a small GPU's path)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda", help="where the layers are processed (cpu: a dry run)")
    parser.add_argument("--out", help="write the Markdown table here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.stream_end_to_end:
        norm_fits._fit_on = lambda layers, device: False  # as where the layers do not fit on the GPU
    cuda = device.type == "cuda"
    start = time.perf_counter()
    model = random_model(args.shape, args.layers, device)
    build_s = time.perf_counter() - start
    config = model.config
    generator = torch.Generator().manual_seed(1)
    sequences = list(torch.randint(0, config.vocab_size, (args.sequences, args.seq_len), generator=generator))
    check = check_first_layer(model, sequences, device)
    names = eligible_linear_names(model, 32)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    times: list[float] = []
    peaks: list[int] = []  # peak GPU memory allocated so far, at each progress line
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    last = [start]

    def progress(message: str) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        peaks.append(torch.cuda.max_memory_allocated(device) if cuda else 0)
        last[0] = now
        print(message, flush=True)

    gptq_sequential(
        model, sequences, names, block_size=32, act_order=args.act_order, true_sequential=args.true_sequential,
        end_to_end_norms=args.end_to_end_norms, device=device, progress=progress,
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else float("nan")
    layer_times = times[: config.num_hidden_layers]
    gib = 2**30
    lines = [
        f"# GPTQ on a Llama-3-{args.shape.upper()}-shaped model "
        f"({torch.cuda.get_device_name(device) if cuda else 'CPU'})",
        "",
        f"- {config.num_hidden_layers} decoder layers, {len(names)} Linears, random bf16 weights held in CPU memory; "
        f"{args.sequences} calibration sequences of {args.seq_len} tokens; act_order={args.act_order}, "
        f"true_sequential={args.true_sequential}, end_to_end_norms={args.end_to_end_norms}; "
        f"torch {torch.__version__}",
        f"- Command: `python eval/bench_gptq.py{'' if args.act_order else ' --no-act-order'}"
        f"{' --true-sequential' if args.true_sequential else ''}"
        f"{'' if args.end_to_end_norms else ' --no-end-to-end-norms'}"
        f"{' --stream-end-to-end' if args.stream_end_to_end else ''}"
        f"{f' --layers {args.layers}' if args.layers else ''}`",
        f"- Check before timing: {check}",
        "",
        "| what | value |",
        "|---|---:|",
        f"| whole pipeline (capture, calibration forwards, Hessians, GPTQ, norm fits, moves) | {total_s:.1f} s |",
        f"| per decoder layer (its calibration forwards, Hessians, GPTQ and norm fit), median (min-max) | "
        f"{sorted(layer_times)[len(layer_times) // 2]:.2f} s "
        f"({min(layer_times):.2f}-{max(layer_times):.2f}) |",
        *(
            [f"| the end-to-end fit of every norm weight (2 passes, one sequence a step) | {times[-1]:.1f} s |"]
            if args.end_to_end_norms
            else []
        ),  # fmt: skip
        f"| peak GPU memory allocated by the pipeline | {peak / gib:.2f} GiB |",
        *(
            [
                f"| peak GPU memory before the end-to-end fit (the layer-by-layer part) | "
                f"{(peaks[-2] - baseline) / gib:.2f} GiB |"
            ]
            if args.end_to_end_norms and cuda
            else []
        ),  # fmt: skip
        f"| one decoder layer in bf16 | {layer_bytes / gib:.2f} GiB |",
        f"| the whole model in bf16 (stays in CPU memory) | {model_bytes / gib:.2f} GiB |",
        "| building the random model (drawn on the device, held in CPU memory; not part of the pipeline) | "
        f"{build_s:.1f} s |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(text)


if __name__ == "__main__":
    main()
