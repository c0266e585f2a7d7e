"""Fitting the normalization weights of a model whose Linears are quantized to those of the float model,
and the helpers that run layers on calibration inputs.

The norm weights (RMSNorm/LayerNorm) stay in the checkpoint's float dtype and are never quantized, so
they are free to absorb part of the quantization error. ``qwantize_hf.sequential`` calls three fits
(see its docstring): ``fit_norms`` for one decoder layer at a time (Norm Tweaking, Li et al., AAAI
2024), ``fit_final_norm`` for the final norm through the LM head, and ``fit_norms_end_to_end`` for all
of them at once, backpropagating through the whole quantized stack one layer at a time
(``layerwise_backward``). Every fit runs Adam on float32 copies and keeps its result only when the
loss on the calibration data went down.

This file never quantizes anything; it knows layers, norms and heads, not MXFP4.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device``."""
    return map_tensors(value, lambda tensor: tensor.to(device))


def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]], device: torch.device):
    """The layer's output hidden states for every input (kept on ``device``)."""
    outputs = []
    with torch.inference_mode():
        for hidden, kwargs in inputs:
            out = layer(hidden.to(device), **to_device(kwargs, device))
            outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


@contextlib.contextmanager
def on_device(device: torch.device, *modules: nn.Module | None) -> Iterator[None]:
    """Move ``modules`` (None ones are skipped) to ``device`` for the ``with`` block, and every part of
    them that holds tensors back where it was after it."""
    homes = [
        (part, next(itertools.chain(part.parameters(recurse=False), part.buffers(recurse=False))).device)
        for module in modules
        if module is not None
        for part in module.modules()
        if any(True for _ in itertools.chain(part.parameters(recurse=False), part.buffers(recurse=False)))
    ]
    for module in modules:
        if module is not None:
            module.to(device)
    try:
        yield
    finally:
        for part, home in homes:
            part.to(home)


NORM_TUNING_EPOCHS = 2  # passes over the calibration sequences, one sequence a step
NORM_TUNING_LR = 1e-3  # Adam's learning rate on the float32 copies of the norm weights


def _trainable(value: Any) -> Any:
    """A copy that autograd may save: the hidden states and keyword arguments were made under inference_mode."""
    return map_tensors(value, torch.Tensor.clone)


def norm_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the layer's normalization modules (any module whose class name has "Norm")."""
    return {
        f"{module_name}.{name}" if module_name else name: parameter
        for module_name, module in layer.named_modules()
        if "Norm" in type(module).__name__
        for name, parameter in module.named_parameters(recurse=False)
    }


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each token's ``|out - target|^2 / |target|^2``, averaged over the tokens. A sum over the whole
    sequence would be ruled by the few tokens whose hidden states are orders of magnitude larger than
    the rest (attention sinks); the next layer normalizes every token, so each counts the same."""
    error = (out - target).square().sum(-1) / target.square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return error.mean()


def kl_divergence(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of KL(softmax(target) || softmax(out)): how far the next-token distribution
    of logits ``out`` is from that of the float model's logits ``target``."""
    target_log_p = torch.log_softmax(target, dim=-1)
    return (target_log_p.exp() * (target_log_p - torch.log_softmax(out, dim=-1))).sum(-1).mean()


