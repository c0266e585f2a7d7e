"""Layer-by-layer GPTQ over a causal LM: each decoder layer sees the outputs of the layers before it,
already quantized, and only one layer is on the compute device at a time.

The pipeline:

1. The calibration sequences run through the model up to its first decoder layer
   (embeddings, rotary tables, masks), and the first layer's inputs — hidden states
   and the keyword arguments the model passes every layer — are kept.
2. For each decoder layer in turn: it moves to the compute device; its eligible
   Linears are taken in groups, in the order its forward first calls them, a group
   being the Linears that read the same input tensor (q/k/v, then o, gate/up, down in
   a Llama layer). For each group the layer runs on every calibration input, forward
   pre-hooks add ``X^T X`` of each Linear's input to its Hessian, and ``gptq_quantize``
   turns each weight into MXFP4; the Linear then holds the dequantized weight, so the
   next group's inputs already carry this group's error. The fully quantized layer
   then runs once more, and its outputs are the next layer's inputs.
3. With ``tune_norms`` (the default), the layer's normalization weights (its RMSNorm /
   LayerNorm modules; bf16 like the rest of the checkpoint, never quantized) are then
   fitted so that the quantized layer, on its quantized inputs, gives the outputs the
   *float* layer gives on the float model's inputs: Adam on float32 copies, two passes
   over the calibration sequences, one sequence a step, least relative squared error (each
   token's, averaged).
   That is Norm Tweaking (Li et al., AAAI 2024) with GPTQ: a handful of parameters per
   layer (so nothing to overfit) that let each layer correct the error the quantized
   layers before it left, which GPTQ's own least squares cannot (its target is the layer's
   output on the *quantized* inputs). A float copy of the layer and the float model's
   hidden states are kept for it. After the last layer the model's final norm (``model.norm``)
   is fitted the same way, with the LM head after it, to the float model's next-token
   distributions (least KL divergence: what perplexity measures).
4. With ``end_to_end_norms`` (the default), every norm weight is then fitted once more, all
   at once, to the same next-token distributions, backpropagating through the whole
   quantized stack (one sequence a step, two passes): each layer-wise fit matches one
   layer's outputs, and cannot see what the later layers make of its remaining error; this
   fit can. Layers that live off the GPU are moved there for this fit when they fit in three
   quarters of its free memory, and back after it; otherwise they come to it one at a time,
   for each forward and each backward (``fit_norms_end_to_end``). A step keeps one sequence's
   hidden state per layer.
The layers go back where they were (the CPU, for a model loaded there) as soon as they are done.

Peak memory on the compute device: one decoder layer in its float dtype (two with the norm
fits: the float copy), its Hessians (float32, ``in_features^2`` each for the group at hand),
and the calibration hidden states (two copies, inputs and outputs: ``sequences x seq_len x
hidden`` in the model's dtype; four with the norm fits, five with ``end_to_end_norms``, which
keeps the first layer's inputs). The final norm's fit and the end-to-end fit add the LM head
(two with a quantized head: the float one gives the targets), a few sequences' logits in
float32 (``seq_len x vocab`` each) and, for the end-to-end fit, one sequence's hidden state
per layer, and all the layers when they fit in three quarters of the GPU's free memory (the
fit then keeps them there instead of copying each one twice a step). The output head, when it
is among the Linears to quantize (``quantize_lm_head``),
is quantized last, its Hessian from the final norm's outputs; other Linears outside the
decoder layers are refused. The result is a dict ``name -> (packed, scales)``; swapping
modules is ``replace.py``'s job.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from qwantize_hf.gptq import DEFAULT_DAMPING, gptq_quantize
from qwantize_hf.methods import DEFAULT_SCALE_METHOD
from qwantize_hf.ops import dequantize_mxfp4

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the hook on the first decoder layer once its inputs are captured."""


