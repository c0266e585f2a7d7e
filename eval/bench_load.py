"""Load time of a stored MXFP4 checkpoint, and the share of it that the load-time integrity checks take.

    python eval/bench_load.py                    # Llama-3-8B shapes, loaded on the CPU
    python eval/bench_load.py --device cuda --shape 8b --repeats 3

Writes an MXFP4 checkpoint of the architecture straight from random bytes (codes uniform,
scale bytes 100-140, bf16 embeddings and norms: nothing is quantized, nothing downloaded),
then times ``from_pretrained`` of it (median of ``--repeats``) and, on the loaded model,
each check the quantizer runs at load: the safetensors header read that matches stored
dtypes, the missing-tensor check, the dtype view and the scale-byte-255 scan. Prints a
Markdown table; the checks' share is their time over the whole load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def write_checkpoint(shape: str, folder: Path) -> int:
    """An MXFP4 checkpoint of the architecture from random bytes; returns its bytes on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qwantize_hf import MXFP4Config
    from qwantize_hf.evaluation.shapes import CONFIGS
    from qwantize_hf.linear import MXFP4Linear
    from qwantize_hf.replace import replace_linear_with_mxfp4, resolve_modules_to_not_convert

    config = LlamaConfig(**CONFIGS[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    skip = resolve_modules_to_not_convert(model, None)
    replace_linear_with_mxfp4(model, block_size=32, modules_to_not_convert=skip, quantize_on_load=False)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, MXFP4Linear):
            module.weight.data = torch.randint(0, 256, module.weight.shape, dtype=torch.uint8, generator=generator)
            module.weight_scale.data = torch.randint(100, 141, module.weight_scale.shape, dtype=torch.uint8,
                                                     generator=generator)
    for name, parameter in model.named_parameters():
        if parameter.dtype == torch.bfloat16:
            parameter.data.normal_(0, 0.02, generator=generator) if "norm" not in name else parameter.data.fill_(1)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.quantization_config = MXFP4Config(modules_to_not_convert=skip)
    model.save_pretrained(folder)
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8b", choices=("1b", "8b"))
    parser.add_argument("--device", default="cpu", help="device_map of the load: cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import qwantize_hf  # noqa: F401  registers the quantizer
    from qwantize_hf import replace

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        folder = Path(tmp) / "mxfp4"
        size = write_checkpoint(args.shape, folder)
        files = [str(path) for path in folder.glob("*.safetensors")]
        loads, model = [], None
        for _ in range(args.repeats):
            del model
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, device_map=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            loads.append(time.perf_counter() - start)
        load = statistics.median(loads)
        checks = {
            "stored dtypes (headers)": lambda: replace.match_stored_dtypes(model, replace.stored_dtypes(files)),
            "missing tensors": lambda: replace.check_stored_tensors_loaded(model),
            "dtype views": lambda: replace.view_stored_bytes(model),
            "scale byte 255 scan": lambda: replace.check_stored_scales(model),
        }
        times = {name: statistics.median(timed(fn) for _ in range(args.repeats)) for name, fn in checks.items()}
    lines = [
        f"Load of a Llama-3-{args.shape.upper()}-shaped MXFP4 checkpoint ({size / 2**30:.2f} GiB), "
        f"device_map={args.device!r}, medians of {args.repeats}; torch {torch.__version__}",
        "",
        "| step | seconds | share of the load |",
        "|---|---:|---:|",
        f"| from_pretrained, checks included | {load:.2f} | 100% |",
        *(f"| {name} | {seconds:.3f} | {seconds / load:.1%} |" for name, seconds in times.items()),
        f"| all checks | {sum(times.values()):.3f} | {sum(times.values()) / load:.1%} |",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("# " + lines[0] + "\n" + "\n".join(lines[1:]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
