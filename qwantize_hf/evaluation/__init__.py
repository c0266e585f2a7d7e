"""The perplexity eval (``qwantize-eval``): bf16 vs MXFP4 block-scale methods on the same tokens.

One concern a module, in the order they build on each other:

- ``data``: the offline embedded default (model and texts), other texts, the cache;
- ``nll``: sliding windows and the token NLL of a causal LM over them;
- ``parallel``: the windows split over processes (``accelerate launch`` / ``torchrun``);
- ``layers``: per-Linear weight error, scale choices, bits a weight;
- ``run``: the methods compared and the comparison run, as a JSON dict;
- ``report``: the Markdown tables, the plot and the model card of a run;
- ``cli``: the command line.

``shapes`` (Llama configs) and ``gpu_bench`` (timing helpers) serve the GPU
scripts under ``eval/``. The names below are re-exported lazily: importing this
package imports neither torch nor transformers, so the command line answers
``--help`` before loading them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "data": (
        "EMBEDDED",
        "EMBEDDED_CALIBRATION",
        "EMBEDDED_MODEL_MODULE",
        "EMBEDDED_MODEL_NOTE",
        "EMBEDDED_TEXT_FILE",
        "WIKITEXT2",
        "MissingPackageError",
        "SourceUnavailableError",
        "default_cache_dir",
        "embedded_calibration_file",
        "embedded_gguf_file",
        "embedded_text_file",
        "load_text",
        "prepare_gguf_model",
        "require_module",
        "resolve_model",
        "wiki_articles",
    ),
    "nll": ("PerplexityResult", "Window", "scored_positions", "sliding_windows", "token_nll", "tokenize"),
    "parallel": (
        "DataParallel",
        "combine_sums",
        "data_parallel",
        "finish_data_parallel",
        "local_sums",
        "main_process_first",
        "process_device",
        "shard_windows",
        "token_nll_data_parallel",
    ),
    "layers": ("LayerStats", "layer_stats", "naive_bytes_of", "quantized_modules", "storage_bits_per_weight"),
    "run": (
        "BASELINE",
        "METHODS",
        "METHOD_DESCRIPTIONS",
        "QUANTIZED_METHODS",
        "MethodResult",
        "RunSettings",
        "machine_description",
        "method_config",
        "package_versions",
        "resolve_dtype",
        "results_json",
        "run_comparison",
    ),
    "report": ("default_name", "layer_report_markdown", "markdown_report", "markdown_table", "plot", "write_outputs"),
    "cli": ("build_parser", "main"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
