"""Calibrated MXFP4 scales for fused experts: each expert's statistics from the tokens routed to it.

With a calibration text (``MXFP4Config(calibration=...)`` with ``scale_method="mse"``, or
``algorithm="gptq"``) the fused experts load float, like the Linears, and are quantized after the text
has run. A forward pre-hook on each experts module sees what the router sends it (the hidden states
and ``top_k_index``; ``routed_inputs``), and each expert gets its own statistics from its own tokens:

- ``gate_up_proj``: the hidden states routed to the expert;
- ``down_proj``: the expert's gated intermediate activations on those tokens, computed with its
  ``gate_up_proj`` as it stands (float for the scale search; already quantized under GPTQ, so that
  the down projection's Hessian carries the first product's error, as a later Linear's does).

rtn (``quantize_routed_rtn``): each input feature's mean square weights the least-squares scale
search, as for a Linear. gptq (``quantize_routed_gptq``): each expert's ``X^T X`` and
``gptq_quantize``. An expert that received no calibration token falls back to the data-free method
(plain ``mse`` scales; under GPTQ, its scale method without error feedback), and the count of
experts that had tokens goes into config.json's calibration record (``experts_record``).

The results are ``{projection: (packed [E, N, K/2], scales [E, N, K/32])}`` per module, in the
layout ``experts.install`` stores; GPT-OSS's transposed ``[E, K, N]`` weights are quantized along K.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qwantize_hf.experts import PROJECTIONS, SCALE_SUFFIX, expert_weight, float_product, gated, install
from qwantize_hf.gptq import gptq_quantize
from qwantize_hf.ops import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.replace import offload_hook, store_offloaded

Quantized = dict[str, tuple[torch.Tensor, torch.Tensor]]


class RoutedInputs:
    """What one experts module was handed in each call: (hidden states [T, H], top_k_index [T, k]), kept
    (GPTQ works one decoder layer at a time, so one layer's calls are held at once)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, module: nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> None:
        self.calls.append((hidden, index))

    def tokens_of(self, expert: int) -> torch.Tensor | None:
        """The hidden states routed to ``expert`` in every call, in call order (None when there are none).
        The calls are joined into one the first time, so each expert costs one pass and one sync."""
        if not self.calls:
            return None
        if len(self.calls) > 1:
            self.calls = [tuple(torch.cat(parts) for parts in zip(*self.calls))]
        hidden, index = self.calls[0]
        rows = (index == expert).any(dim=-1)
        return hidden[rows] if bool(rows.any()) else None


class RoutedMeanSquares:
    """Per expert, the sum of squares (float64) of each input feature of each projection over its routed
    tokens, and the token count: accumulated call by call on the experts' device, so nothing of the text
    is held."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None

    def add(self, module: nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> None:
        tensors = float_tensors(module)
        experts = expert_weight(module, PROJECTIONS[0], tensors=tensors).shape[0]
        hidden = hidden.to(tensors[PROJECTIONS[0]].device)
        index = index.to(hidden.device)
        if self.counts is None:
            self.counts = torch.zeros(experts, dtype=torch.long, device=hidden.device)
        routed = index[(index >= 0) & (index < experts)]  # expert-parallel sentinels are no expert's
        self.counts += torch.bincount(routed.reshape(-1), minlength=experts)
        for expert in torch.unique(routed).tolist():
            tokens = hidden[(index == expert).any(dim=-1)]
            for projection in PROJECTIONS:
                x = _inputs(module, tensors, expert, tokens, projection)
                square = x.to(torch.float64).square().sum(dim=0)
                if projection not in self.sums:
                    self.sums[projection] = torch.zeros(experts, square.shape[0], dtype=torch.float64, device=x.device)
                self.sums[projection][expert] += square

    def mean_squares(self, projection: str, expert: int) -> torch.Tensor | None:
        """float32 ``[K]`` (None when the expert received no token)."""
        if self.counts is None or int(self.counts[expert]) == 0:
            return None
        return (self.sums[projection][expert] / int(self.counts[expert])).to(torch.float32)


# What the experts forward's arguments are called (transformers' experts modules; GPT-OSS's older names)
_HIDDEN_NAMES = ("hidden_states",)
_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts")


@contextlib.contextmanager
def routed_inputs(
    model: nn.Module, names: Iterable[str], record_type: type = RoutedInputs
) -> Iterator[dict[str, Any]]:
    """For the ``with`` block, hand what each named experts module is given (hidden states, ``top_k_index``)
    to a ``record_type`` of its own (``RoutedInputs`` keeps it, ``RoutedMeanSquares`` sums it); hooks
    removed after."""
    records = {name: record_type() for name in names}

    def hook_for(name: str, record: Any):
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else next((kwargs[k] for k in _HIDDEN_NAMES if k in kwargs), None)
            index = args[1] if len(args) > 1 else next((kwargs[k] for k in _INDEX_NAMES if k in kwargs), None)
            if not isinstance(hidden, torch.Tensor) or not isinstance(index, torch.Tensor):
                raise RuntimeError(
                    f"{name}: the experts module was called without (hidden_states, top_k_index) as its first two "
                    f"arguments (positional: {len(args)}, keywords: {sorted(kwargs)}), so the tokens routed to each "
                    "expert are unknown; keep its experts float with modules_to_not_convert"
                )
            hidden, index = hidden.detach(), index.detach()
            record.add(module, hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1, index.shape[-1]))

        return capture

    handles = [
        model.get_submodule(name).register_forward_pre_hook(hook_for(name, record), with_kwargs=True)
        for name, record in records.items()
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights (and biases) of an experts module by name, where it computes: an offloaded module's
    (accelerate keeps them in its hook's weights_map, the module holding meta tensors) brought to its
    execution device."""
    names = [*PROJECTIONS, *(p + "_bias" for p in PROJECTIONS if getattr(module, "has_bias", False))]
    offload = offload_hook(module)
    if offload is None:
        return {name: getattr(module, name) for name in names}
    return {name: offload.weights_map[name].to(offload.execution_device) for name in names}


def install_quantized(module: nn.Module, quantized: Quantized, *, block_size: int) -> None:
    """``experts.install``, or for an offloaded module its codes and scales into its hook's weights_map (CPU
    memory) with meta placeholders on the module, which the hook fills at each forward."""
    offload = offload_hook(module)
    if offload is None:
        install(module, quantized, block_size=block_size)
        return
    for projection, (packed, scales) in quantized.items():
        for key, tensor in ((projection, packed), (projection + SCALE_SUFFIX, scales)):
            store_offloaded(offload.weights_map, key, tensor.cpu())
            placeholder = torch.empty(tensor.shape, dtype=torch.uint8, device="meta")
            if key in module._parameters:
                setattr(module, key, nn.Parameter(placeholder, requires_grad=False))
            else:
                module.register_parameter(key, nn.Parameter(placeholder, requires_grad=False))
    module.mxfp4_block_size = block_size


def _inputs(
    module: nn.Module, tensors: dict[str, torch.Tensor], expert: int, tokens: torch.Tensor, projection: str
) -> torch.Tensor:
    """The inputs ``[T, K]`` of ``projection`` of ``expert`` on its routed ``tokens`` (float32; on the
    weight's device), the gated intermediate computed with ``gate_up_proj`` as it stands."""
    weight = expert_weight(module, PROJECTIONS[0], expert, tensors)
    tokens = tokens.to(device=weight.device)
    if projection == PROJECTIONS[0]:
        return tokens.to(torch.float32)
    with torch.no_grad():
        gate_up = float_product(module, PROJECTIONS[0], expert, tokens.to(weight.dtype), weight, tensors)
        return gated(module, gate_up).float()


def quantize_routed_rtn(
    module: nn.Module, record: RoutedMeanSquares, *, block_size: int, name: str
) -> tuple[Quantized, int]:
    """Each expert quantized with ``mse`` scales weighted by the mean square of each of its input features
    over its routed tokens (data-free ``mse`` without tokens), where its weights are (an offloaded module's
    on its execution device). Returns the results and how many experts had tokens."""
    tensors = float_tensors(module)
    experts = expert_weight(module, PROJECTIONS[0], tensors=tensors).shape[0]
    results: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {p: ([], []) for p in PROJECTIONS}
    routed = 0
    for expert in range(experts):
        routed += record.mean_squares(PROJECTIONS[0], expert) is not None
        for projection in PROJECTIONS:
            weight = expert_weight(module, projection, expert, tensors)  # [N, K]
            weights = record.mean_squares(projection, expert)
            packed, scales = quantize_mxfp4(
                weight, block_size=block_size, scale_method="mse", weights=weights,
                name=f"{name}.{projection}[{expert}]",
            )  # fmt: skip
            results[projection][0].append(packed)
            results[projection][1].append(scales)
    return {p: (torch.stack(packed), torch.stack(scales)) for p, (packed, scales) in results.items()}, routed


def quantize_routed_gptq(
    module: nn.Module, record: RoutedInputs, *, block_size: int, name: str, **settings: Any
) -> tuple[Quantized, int]:
    """Each expert by ``gptq_quantize`` with the Hessian of its routed inputs, ``gate_up_proj`` first; its
    float weights are left holding their dequantized MXFP4 values (the next products and layers see the
    error). An expert without tokens is quantized by the scale method alone. ``settings``: gptq_quantize's."""
    scale_method = settings.get("scale_method", "mse")
    tensors = float_tensors(module)  # the module's own parameters: GPTQ runs on a layer on its device
    experts = expert_weight(module, PROJECTIONS[0]).shape[0]
    results: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {p: ([], []) for p in PROJECTIONS}
    routed = 0
    for expert in range(experts):
        tokens = record.tokens_of(expert)
        routed += tokens is not None
        for projection in PROJECTIONS:  # gate_up first: down's inputs then carry its error
            weight = expert_weight(module, projection, expert)  # [N, K], a view of the module's weight
            label = f"{name}.{projection}[{expert}]"
            if tokens is None:
                packed, scales = quantize_mxfp4(weight, block_size=block_size, scale_method=scale_method, name=label)
            else:
                x = _inputs(module, tensors, expert, tokens, projection)
                hessian = x.T @ x / x.shape[0]
                packed, scales = gptq_quantize(weight, hessian, block_size=block_size, name=label, **settings)
            with torch.no_grad():
                weight.copy_(dequantize_mxfp4(packed, scales, block_size=block_size, dtype=weight.dtype))
            results[projection][0].append(packed)
            results[projection][1].append(scales)
    return {p: (torch.stack(packed), torch.stack(scales)) for p, (packed, scales) in results.items()}, routed


def experts_record(routed: int, total: int) -> dict[str, int]:
    """config.json's count of the experts that calibrated on their own tokens (the rest: data-free)."""
    return {"experts": total, "experts_with_calibration_tokens": routed}


__all__ = [
    "float_tensors",
    "install_quantized",
    "RoutedInputs",
    "RoutedMeanSquares",
    "experts_record",
    "quantize_routed_gptq",
    "quantize_routed_rtn",
    "routed_inputs",
]
