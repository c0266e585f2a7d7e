"""Activation statistics for activation-aware MXFP4 scales.

A Linear's output error from a weight error ``E`` is ``x @ E.T``; averaged over
inputs, an element's squared error costs in proportion to the mean square of
its input feature. ``collect_activation_stats`` measures that mean square for
every Linear that MXFP4Config would quantize, with forward pre-hooks, over a
calibration text; ``quantize_mxfp4(w, weights=stats[name])`` then picks each
block's scale by the weighted error. ``calibrate`` is what the quantizer runs
for ``MXFP4Config(calibration=...)``: text → tokens → sequences → statistics.

This file must never change a model's weights or outputs: the hooks only read
their inputs and are removed before it returns, even on error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwantize_hf.methods import RANDOM_TOKENS
from qwantize_hf.replace import linears_to_convert, output_head_name, resolve_modules_to_not_convert

logger = logging.getLogger(__name__)


def eligible_linear_names(
    model: nn.Module,
    block_size: int,
    modules_to_not_convert: Iterable[str] | None = None,
    *,
    quantize_lm_head: bool = False,
) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``MXFP4Config(block_size, modules_to_not_convert,
    quantize_lm_head)`` quantizes.

    The same rule as the quantizer's swap: plain ``nn.Linear``, not skipped
    (``lm_head`` unless ``quantize_lm_head``, tied and fp32-kept modules by default; a
    tied head with ``quantize_lm_head`` is untied and counts), ``in_features`` a multiple
    of ``block_size``.
    """
    requested = None if modules_to_not_convert is None else list(modules_to_not_convert)
    skip = resolve_modules_to_not_convert(model, requested, quantize_lm_head=quantize_lm_head)
    head = output_head_name(model) if quantize_lm_head else None
    if head is not None and head not in (requested or ()):
        skip = [name for name in skip if name != head]  # a tied head is untied to be quantized
    return linears_to_convert(model, block_size=block_size, modules_to_not_convert=skip)[0]


# --------------------------------------------------------------------------- what config.json says

# The key that marks a calibration dict as the record of a run (config.json), not a request.
CALIBRATED = "calibrated"


def _short_name(name: str) -> str:
    """A Hub id as it is; a local path by its last component (config.json must not leak local folders)."""
    name = str(name)
    return Path(name).name if os.path.isabs(name) or os.path.exists(name) or name.startswith(".") else name


def tokenizer_name(tokenizer: Any) -> str:
    """What config.json says about a tokenizer: its Hub id (or folder name), else its class."""
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    return _short_name(name) if name else type(tokenizer).__name__


def dataset_name(dataset: str | list[str] | tuple[str, ...]) -> str:
    """A description of a calibration dataset that holds none of its text."""
    if isinstance(dataset, (list, tuple)):
        return f"{len(dataset)} text(s) given in memory"
    if dataset == RANDOM_TOKENS:
        return dataset
    if os.path.isfile(dataset):
        return f"local text file {Path(dataset).name}"
    if os.path.exists(dataset):
        return f"local dataset folder {Path(dataset).name}"
    return dataset


# --------------------------------------------------------------------------- text → tokens

# Texts given as a list are joined into one token stream with a paragraph break between them.
TEXT_SEPARATOR = "\n\n"
# Calibration text is read (file, list or `datasets` rows) only up to this many characters per
# budgeted token (natural text runs about 4 per token), so a huge corpus is not tokenized whole.
DATASET_CHARS_PER_TOKEN = 16


def _dataset_text(name: str, max_chars: int) -> str:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"calibration['dataset'] = {name!r} is not a local file, so it is read with the `datasets` "
            "package, which is not installed: pip install datasets (or pass the texts as a list of strings)"
        ) from error
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as error:  # datasets raises many types; the hint is the same for all
        raise ValueError(
            f"calibration['dataset'] = {name!r}: datasets.load_dataset({name!r}, split='train') failed ({error}); "
            "for a dataset with a config name or another split, load it yourself and pass its texts as a list"
        ) from error
    if "text" not in rows.column_names:
        raise ValueError(
            f"calibration['dataset'] = {name!r} has no 'text' column (columns {rows.column_names}); "
            "pass the texts as a list of strings"
        )
    return _join_up_to((row["text"] for row in rows), max_chars)