def fit_norms(
    layer: nn.Module,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    targets: Sequence[torch.Tensor] | Callable[[int], torch.Tensor],
    epochs: int = NORM_TUNING_EPOCHS,
    lr: float = NORM_TUNING_LR,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = relative_error,
) -> tuple[float, float]:
    """Fit the layer's norm weights so that ``layer(inputs[i])`` approaches ``targets[i]`` (a list, or a
    function of ``i`` where the targets are too large to keep): Adam on float32 copies, ``epochs`` passes,
    one sequence a step, ``loss(out, target)`` in float32 (default: ``relative_error``). Every other
    parameter stays as it is. Returns the mean loss over the sequences before and after."""
    norms = norm_parameters(layer)
    if not norms or not inputs:
        return 0.0, 0.0
    target_of = targets if callable(targets) else targets.__getitem__
    fixed = {name: parameter.detach() for name, parameter in layer.named_parameters()}
    masters = {name: p.detach().to(torch.float32).clone().requires_grad_(True) for name, p in norms.items()}
    optimizer = torch.optim.Adam(masters.values(), lr=lr)

    def loss_of(index: int) -> torch.Tensor:
        hidden, kwargs = inputs[index]
        weights = {**fixed, **{name: master.to(norms[name].dtype) for name, master in masters.items()}}
        out = torch.func.functional_call(layer, weights, (hidden,), kwargs)
        out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            target = target_of(index).to(torch.float32)
        return loss(out.to(torch.float32), target)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(index)) for index in range(len(inputs))) / len(inputs)

    with torch.inference_mode(False), torch.enable_grad():
        inputs = [(_trainable(hidden), _trainable(kwargs)) for hidden, kwargs in inputs]
        before = mean_loss()
        for _ in range(epochs):
            for index in range(len(inputs)):
                optimizer.zero_grad(set_to_none=True)
                loss_of(index).backward()
                optimizer.step()
        after = mean_loss()
        if after < before:  # never leave the layer worse on its own calibration data
            for name, master in masters.items():
                norms[name].data.copy_(master.detach())
        else:
            after = before
    return before, after


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _weights_on(module: nn.Module, device: torch.device, masters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers on ``device`` (copies of those that live elsewhere), with the
    norm weights taken from their float32 ``masters`` (cast to the module's dtype), for functional_call."""
    weights = {name: p.detach().to(device) for name, p in module.named_parameters()}
    weights.update({name: b.to(device) for name, b in module.named_buffers()})
    weights.update({name: master.to(weights[name].dtype) for name, master in masters.items()})
    return weights


def layerwise_backward(
    layers: Sequence[nn.Module],
    masters: Sequence[dict[str, torch.Tensor]],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    output_loss: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> float:
    """``output_loss(layers(hidden))``'s gradient into each layer's norm ``masters`` (accumulated in their
    ``.grad``), one layer at a time: a forward without a graph keeps each layer's input, then each layer
    is run again, with its graph, from the last one back, and given the gradient of its output. Only one
    layer's weights and graph are on ``device`` at a time. Returns the loss."""
    states = []
    with torch.no_grad():
        for layer, layer_masters in zip(layers, masters):
            states.append(hidden)
            weights = _weights_on(layer, device, layer_masters)
            hidden = _first(torch.func.functional_call(layer, weights, (hidden,), kwargs))
    x = hidden.detach().requires_grad_(True)
    loss = output_loss(x)
    loss.backward()
    grad = x.grad
    for position in range(len(layers) - 1, -1, -1):
        x = states[position].detach().requires_grad_(position > 0)
        weights = _weights_on(layers[position], device, masters[position])
        _first(torch.func.functional_call(layers[position], weights, (x,), kwargs)).backward(grad)
        grad = x.grad
    return float(loss.detach())


_RESIDENT_RESERVE = 0.25  # share of the GPU's free memory left for the fit's activations and logits


def _fit_on(layers: Sequence[nn.Module], device: torch.device) -> bool:
    """Whether the layers that live off the GPU ``device`` fit in three quarters of its free memory, so
    the end-to-end fit can keep them there instead of copying each one to it twice a step."""
    if device.type != "cuda":
        return False
    away = [layer for layer in layers if any(p.device != device for p in layer.parameters())]
    size = sum(p.numel() * p.element_size() for layer in away for p in layer.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return bool(away) and size <= free * (1 - _RESIDENT_RESERVE)


def fit_norms_end_to_end(
    layers: Sequence[nn.Module],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    output: nn.Module,
    targets: Callable[[int], torch.Tensor],
    device: torch.device,
    epochs: int = NORM_TUNING_EPOCHS,
    lr: float = NORM_TUNING_LR,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = kl_divergence,
) -> tuple[float, float]:
    """Fit every norm weight of ``layers`` and ``output`` at once, so that the whole quantized stack on the
    first layer's ``inputs``, then ``output`` (the final norm and the LM head), approaches ``targets(i)``
    (the float model's logits): Adam on float32 copies, ``epochs`` passes, one sequence a step,
    backpropagating through every layer. The layer-by-layer fits each see one layer; this one lets the
    early layers' norms correct what the later layers make of their error.

    Memory-bounded like the rest of the pipeline: where the layers live off a GPU and do not fit in three
    quarters of its free memory, each layer's weights come to ``device`` for its forward and again for
    its backward; where they fit, they are moved there once for the fit and back after it. A step keeps
    only the sequence's hidden state at each layer's input. Returns the mean loss over the sequences
    before and after; the norms change only when it went down."""
    stages = [*layers, output]
    norms = [norm_parameters(stage) for stage in stages]
    if not any(norms) or not inputs:
        return 0.0, 0.0
    masters = [{n: p.detach().to(device, torch.float32).clone().requires_grad_(True) for n, p in d.items()}
               for d in norms]  # fmt: skip
    optimizer = torch.optim.Adam([m for d in masters for m in d.values()], lr=lr)
    # the output stage (the LM head) runs every step: its weights stay on the device for the whole fit
    output_weights = _weights_on(output, device, {})

    def output_loss(hidden: torch.Tensor, index: int) -> torch.Tensor:
        weights = {**output_weights, **{n: m.to(output_weights[n].dtype) for n, m in masters[-1].items()}}
        with torch.no_grad():
            target = targets(index).to(torch.float32)
        return loss(torch.func.functional_call(output, weights, (hidden,)).to(torch.float32), target)

    def mean_loss() -> float:
        # layer by layer over all sequences: each layer's weights come to the device once
        with torch.no_grad():
            hidden = [h for h, _ in inputs]
            for layer, layer_masters in zip(layers, masters):
                weights = _weights_on(layer, device, layer_masters)
                hidden = [_first(torch.func.functional_call(layer, weights, (h,), kw))
                          for h, (_, kw) in zip(hidden, inputs)]  # fmt: skip
                del weights
            return sum(float(output_loss(h, index)) for index, h in enumerate(hidden)) / len(hidden)

    with on_device(device, *(layers if _fit_on(layers, device) else ())):
        with torch.inference_mode(False), torch.enable_grad():
            inputs = [(_trainable(hidden), _trainable(kwargs)) for hidden, kwargs in inputs]
            before = mean_loss()
            for _ in range(epochs):
                for index, (hidden, kwargs) in enumerate(inputs):
                    head_loss = partial(output_loss, index=index)
                    layerwise_backward(layers, masters[:-1], hidden, kwargs, head_loss, device)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            after = mean_loss()
    if after < before:  # never leave the model worse on its own calibration data
        with torch.no_grad():
            for stage_norms, stage_masters in zip(norms, masters):
                for name, master in stage_masters.items():
                    stage_norms[name].copy_(master)
        return before, after
    return before, before


def output_stage(
    norm: nn.Module | None, head: nn.Module | None
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """What follows the decoder layers, and the loss its outputs are compared with: the final norm and
    the LM head (the logits, by KL divergence), or the norm alone (relative error) without a plain head."""
    if head is not None:
        return _FinalLogits(norm if norm is not None else nn.Identity(), head), kl_divergence
    return (norm if norm is not None else nn.Identity()), relative_error


class _FinalLogits(nn.Module):
    """The final norm followed by the LM head: the logits, for the final norm's fit."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


def output_head_of(model: nn.Module) -> nn.Module | None:
    """The model's LM head when it is a plain Linear with real weights (not on the meta device), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type == "meta":
        return None
    return head


def fit_final_norm(
    model: nn.Module,
    final_norm: nn.Module,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    float_inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    device: torch.device,
) -> tuple[float, float, str]:
    """Fit the final norm so that the quantized model's next-token distributions (its last layer's
    outputs ``inputs`` through the norm and the LM head) approach the float model's (``float_inputs``
    through the untouched norm and the same head): the KL divergence, the quantity perplexity
    measures. Without a plain Linear head, the norm's output is fitted to the float one's instead.
    Returns the loss before and after, and what it measures."""
    hidden = [(h, {}) for h, _ in inputs]
    head = output_head_of(model)
    with on_device(device, final_norm):
        if head is None:
            targets = run_layer(final_norm, [(h, {}) for h, _ in float_inputs], device)
            return (*fit_norms(final_norm, hidden, targets), "error")
        with on_device(device, head):
            float_logits = _FinalLogits(copy.deepcopy(final_norm), head)

            # the float logits are made a sequence at a time: all of them at once would not fit
            def target(index: int) -> torch.Tensor:
                return float_logits(float_inputs[index][0].to(device))

            return (*fit_norms(_FinalLogits(final_norm, head), hidden, target, loss=kl_divergence), "KL")


def final_norm_of(model: nn.Module, layers_name: str) -> nn.Module | None:
    """The normalization module beside the decoder layers (``model.norm`` in a Llama), applied to the
    last layer's output; None when the model has none there or it has no parameters."""
    parent_name = layers_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module) and "Norm" in type(module).__name__ and any(True for _ in module.parameters()):
            return module
    return None


__all__ = [
    "NORM_TUNING_EPOCHS",
    "NORM_TUNING_LR",
    "final_norm_of",
    "fit_final_norm",
    "fit_norms",
    "fit_norms_end_to_end",
    "kl_divergence",
    "layerwise_backward",
    "map_tensors",
    "norm_parameters",
    "on_device",
    "output_head_of",
    "output_stage",
    "relative_error",
    "run_layer",
    "to_device",
]