def decoder_layers(model: nn.Module, module_names: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder layers: the ModuleList holding the most of ``module_names``."""
    names = list(module_names)
    best, best_count = None, 0
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{list_name}." if list_name else ""
        count = sum(1 for name in names if name.startswith(prefix))
        if count > best_count:
            best, best_count = (list_name, module), count
    if best is None:
        raise ValueError(
            "found no list of decoder layers holding the Linears to quantize; the layer-by-layer GPTQ "
            "pipeline needs a model whose blocks sit in an nn.ModuleList (as every transformers LM does)"
        )
    return best


def capture_first_layer_inputs(
    model: nn.Module, first_layer: nn.Module, sequences: Sequence[torch.Tensor], input_device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Each sequence's (hidden states, keyword arguments) as the model hands them to its first layer."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        captured.append((hidden.detach(), kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in sequences:
                try:
                    model(input_ids=ids.to(input_device)[None], use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(sequences):
        raise RuntimeError("the model never called its first decoder layer on the calibration input")
    return captured


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device) -> Any:
    return _map_tensors(value, lambda tensor: tensor.to(device))


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]], device: torch.device):
    """The layer's output hidden states for every input (kept on ``device``)."""
    outputs = []
    with torch.inference_mode():
        for hidden, kwargs in inputs:
            out = layer(hidden.to(device), **_to(kwargs, device))
            outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


def linear_groups(
    layer: nn.Module, names: dict[str, str], inputs: list[tuple[torch.Tensor, dict[str, Any]]], device: torch.device
) -> list[list[str]]:
    """The layer's Linears (``names``: name inside the layer -> name in the model) in groups: those that
    read the same input tensor, in the order the layer's forward first calls them (one run of one input)."""
    order: list[tuple[str, int]] = []
    handles = []

    def watch(local_name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if all(local_name != seen for seen, _ in order):
                order.append((local_name, id(args[0])))

        return record

    for local_name in names:
        handles.append(layer.get_submodule(local_name).register_forward_pre_hook(watch(local_name)))
    try:
        _run_layer(layer, inputs[:1], device)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [names[n] for n in names if all(n != seen for seen, _ in order)]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} Linear module(s) saw no input during calibration, first {unseen[0]!r}: they are "
            "not on the model's forward path, so they cannot be calibrated; add them to "
            "MXFP4Config(modules_to_not_convert=[...]) to keep them unquantized"
        )
    groups: list[list[str]] = []
    last_input = None
    for local_name, input_id in order:
        if groups and input_id == last_input:
            groups[-1].append(local_name)
        else:
            groups.append([local_name])
        last_input = input_id
    return groups


