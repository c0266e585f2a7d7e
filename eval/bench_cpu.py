"""CPU cost of MXFP4 against bf16: one forward pass and one load, for a ~110M-parameter Llama.

    python eval/bench_cpu.py                      # 1 torch thread, 128 tokens, random weights
    python eval/bench_cpu.py --threads 2 --tokens 512 --repeats 9

Builds the model from a config (random weights, nothing downloaded), saves it in bf16,
and times, in one process and in alternation:

- ``load``: ``from_pretrained`` of the bf16 checkpoint as it is, with
  ``MXFP4Config(calibration=None)`` (quantize-on-load) and with ``MXFP4Config()`` (the default:
  quantize-on-load, then the random-token statistics and each weight quantized again), and of
  the saved MXFP4 checkpoint;
- ``forward``: one forward of ``--tokens`` tokens (batch 1, no grad) of the bf16 model and
  of the MXFP4 model.

Prints a Markdown table of medians and the MXFP4 / bf16 ratios (``--out`` writes it too, ``--json``
the numbers). The bf16 load maps the safetensors file and reads little; the MXFP4 loads read
everything they quantize or check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import qwantize_hf
    from qwantize_hf.evaluation.shapes import CONFIGS

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bf16_dir, mx_dir = Path(tmp) / "bf16", Path(tmp) / "mxfp4"
        model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIGS["110m"]), dtype=torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(bf16_dir)
        del model
        AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=qwantize_hf.MXFP4Config()).save_pretrained(
            mx_dir
        )

        def load(folder, **kwargs):
            return lambda: AutoModelForCausalLM.from_pretrained(folder, **kwargs)

        loads = {
            "bf16": load(bf16_dir, dtype=torch.bfloat16),
            "quantize-on-load, calibration=None": load(
                bf16_dir, quantization_config=qwantize_hf.MXFP4Config(calibration=None)
            ),
            # the default: then 32 x 1024 random token ids through the model, and each weight once more
            "quantize-on-load, default": load(bf16_dir, quantization_config=qwantize_hf.MXFP4Config()),
            "mxfp4 checkpoint": load(mx_dir),
        }
        load_times = {name: median_time(fn, args.repeats) for name, fn in loads.items()}

        models = {"bf16": loads["bf16"](), "mxfp4": loads["mxfp4 checkpoint"]()}
        ids = torch.randint(0, CONFIGS["110m"]["vocab_size"], (1, args.tokens))

        def forward(model):
            def run():
                with torch.no_grad():
                    model(ids)

            return run

        for model in models.values():
            forward(model)()  # warm-up
        forward_times = {name: median_time(forward(model), args.repeats) for name, model in models.items()}

    results = {
        "parameters": params,
        "threads": args.threads,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "load_s": load_times,
        "forward_s": forward_times,
        "forward_ratio": forward_times["mxfp4"] / forward_times["bf16"],
        "quantize_on_load_ratio": load_times["quantize-on-load, calibration=None"] / load_times["bf16"],
        "default_load_ratio": load_times["quantize-on-load, default"] / load_times["bf16"],
        "mxfp4_load_ratio": load_times["mxfp4 checkpoint"] / load_times["bf16"],
    }
    lines = [
        f"Llama, {params / 1e6:.0f}M parameters (random weights), {args.threads} torch thread(s), batch 1 x "
        f"{args.tokens} tokens, medians of {args.repeats}; torch {torch.__version__}",
        "",
        "| what | bf16 (s) | MXFP4 (s) | MXFP4 / bf16 |",
        "|---|---:|---:|---:|",
        f"| forward | {forward_times['bf16']:.3f} | {forward_times['mxfp4']:.3f} | {results['forward_ratio']:.2f}× |",
        *(
            f"| load ({name}) | {load_times['bf16']:.3f} | {load_times[name]:.3f} | "
            f"{load_times[name] / load_times['bf16']:.2f}× |"
            for name in ("quantize-on-load, calibration=None", "quantize-on-load, default", "mxfp4 checkpoint")
        ),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("# " + lines[0] + "\n" + "\n".join(lines[1:]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