def _join_up_to(texts: Iterable[str | None], max_chars: int) -> str:
    """Join texts (skipping missing ones) up to ``max_chars``: no more is read or tokenized than the budget needs."""
    kept, chars = [], 0
    for text in texts:
        if text is None:
            continue
        kept.append(text)
        chars += len(text) + len(TEXT_SEPARATOR)
        if chars >= max_chars:
            break
    return TEXT_SEPARATOR.join(kept)[:max_chars]


def calibration_text(dataset: str | list[str] | tuple[str, ...], max_tokens: int) -> str:
    """The text of ``dataset``: a list of texts (joined), a local text file, or a ``datasets`` name."""
    max_chars = max_tokens * DATASET_CHARS_PER_TOKEN
    if isinstance(dataset, (list, tuple)):
        text = _join_up_to(dataset, max_chars)
    elif os.path.isfile(dataset):
        with open(dataset, encoding="utf-8") as file:
            text = file.read(max_chars)
    else:
        text = _dataset_text(dataset, max_chars)
    if not text.strip():
        raise ValueError(f"the calibration dataset ({dataset_name(dataset)}) holds no text; give a non-empty text")
    return text


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as it is; a name or path through AutoTokenizer."""
    if not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids ``[n]`` of ``text``, the tokenizer's own special tokens included."""
    # Calibration cuts the ids into sequences itself; the model's length limit does not apply here.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# The calibration "dataset" that needs no text: token ids drawn uniformly from the model's vocabulary
# with a fixed seed. No tokenizer either. Activation statistics are mostly set by the weights (which
# features are large is a property of the model more than of the text), so they recover much of what
# text calibration gives; eval/results has the perplexities.
RANDOM_TOKENS_SEED = 0


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the model's input embedding (its config's vocab_size when the embedding is not a plain table)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not rows:
        raise ValueError(
            f"calibration['dataset'] = {RANDOM_TOKENS!r} draws token ids from the model's vocabulary, but "
            f"{type(model).__name__} has neither an input embedding table nor config.vocab_size; calibrate on text"
        )
    return int(rows)


def random_token_sequences(vocab_size: int, seq_len: int, max_tokens: int, seed: int = RANDOM_TOKENS_SEED):
    """``max_tokens // seq_len`` sequences of ``seq_len`` token ids uniform in ``[0, vocab_size)``, seeded."""
    generator = torch.Generator().manual_seed(seed)
    count = max_tokens // seq_len
    return list(torch.randint(0, vocab_size, (count, seq_len), generator=generator))


