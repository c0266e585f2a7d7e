"""The plugin end to end on a GPU: load → generate → save → reload on a model of real size.

The model is built from the Llama-3.2-1B config in ``qwantize_hf.evaluation.shapes`` with random
weights (nothing is downloaded), saved as a bf16 checkpoint, then:

1. loaded in bf16 with device_map="cuda"                       (time, peak GPU memory)
2. loaded with MXFP4Config() and device_map="cuda"              (quantized as it loads, on the GPU)
3. generate, save_pretrained, reload the MXFP4 folder           (bytes identical, logits identical)
4. device_map="auto" with a max_memory that splits GPU and CPU  (quantize-on-load and the stored checkpoint)

Prints a table and writes it as JSON (``--out``). Usage:

    python eval/checks/gpu_plugin_check.py --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

import qwantize_hf
from qwantize_hf import MXFP4Config, MXFP4Linear
from qwantize_hf.evaluation.shapes import LLAMA_3_2_1B  # Llama-3.2-1B's architecture, random weights

PROMPT_LENGTH = 32
NEW_TOKENS = 16
GIB = 2**30


def read_files(folder: Path) -> None:
    """Read every file once so that both timed loads start from the page cache."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            while handle.read(1 << 26):
                pass


def timed_load(source: Path, **kwargs) -> tuple[torch.nn.Module, float, float, float]:
    """(model, seconds, peak GPU GiB during the load, GPU GiB held after it).

    The peak includes transformers' allocator warm-up (one transient block sized
    from the device map, freed at once), so it can exceed what the model keeps.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return model, seconds, torch.cuda.max_memory_allocated() / GIB, torch.cuda.memory_allocated() / GIB


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--gpu-budget", default="600MiB", help="max_memory for GPU 0 in the GPU/CPU split")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_plugin_check_"))
    bf16_dir, mxfp4_dir = work / "bf16", work / "mxfp4"
    results: dict = {
        "machine": torch.cuda.get_device_name(0),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "qwantize_hf": qwantize_hf.__version__,
            "python": platform.python_version(),
        },
        "model": "Llama-3.2-1B shape, random bf16 weights",
    }

    start = time.perf_counter()
    if not (bf16_dir / "config.json").exists():  # --work keeps it between runs
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_3_2_1B), dtype=torch.bfloat16)
        reference.save_pretrained(bf16_dir)
        del reference
        results["build_and_save_s"] = round(time.perf_counter() - start, 1)
    read_files(bf16_dir)

    # Compile the Triton quantize kernel before timing (a one-time cost per process).
    qwantize_hf.quantize_mxfp4(torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16))
    ids = torch.randint(0, LLAMA_3_2_1B["vocab_size"], (1, PROMPT_LENGTH), device="cuda")

    bf16, bf16_s, bf16_peak, bf16_held = timed_load(bf16_dir, dtype=torch.bfloat16, device_map="cuda")
    bf16_footprint = bf16.get_memory_footprint()
    results["parameters"] = sum(p.numel() for p in bf16.parameters())
    del bf16  # timed_load empties the CUDA cache before the next load

    model, mx_s, mx_peak, mx_held = timed_load(bf16_dir, quantization_config=MXFP4Config(), device_map="cuda")
    quantized = [m for m in model.modules() if isinstance(m, MXFP4Linear)]
    assert quantized and all(m.weight.is_cuda and m.weight.dtype == torch.uint8 for m in quantized)
    mx_footprint = model.get_memory_footprint()
    logits = logits_of(model, ids)
    start = time.perf_counter()
    generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    generate_s = time.perf_counter() - start
    assert generated.shape == (1, PROMPT_LENGTH + NEW_TOKENS)
    start = time.perf_counter()
    model.save_pretrained(mxfp4_dir)
    save_s = time.perf_counter() - start
    expected_state = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    read_files(mxfp4_dir)

    reloaded, reload_s, reload_peak, reload_held = timed_load(mxfp4_dir, device_map="cuda")
    state = reloaded.state_dict()
    identical = state.keys() == expected_state.keys() and all(
        torch.equal(state[k].cpu(), expected_state[k]) for k in expected_state
    )
    logits_identical = torch.equal(logits_of(reloaded, ids), logits)
    del reloaded, state

    split = {}
    for label, source, kwargs in [
        ("quantize-on-load", bf16_dir, {"quantization_config": MXFP4Config()}),
        ("stored MXFP4", mxfp4_dir, {}),
    ]:
        split_model, split_s, split_peak, split_held = timed_load(
            source, device_map="auto", max_memory={0: args.gpu_budget, "cpu": "100GiB"}, **kwargs
        )
        # transformers sets hf_device_map only when the map names more than one device
        devices = sorted({str(d) for d in getattr(split_model, "hf_device_map", {"": "cuda:0"}).values()})
        split_logits = logits_of(split_model, ids)
        out = split_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        split[label] = {
            "load_s": round(split_s, 2),
            "peak_gpu_gib": round(split_peak, 3),
            "held_gpu_gib": round(split_held, 3),
            "devices": devices,
            "logits_equal_full_gpu": bool(torch.equal(split_logits, logits)),
            "logits_max_abs_diff": float((split_logits - logits).abs().max()),
            "generated_tokens": int(out.shape[1] - PROMPT_LENGTH),
        }
        del split_model

    results.update(
        {
            "bf16_load_s": round(bf16_s, 2),
            "bf16_peak_gpu_gib": round(bf16_peak, 3),
            "bf16_held_gpu_gib": round(bf16_held, 3),
            "bf16_footprint_gib": round(bf16_footprint / GIB, 3),
            "mxfp4_load_s": round(mx_s, 2),
            "mxfp4_peak_gpu_gib": round(mx_peak, 3),
            "mxfp4_held_gpu_gib": round(mx_held, 3),
            "mxfp4_footprint_gib": round(mx_footprint / GIB, 3),
            "quantized_layers": len(quantized),
            "generate_s": round(generate_s, 2),
            "save_s": round(save_s, 2),
            "reload_s": round(reload_s, 2),
            "reload_peak_gpu_gib": round(reload_peak, 3),
            "reload_held_gpu_gib": round(reload_held, 3),
            "reload_bit_identical": bool(identical),
            "reload_logits_identical": bool(logits_identical),
            "gpu_cpu_split": split,
        }
    )
    rows = [
        ("bf16 load, device_map='cuda'", bf16_s, bf16_peak, bf16_held),
        ("MXFP4 quantize-on-load, 'cuda'", mx_s, mx_peak, mx_held),
        ("MXFP4 reload of saved folder", reload_s, reload_peak, reload_held),
    ] + [
        (f"split {args.gpu_budget} GPU + CPU, {label}", v["load_s"], v["peak_gpu_gib"], v["held_gpu_gib"])
        for label, v in split.items()
    ]
    print(f"\n{results['machine']}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{results['model']}: {results['parameters'] / 1e9:.2f} B parameters\n")
    print(f"| {'step':<44} | {'load time':>9} | {'peak GPU':>10} | {'held after':>10} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 12}|{'-' * 12}|")
    for step, seconds, peak, held in rows:
        print(f"| {step:<44} | {seconds:>7.2f} s | {peak:>6.3f} GiB | {held:>6.3f} GiB |")
    print(
        f"\nfootprint bf16 {bf16_footprint / GIB:.3f} GiB → MXFP4 {mx_footprint / GIB:.3f} GiB "
        f"({len(quantized)} quantized Linears; embeddings/lm_head tied and kept bf16)"
    )
    print(f"generate {NEW_TOKENS} tokens: {generate_s:.2f} s; save {save_s:.2f} s")
    print(f"reload bit-identical: {identical}; reload logits identical: {logits_identical}")
    for label, v in split.items():
        print(
            f"split ({label}): devices {v['devices']}, logits equal full-GPU: {v['logits_equal_full_gpu']} "
            f"(max |diff| {v['logits_max_abs_diff']:.3g}), generated {v['generated_tokens']} tokens"
        )
    (args.out / "gpu_plugin_check.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