def _hessians(
    layer: nn.Module, group: list[str], inputs: list[tuple[torch.Tensor, dict[str, Any]]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Mean ``x^T x`` (float32) of each Linear's inputs in ``group`` over every calibration token.

    Linears that read the same input tensor (q/k/v, gate/up) share one Hessian: it is summed
    once, by the first of them the forward calls, and the others get the same tensor
    (``gptq_quantize`` works on a copy)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(group, 0)
    owner: dict[str, str] = {}  # Linear -> the Linear whose sum holds its Hessian
    last: list[Any] = [None, None]  # the input tensor seen last, and the Linear that summed it

    def accumulate(local_name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            shares = last[0] is x  # the very tensor the Linear before read (detach() would make a new one)
            owner.setdefault(local_name, last[1] if shares else local_name)
            if owner[local_name] != local_name:
                return
            if not shares:
                last[0], last[1] = x, local_name
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            product = flat.T @ flat
            sums[local_name] = product if local_name not in sums else sums[local_name] + product
            counts[local_name] += flat.shape[0]

        return record

    handles = [layer.get_submodule(name).register_forward_pre_hook(accumulate(name)) for name in group]
    try:
        _run_layer(layer, inputs, device)
    finally:
        for handle in handles:
            handle.remove()
    means = {name: sums[name] / counts[name] for name in group if owner.get(name) == name}
    return {name: means[owner[name]] for name in group}


NORM_TUNING_EPOCHS = 2  # passes over the calibration sequences, one sequence a step
NORM_TUNING_LR = 1e-3  # Adam's learning rate on the float32 copies of the norm weights


def _trainable(value: Any) -> Any:
    """A copy that autograd may save: the hidden states and keyword arguments were made under inference_mode."""
    return _map_tensors(value, torch.Tensor.clone)


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


def _make_resident(layers: Sequence[nn.Module], device: torch.device) -> list[tuple[nn.Module, torch.device]]:
    """Move the layers that live elsewhere to ``device`` for the end-to-end fit when they fit in three
    quarters of its free memory, so that a step does not copy every layer twice; returns the moved
    layers and their homes (empty when they stay where they are, and the fit streams them)."""
    if device.type != "cuda":
        return []
    away = [layer for layer in layers if any(p.device != device for p in layer.parameters())]
    size = sum(p.numel() * p.element_size() for layer in away for p in layer.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if not away or size > free * (1 - _RESIDENT_RESERVE):
        return []
    homes = [(layer, next(layer.parameters()).device) for layer in away]
    for layer in away:
        layer.to(device)
    return homes


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

    homes = _make_resident(layers, device)
    try:
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
    finally:
        for layer, home in homes:
            layer.to(home)
    if after < before:  # never leave the model worse on its own calibration data
        with torch.no_grad():
            for stage_norms, stage_masters in zip(norms, masters):
                for name, master in stage_masters.items():
                    stage_norms[name].copy_(master)
        return before, after
    return before, before


@torch.no_grad()
def gptq_sequential(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    module_names: Iterable[str],
    *,
    block_size: int,
    scale_method: str = DEFAULT_SCALE_METHOD,
    damping: float = DEFAULT_DAMPING,
    act_order: bool = True,
    true_sequential: bool = False,
    tune_norms: bool = True,
    end_to_end_norms: bool = True,
    device: torch.device | None = None,
    input_device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ every named Linear, decoder layer by decoder layer, on quantized inputs.

    Returns ``name -> (packed, scales)`` on the CPU. ``device``: where each layer is
    processed (default: CUDA when available, else the CPU); ``input_device``: where
    the token ids go (default: the input embedding's device). ``true_sequential``: each
    group of a layer is calibrated on inputs that carry the error of the groups quantized
    before it (one pass of the layer per group); False calibrates every Linear of a layer
    on one pass with the layer unquantized (faster, usually a little less accurate). The named Linears'
    weights are left holding their dequantized MXFP4 values (the caller swaps them for
    MXFP4 modules). ``tune_norms``: the decoder layers' normalization weights are fitted after
    each layer is quantized, and the final norm after the last; ``end_to_end_norms``: then all of
    them at once, to the float model's next-token distributions (see the module docstring);
    otherwise nothing else in the model changes.
    """
    names = list(module_names)
    if not names:
        raise ValueError("no modules to quantize: the model has no eligible nn.Linear")
    if not sequences:
        raise ValueError("GPTQ needs at least one calibration sequence")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers_name, layers = decoder_layers(model, names)
    prefix = f"{layers_name}." if layers_name else ""
    head = output_head_of(model)
    head_name = next((name for name in names if head is not None and model.get_submodule(name) is head), None)
    outside = [name for name in names if not name.startswith(prefix) and name != head_name]
    if outside:
        raise ValueError(
            f"{len(outside)} Linear(s) to quantize sit outside the decoder layers ({layers_name}), first "
            f"{outside[0]!r}; GPTQ quantizes only decoder-layer Linears and the output head: add them to "
            "modules_to_not_convert"
        )
    if input_device is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        input_device = torch.device("cpu") if weight is None or weight.device.type == "meta" else weight.device
    inputs = capture_first_layer_inputs(model, layers[0], sequences, input_device)
    inputs = [(hidden.to(device), _to(kwargs, device)) for hidden, kwargs in inputs]
    first_inputs = inputs  # the end-to-end fit starts from them
    keep_float = tune_norms or end_to_end_norms
    float_inputs = list(inputs) if keep_float else None  # the float model's hidden states
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = time.perf_counter()
    for index, layer in enumerate(layers):
        layer_prefix = f"{prefix}{index}."
        local = {name[len(layer_prefix) :]: name for name in names if name.startswith(layer_prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        groups = linear_groups(layer, local, inputs, device) if local else []
        # the float layer: a copy when this one is about to change, else the layer itself
        float_layer = (copy.deepcopy(layer) if local else layer) if keep_float else None
        for position, group in enumerate(groups):
            if true_sequential or position == 0:
                # true_sequential: each group's inputs are recomputed with the groups before it quantized;
                # else one pass gives every Linear of the layer its Hessian
                todo = group if true_sequential else [name for g in groups for name in g]
                hessians = _hessians(layer, todo, inputs, device)
            for local_name in group:
                linear = layer.get_submodule(local_name)
                packed, scales = gptq_quantize(
                    linear.weight, hessians.pop(local_name), block_size=block_size, scale_method=scale_method,
                    damping=damping, act_order=act_order, name=local[local_name],
                )  # fmt: skip
                linear.weight.copy_(dequantize_mxfp4(packed, scales, block_size=block_size, dtype=linear.weight.dtype))
                results[local[local_name]] = (packed.cpu(), scales.cpu())
        tuned = ""
        if float_layer is not None:
            float_outputs = _run_layer(float_layer, float_inputs, device)
            del float_layer
            if local and tune_norms:
                before, after = fit_norms(layer, inputs, float_outputs)
                tuned = f", norms tuned: error vs float {before:.2e} -> {after:.2e}"
            float_inputs = [(out, kwargs) for out, (_, kwargs) in zip(float_outputs, float_inputs)]
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(_run_layer(layer, inputs, device), inputs)]
        layer.to(home)
        if progress is not None:
            progress(f"GPTQ layer {index + 1}/{len(layers)} ({time.perf_counter() - start:.0f} s{tuned})")
    final_norm = final_norm_of(model, layers_name)
    # the float model's output stage, for the end-to-end fit's targets: copies of what is about to change
    float_output = None
    if end_to_end_norms:
        float_output = _output_stage(
            copy.deepcopy(final_norm) if final_norm is not None else None,
            copy.deepcopy(head) if head_name is not None else head,
        )
    if tune_norms and final_norm is not None:
        before, after, measure = fit_final_norm(model, final_norm, inputs, float_inputs, device)
        if progress is not None:
            progress(f"GPTQ final norm tuned: {measure} vs float {before:.2e} -> {after:.2e}")
    if head_name is not None:
        packed, scales = _gptq_head(
            head, final_norm, inputs, device, block_size=block_size, scale_method=scale_method, damping=damping,
            act_order=act_order, name=head_name,
        )  # fmt: skip
        results[head_name] = (packed.cpu(), scales.cpu())
        if progress is not None:
            progress(f"GPTQ {head_name} ({time.perf_counter() - start:.0f} s)")
    if float_output is not None:
        output, loss = _output_stage(final_norm, head)
        target_stage = float_output[0]
        homes = [(m, next(m.parameters(recurse=False)).device) for m in target_stage.modules()
                 if any(True for _ in m.parameters(recurse=False))]  # fmt: skip
        target_stage.to(device)
        try:
            before, after = fit_norms_end_to_end(
                layers, first_inputs, output, lambda index: target_stage(float_inputs[index][0]), device, loss=loss
            )
        finally:
            for module, home in homes:
                module.to(home)
        if progress is not None:
            progress(f"GPTQ norms tuned end to end ({time.perf_counter() - start:.0f} s): "
                     f"{'KL' if loss is kl_divergence else 'error'} vs float {before:.2e} -> {after:.2e}")
    return results


def _output_stage(
    norm: nn.Module | None, head: nn.Module | None
) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """What follows the decoder layers, and the loss its outputs are compared with: the final norm and
    the LM head (the logits, by KL divergence), or the norm alone (relative error) without a plain head."""
    if head is not None:
        return _FinalLogits(norm if norm is not None else nn.Identity(), head), kl_divergence
    return (norm if norm is not None else nn.Identity()), relative_error


def _gptq_head(
    head: nn.Linear,
    final_norm: nn.Module | None,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    device: torch.device,
    *,
    name: str,
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of the output head, after every decoder layer: its inputs are the final norm's outputs on the
    last quantized layer's hidden states. The head then holds its dequantized weight, like the others."""
    homes = [(module, next(module.parameters()).device) for module in (head, final_norm) if module is not None]
    for module, _ in homes:
        module.to(device)
    try:
        hessian = torch.zeros(head.in_features, head.in_features, dtype=torch.float32, device=device)
        count = 0
        for hidden, _ in inputs:
            x = final_norm(hidden) if final_norm is not None else hidden
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            hessian.addmm_(x.T, x)
            count += x.shape[0]
        packed, scales = gptq_quantize(head.weight, hessian / max(count, 1), name=name, **settings)
        head.weight.copy_(
            dequantize_mxfp4(packed, scales, block_size=settings["block_size"], dtype=head.weight.dtype)
        )
        return packed, scales
    finally:
        for module, home in homes:
            module.to(home)


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
    home = next(final_norm.parameters()).device
    final_norm.to(device)
    hidden = [(h, {}) for h, _ in inputs]
    head = output_head_of(model)
    try:
        if head is None:
            targets = _run_layer(final_norm, [(h, {}) for h, _ in float_inputs], device)
            return (*fit_norms(final_norm, hidden, targets), "error")
        head_home = head.weight.device
        float_logits = _FinalLogits(copy.deepcopy(final_norm), head).to(device)
        try:
            # the float logits are made a sequence at a time: all of them at once would not fit
            def target(index: int) -> torch.Tensor:
                return float_logits(float_inputs[index][0].to(device))

            return (*fit_norms(_FinalLogits(final_norm, head), hidden, target, loss=kl_divergence), "KL")
        finally:
            head.to(head_home)
    finally:
        final_norm.to(home)


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
    "capture_first_layer_inputs",
    "decoder_layers",
    "gptq_sequential",
    "linear_groups",
    "norm_parameters",
    "final_norm_of",
    "fit_final_norm",
    "fit_norms",
    "kl_divergence",
    "output_head_of",
    "relative_error",
]
