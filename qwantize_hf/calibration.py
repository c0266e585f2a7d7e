"""Activation statistics for activation-aware MXFP4 scales.

A Linear's output error from a weight error ``E`` is ``x @ E.T``; averaged over
inputs, an element's squared error costs in proportion to the mean square of
its input feature. ``collect_activation_stats`` measures that mean square for
every Linear that MXFP4Config would quantize, with forward pre-hooks, over a
calibration text; ``quantize_mxfp4(w, weights=stats[name])`` then picks each
block's scale by the weighted error.

This file must never change a model's weights or outputs: the hooks only read
their inputs and are removed before it returns, even on error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from qwantize_hf.replace import module_matches, resolve_modules_to_not_convert

logger = logging.getLogger(__name__)


def eligible_linear_names(
    model: nn.Module, block_size: int, modules_to_not_convert: Iterable[str] | None = None
) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``MXFP4Config(block_size, modules_to_not_convert)`` quantizes.

    The same rule as the quantizer's swap: plain ``nn.Linear``, not skipped
    (``lm_head``, tied and fp32-kept modules by default), ``in_features`` a
    multiple of ``block_size``.
    """
    requested = None if modules_to_not_convert is None else list(modules_to_not_convert)
    skip = resolve_modules_to_not_convert(model, requested)
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not module_matches(name, skip) and module.in_features % block_size == 0
    ]


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
    from tqdm.auto import tqdm

    names = list(module_names)
    if not names:
        raise ValueError("no modules to collect statistics for: the model has no eligible nn.Linear")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            square = x.reshape(-1, x.shape[-1]).to(torch.float64).square().sum(dim=0)
            sums[name] = square if name not in sums else sums[name] + square
            counts[name] += x.numel() // x.shape[-1]

        return record

    device = next(model.parameters()).device
    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        sequences = list(sequences)
        for ids in tqdm(sequences, desc="calibration", unit="seq", disable=not progress, leave=False):
            model(input_ids=ids.to(device)[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name in names if counts[name] == 0]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} Linear module(s) saw no input during calibration, first {unseen[0]!r}: they are "
            "not on the model's forward path, so they cannot be calibrated"
        )
    logger.info("activation statistics of %d Linear modules over %d tokens", len(names), counts[names[0]])
    return {name: (sums[name] / counts[name]).to(torch.float32).cpu() for name in names}


__all__ = ["calibration_sequences", "collect_activation_stats", "eligible_linear_names"]
