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
4. The layer goes back where it was (the CPU, for a model loaded there).

Peak memory on the compute device: one decoder layer in its float dtype (two with
``tune_norms``: the float copy), its Hessians (float32, ``in_features^2`` each for the
group at hand), and the calibration hidden states (two copies, inputs and outputs:
``sequences x seq_len x hidden`` in the model's dtype; four with ``tune_norms``). The final
norm's fit adds the LM head and a few sequences' logits in float32 (``seq_len x vocab`` each).
Linears outside the decoder layers (``lm_head``) are not quantized here. The result is a
dict ``name -> (packed, scales)``; swapping modules is ``replace.py``'s job.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
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
    each layer is quantized (see the module docstring); otherwise nothing else in the model changes.
    """
    names = list(module_names)
    if not names:
        raise ValueError("no modules to quantize: the model has no eligible nn.Linear")
    if not sequences:
        raise ValueError("GPTQ needs at least one calibration sequence")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers_name, layers = decoder_layers(model, names)
    prefix = f"{layers_name}." if layers_name else ""
    outside = [name for name in names if not name.startswith(prefix)]
    if outside:
        raise ValueError(
            f"{len(outside)} Linear(s) to quantize sit outside the decoder layers ({layers_name}), first "
            f"{outside[0]!r}; GPTQ quantizes only decoder-layer Linears: add them to modules_to_not_convert"
        )
    if input_device is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        input_device = torch.device("cpu") if weight is None or weight.device.type == "meta" else weight.device
    inputs = capture_first_layer_inputs(model, layers[0], sequences, input_device)
    inputs = [(hidden.to(device), _to(kwargs, device)) for hidden, kwargs in inputs]
    float_inputs = list(inputs) if tune_norms else None  # the float model's hidden states
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = time.perf_counter()
    for index, layer in enumerate(layers):
        layer_prefix = f"{prefix}{index}."
        local = {name[len(layer_prefix) :]: name for name in names if name.startswith(layer_prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        groups = linear_groups(layer, local, inputs, device) if local else []
        # the float layer: a copy when this one is about to change, else the layer itself
        float_layer = (copy.deepcopy(layer) if local else layer) if tune_norms else None
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
            if local:
                before, after = fit_norms(layer, inputs, float_outputs)
                tuned = f", norms tuned: error vs float {before:.2e} -> {after:.2e}"
            float_inputs = [(out, kwargs) for out, (_, kwargs) in zip(float_outputs, float_inputs)]
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(_run_layer(layer, inputs, device), inputs)]
        layer.to(home)
        if progress is not None:
            progress(f"GPTQ layer {index + 1}/{len(layers)} ({time.perf_counter() - start:.0f} s{tuned})")
    final_norm = final_norm_of(model, layers_name)
    if tune_norms and final_norm is not None:
        before, after, measure = fit_final_norm(model, final_norm, inputs, float_inputs, device)
        if progress is not None:
            progress(f"GPTQ final norm tuned: {measure} vs float {before:.2e} -> {after:.2e}")
    return results


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