def context_length(model: nn.Module | None) -> int | None:
    """The longest sequence ``model`` takes (its config's ``max_position_embeddings`` or ``n_positions``)."""
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def calibration_inputs(
    calibration: dict[str, Any], model: nn.Module | None = None
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """A calibration request's token sequences, and the record of it for config.json.

    The record names the dataset and tokenizer, the tokens actually used and the
    SHA-256 of the text, never the text itself. ``dataset = "random-tokens"`` draws
    the ids from ``model``'s vocabulary instead (no text, no tokenizer). Sequences are no longer
    than the model's context (``max_position_embeddings``, GPT-2's ``n_positions``): a model with
    learned position embeddings has none past it; the token budget is kept with more sequences.
    """
    seq_len, budget = calibration["calibration_seq_len"], calibration["calibration_tokens"]
    context = context_length(model)
    if context is not None and seq_len > context:
        seq_len = context
    if calibration["dataset"] == RANDOM_TOKENS:
        if model is None:
            raise ValueError(f"calibration['dataset'] = {RANDOM_TOKENS!r} needs the model to draw token ids from")
        vocab = vocabulary_size(model)
        sequences = random_token_sequences(vocab, seq_len, budget)
        record = {
            "dataset": RANDOM_TOKENS,
            "seed": RANDOM_TOKENS_SEED,
            "vocab_size": vocab,
            "calibration_tokens": len(sequences) * seq_len,
            "calibration_seq_len": seq_len,
            CALIBRATED: True,
        }
        return sequences, record
    text = calibration_text(calibration["dataset"], budget)
    ids = token_ids(load_tokenizer(calibration["tokenizer"]), text)
    sequences = calibration_sequences(ids, seq_len, budget)
    record = {
        "dataset": dataset_name(calibration["dataset"]),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "tokenizer": tokenizer_name(calibration["tokenizer"]),
        "calibration_tokens": len(sequences) * seq_len,
        "calibration_seq_len": seq_len,
        CALIBRATED: True,
    }
    return sequences, record


# --------------------------------------------------------------------------- statistics


def calibration_sequences(input_ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Cut token ids ``[n]`` into whole, non-overlapping sequences of ``seq_len`` (at most ``max_tokens`` in all)."""
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be one flat sequence of token ids [n], got shape {tuple(input_ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    usable = input_ids.numel() if max_tokens is None else min(input_ids.numel(), max_tokens)
    count = usable // seq_len
    if count == 0:
        raise ValueError(
            f"the calibration text has {input_ids.numel()} tokens (budget {max_tokens}), fewer than one "
            f"sequence of {seq_len}; give a longer text or a shorter sequence length"
        )
    return list(input_ids[: count * seq_len].reshape(count, seq_len))


@torch.inference_mode()
def collect_activation_stats(
    model: nn.Module,
    sequences: Iterable[torch.Tensor],
    module_names: Iterable[str],
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean square of each input feature of each named Linear over all tokens of ``sequences``.

    Returns float32 tensors ``[in_features]`` keyed by module name, on the CPU.
    Sums are kept in float64 so a long text does not lose the small features.
    """
    names = list(module_names)
    if not names:
        raise ValueError("no modules to collect statistics for: the model has no eligible nn.Linear")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            square = x.reshape(-1, x.shape[-1]).to(torch.float64).square().sum(dim=0)
            # A pre-hook runs before accelerate's own hook moves the input, so calls may differ in device.
            sums[name] = square if name not in sums else sums[name] + square.to(sums[name].device)
            counts[name] += x.numel() // x.shape[-1]

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        run_sequences(model, sequences, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name in names if counts[name] == 0]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} Linear module(s) saw no input during calibration, first {unseen[0]!r}: they are "
            "not on the model's forward path, so they cannot be calibrated; add them to "
            "MXFP4Config(modules_to_not_convert=[...]) to keep them unquantized"
        )
    logger.info("activation statistics of %d Linear modules over %d tokens", len(names), counts[names[0]])
    return {name: (sums[name] / counts[name]).to(torch.float32).cpu() for name in names}


@torch.inference_mode()
def run_sequences(model: nn.Module, sequences: Iterable[torch.Tensor], *, progress: bool = True) -> None:
    """Run each token sequence through ``model`` (for the hooks that watch it; the outputs are dropped)."""
    from tqdm.auto import tqdm

    device = input_device(model)
    sequences = list(sequences)
    for ids in tqdm(sequences, desc="calibration", unit="seq", disable=not progress, leave=False):
        model(input_ids=ids.to(device)[None], use_cache=False)


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device, or the CPU when accelerate offloads it.

    An offloaded embedding's weight is on the meta device; the accelerate hook on it
    (or on a module around it) moves its inputs to the execution device.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


__all__ = [
    "calibration_inputs",
    "calibration_sequences",
    "calibration_text",
    "collect_activation_stats",
    "eligible_linear_names",
    "input_device",
    "load_tokenizer",
    "run_sequences",
    "token_ids",
]
