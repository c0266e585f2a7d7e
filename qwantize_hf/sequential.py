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
is among the Linears to quantize (``quantize_lm_head``), is quantized last, its Hessian from
the final norm's outputs; other Linears outside the decoder layers are refused. The result is a
dict ``name -> (packed, scales)``; swapping modules is ``replace.py``'s job, the norm fits are
``norm_fits.py``'s.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qwantize_hf.expert_calibration import quantize_routed_gptq, routed_inputs
from qwantize_hf.experts import PROJECTIONS
from qwantize_hf.gptq import DEFAULT_DAMPING, gptq_quantize
from qwantize_hf.methods import DEFAULT_SCALE_METHOD
from qwantize_hf.norm_fits import (
    final_norm_of,
    fit_final_norm,
    fit_norms,
    fit_norms_end_to_end,
    kl_divergence,
    on_device,
    output_head_of,
    output_stage,
    run_layer,
    to_device,
)
from qwantize_hf.ops import dequantize_mxfp4
from qwantize_hf.targets import weight_kind

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
        run_layer(layer, inputs[:1], device)
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
        run_layer(layer, inputs, device)
    finally:
        for handle in handles:
            handle.remove()
    means = {name: sums[name] / counts[name] for name in group if owner.get(name) == name}
    return {name: means[owner[name]] for name in group}


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
    experts_names: Iterable[str] = (),
    routed_counts: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
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

    ``experts_names``: fused experts modules (float) to quantize too, each expert by GPTQ on the tokens
    routed to it (``expert_calibration.quantize_routed_gptq``), after the Linears of its layer: their
    results are ``{projection: (packed [E, N, K/2], scales)}``, and ``routed_counts`` (when given) gets
    each module's ``(experts that received tokens, experts)``.
    """
    names = list(module_names)
    fused = list(experts_names)
    if not names and not fused:
        raise ValueError("no modules to quantize: the model has no eligible nn.Linear")
    if not sequences:
        raise ValueError("GPTQ needs at least one calibration sequence")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers_name, layers = decoder_layers(model, names + fused)
    prefix = f"{layers_name}." if layers_name else ""
    head = output_head_of(model)
    head_name = next((name for name in names if head is not None and model.get_submodule(name) is head), None)
    outside = [name for name in names + fused if not name.startswith(prefix) and name != head_name]
    if outside:
        raise ValueError(
            f"{len(outside)} module(s) to quantize sit outside the decoder layers ({layers_name}), first "
            f"{outside[0]!r}; GPTQ quantizes only decoder-layer Linears and experts and the output head: add them to "
            "modules_to_not_convert"
        )
    if input_device is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        input_device = torch.device("cpu") if weight is None or weight.device.type == "meta" else weight.device
    inputs = capture_first_layer_inputs(model, layers[0], sequences, input_device)
    inputs = [(hidden.to(device), to_device(kwargs, device)) for hidden, kwargs in inputs]
    first_inputs = inputs  # the end-to-end fit starts from them
    keep_float = tune_norms or end_to_end_norms
    float_inputs = list(inputs) if keep_float else None  # the float model's hidden states
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = time.perf_counter()
    for index, layer in enumerate(layers):
        layer_prefix = f"{prefix}{index}."
        local = {name[len(layer_prefix) :]: name for name in names if name.startswith(layer_prefix)}
        local_experts = {name[len(layer_prefix) :]: name for name in fused if name.startswith(layer_prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        groups = linear_groups(layer, local, inputs, device) if local else []
        # the float layer: a copy when this one is about to change, else the layer itself
        changes = bool(local or local_experts)
        float_layer = (copy.deepcopy(layer) if changes else layer) if keep_float else None
        for position, group in enumerate(groups):
            if true_sequential or position == 0:
                # true_sequential: each group's inputs are recomputed with the groups before it quantized;
                # else one pass gives every Linear of the layer its Hessian
                todo = group if true_sequential else [name for g in groups for name in g]
                hessians = _hessians(layer, todo, inputs, device)
            for local_name in group:
                linear = layer.get_submodule(local_name)
                weight = weight_kind(linear).linear_layout(linear.weight)  # [out, in] (a view of a Conv1D's)
                packed, scales = gptq_quantize(
                    weight, hessians.pop(local_name), block_size=block_size, scale_method=scale_method,
                    damping=damping, act_order=act_order, name=local[local_name],
                )  # fmt: skip
                weight.copy_(dequantize_mxfp4(packed, scales, block_size=block_size, dtype=weight.dtype))
                results[local[local_name]] = (packed.cpu(), scales.cpu())
        if local_experts:  # on the outputs of the quantized Linears before them
            with routed_inputs(layer, local_experts) as records:
                run_layer(layer, inputs, device)
            for local_name, record in records.items():
                module, name = layer.get_submodule(local_name), local_experts[local_name]
                quantized, routed = quantize_routed_gptq(
                    module, record, block_size=block_size, name=name, scale_method=scale_method, damping=damping,
                    act_order=act_order,
                )  # fmt: skip
                results[name] = {projection: (p.cpu(), s.cpu()) for projection, (p, s) in quantized.items()}
                if routed_counts is not None:
                    routed_counts[name] = (routed, quantized[PROJECTIONS[0]][0].shape[0])
            del records
        tuned = ""
        if float_layer is not None:
            float_outputs = run_layer(float_layer, float_inputs, device)
            del float_layer
            if changes and tune_norms:
                before, after = fit_norms(layer, inputs, float_outputs)
                tuned = f", norms tuned: error vs float {before:.2e} -> {after:.2e}"
            float_inputs = [(out, kwargs) for out, (_, kwargs) in zip(float_outputs, float_inputs)]
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(run_layer(layer, inputs, device), inputs)]
        layer.to(home)
        if progress is not None:
            progress(f"GPTQ layer {index + 1}/{len(layers)} ({time.perf_counter() - start:.0f} s{tuned})")
    final_norm = final_norm_of(model, layers_name)
    # the float model's output stage, for the end-to-end fit's targets: copies of what is about to change
    float_output = None
    if end_to_end_norms:
        float_output = output_stage(
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
        output, loss = output_stage(final_norm, head)
        target_stage = float_output[0]
        with on_device(device, target_stage):
            before, after = fit_norms_end_to_end(
                layers, first_inputs, output, lambda index: target_stage(float_inputs[index][0]), device, loss=loss
            )
        if progress is not None:
            progress(f"GPTQ norms tuned end to end ({time.perf_counter() - start:.0f} s): "
                     f"{'KL' if loss is kl_divergence else 'error'} vs float {before:.2e} -> {after:.2e}")
    return results


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
    with on_device(device, head, final_norm):
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


__all__ = ["capture_first_layer_inputs", "decoder_layers", "gptq_sequential", "linear_groups"]
