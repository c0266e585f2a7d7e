"""Fused mixture-of-experts weights as MXFP4: the experts module keeps its class, its weights change.

In transformers 5 the experts of Qwen2/3-MoE, Mixtral, OLMoE, ... are one module (decorated with
``use_experts_implementation``) holding ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, run by
an experts implementation that ``config._experts_implementation`` names. Quantized, the same module
holds ``gate_up_proj`` uint8 ``[E, 2I, H/2]`` + ``gate_up_proj_scale`` uint8 ``[E, 2I, H/32]`` and the
same for ``down_proj`` (blocks along each expert's reduction dimension), and the implementation
``qwantize_mxfp4`` (``experts_forward``) runs each routed expert's products: on CUDA as one
``mxfp4_linear_routed`` call per product over all (token, expert) pairs; elsewhere so for a few pairs, and as
``mxfp4_linear`` calls per expert hit for more.

Checkpoints: transformers saves fused experts per expert (``experts.<e>.gate_proj.weight``, ...) by
reversing its load-time conversions; the codes follow the weights, and ``record_scale_conversions``
gives the scales the same conversions, so a checkpoint holds ``experts.<e>.<proj>.weight`` uint8
``[N, K/2]`` and ``.weight_scale`` ``[N, K/32]``: the MXFP4Linear layout, one per expert.

Supported layouts: gated experts (``gate_up_proj``, gated by the module's ``_apply_gate``), weights ``[E, N, K]``
or transposed ``[E, K, N]`` (GPT-OSS; quantized along K all the same, and stored as ``[E, N, K/2]``), with or
without biases (kept float). Ungated experts stay float and the coverage report says why.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from qwantize_hf.constants import F4_CODES_PER_BYTE
from qwantize_hf.linear_op import mxfp4_linear
from qwantize_hf.ops import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.routed_op import gemv_pairs, mxfp4_linear_routed, routed_fits

PROJECTIONS = ("gate_up_proj", "down_proj")
SCALE_SUFFIX = "_scale"
IMPLEMENTATION = "qwantize_mxfp4"


def unsupported_layout(module: nn.Module) -> str | None:
    """Why a fused experts module cannot be MXFP4 (None when it can, or when it is not one)."""
    if not getattr(module, "has_gate", True):
        return "has no gate_up_proj (ungated experts)"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module (``use_experts_implementation``) whose projections are 3-D float weights
    of a supported layout."""
    return (
        hasattr(module, "is_concatenated")
        and all(_weight(module, projection) is not None for projection in PROJECTIONS)
        and all(_weight(module, projection).is_floating_point() for projection in PROJECTIONS)
        and unsupported_layout(module) is None
    )


def is_mxfp4_experts(module: nn.Module) -> bool:
    return hasattr(module, "is_concatenated") and all(
        isinstance(getattr(module, projection + SCALE_SUFFIX, None), nn.Parameter) for projection in PROJECTIONS
    )


def _weight(module: nn.Module, name: str) -> torch.Tensor | None:
    tensor = getattr(module, name, None)
    return tensor if isinstance(tensor, torch.Tensor) and tensor.ndim == 3 else None


def stored_pairs(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(codes, scales)`` tensor names of an MXFP4 experts module."""
    return tuple((projection, projection + SCALE_SUFFIX) for projection in PROJECTIONS)


def product_shape(module: nn.Module, projection: str) -> tuple[int, int, int]:
    """``(experts, out, in)`` of a projection, whichever way its float weight is stored (GPT-OSS: ``[E, K, N]``)."""
    experts, rows, columns = _weight(module, projection).shape
    return (experts, columns, rows) if getattr(module, "is_transposed", False) else (experts, rows, columns)


def expert_weight(
    module: nn.Module, projection: str, expert: int | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The float weight of a projection as ``[E, N, K]`` (or expert ``expert``'s ``[N, K]``): a view, transposed
    for GPT-OSS's ``[E, K, N]``, so writing into it writes the module's weight. ``tensors``: the module's float
    tensors by name when they are not on it (accelerate offload)."""
    weight = _weight(module, projection) if tensors is None else tensors[projection]
    if getattr(module, "is_transposed", False):
        weight = weight.transpose(-1, -2)
    return weight if expert is None else weight[expert]


def float_product(
    module: nn.Module,
    projection: str,
    expert: int,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ W.T + b`` of a float experts module's expert ``expert`` (``weight``: its ``[N, K]`` when at hand;
    ``tensors`` as for ``expert_weight``)."""
    weight = expert_weight(module, projection, expert, tensors) if weight is None else weight
    bias = None
    if getattr(module, "has_bias", False):
        bias = getattr(module, projection + "_bias", None) if tensors is None else tensors.get(projection + "_bias")
    return torch.nn.functional.linear(x, weight, None if bias is None else bias[expert])


def gated(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The module's own gate (activation, and for GPT-OSS its clamp and GLU) applied to ``gate_up_proj``'s output."""
    return module._apply_gate(gate_up)


def install(module: nn.Module, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], *, block_size: int) -> None:
    """Make a float experts module MXFP4: each projection's float weight becomes its codes ``[E, N, K/2]``
    and ``<projection>_scale`` its scales (on the weight's device)."""
    for projection in PROJECTIONS:
        packed, scales = quantized[projection]
        device = _weight(module, projection).device
        setattr(module, projection, nn.Parameter(packed.to(device), requires_grad=False))
        module.register_parameter(projection + SCALE_SUFFIX, nn.Parameter(scales.to(device), requires_grad=False))
    module.mxfp4_block_size = block_size


def quantize_float(
    module: nn.Module, *, block_size: int, scale_method: str = "mse", name: str = "experts"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each projection of a float experts module quantized along its experts' reduction dimension (data-free
    ``scale_method``): ``{projection: (packed [E, N, K/2], scales)}``, ready for ``install``."""
    return {
        projection: quantize_mxfp4(
            expert_weight(module, projection), block_size=block_size, scale_method=scale_method,
            name=f"{name}.{projection}",
        )  # fmt: skip
        for projection in PROJECTIONS
    }


def divisible(module: nn.Module, block_size: int) -> bool:
    return all(product_shape(module, projection)[2] % block_size == 0 for projection in PROJECTIONS)


def prepare_for_loading(module: nn.Module, *, block_size: int, stored: bool) -> None:
    """Give a fused experts module its scale parameters (uint8 placeholders), and, for a stored MXFP4
    checkpoint, uint8 code placeholders; a float checkpoint keeps float weight placeholders, which the
    load op quantizes."""
    for projection in PROJECTIONS:
        weight = _weight(module, projection)
        experts, rows, columns = product_shape(module, projection)  # the codes are [E, N, K/2] either way
        scales = torch.empty(experts, rows, columns // block_size, dtype=torch.uint8, device=weight.device)
        module.register_parameter(projection + SCALE_SUFFIX, nn.Parameter(scales, requires_grad=False))
        if stored:
            codes = torch.empty(experts, rows, columns // F4_CODES_PER_BYTE, dtype=torch.uint8, device=weight.device)
            setattr(module, projection, nn.Parameter(codes, requires_grad=False))
    module.mxfp4_block_size = block_size


def check_shapes(name: str, module: nn.Module) -> None:
    """Raise when a loaded MXFP4 experts module's codes and scales do not hold ``num_experts`` experts of
    matching shapes (a checkpoint that lacks some expert's tensors, which transformers 5.17 merges anyway)."""
    count, block_size = getattr(module, "num_experts", None), module.mxfp4_block_size
    for codes_name, scales_name in stored_pairs(module):
        codes, scales = getattr(module, codes_name), getattr(module, scales_name)
        consistent = (
            codes.ndim == 3 and scales.ndim == 3 and codes.shape[:2] == scales.shape[:2]
            and codes.shape[2] * F4_CODES_PER_BYTE == scales.shape[2] * block_size
            and (count is None or codes.shape[0] == count)
        )  # fmt: skip
        if not consistent:
            raise ValueError(
                f"{name}.{codes_name} {tuple(codes.shape)} and {name}.{scales_name} {tuple(scales.shape)} are not the "
                f"codes and scales of {count} experts (block size {block_size}): the checkpoint lacks some expert's "
                "tensors or is corrupt. Re-save it with save_pretrained"
            )


def awaits_quantization(module: nn.Module | None, projection: str) -> bool:
    """A prepared experts module whose ``projection`` still holds a float weight."""
    return (
        module is not None
        and projection in PROJECTIONS
        and is_mxfp4_experts(module)
        and getattr(module, projection).is_floating_point()
    )


# On CUDA, where both products' K fit the kernels (bf16/fp16 activations, K a multiple of 32), every
# product is one mxfp4_linear_routed call over all (token, expert) pairs: the routed kernel for a few pairs
# (decode), the grouped kernel for more (prefill; routed_op.gemv_pairs decides). Neither synchronises with
# the host, so torch.compile(fullgraph=True) and CUDA graphs take the step at any size. With gradients to
# the hidden states (training), more pairs than the routed kernel takes loop instead (below). Elsewhere (CPU, float32
# activations) the routed op's torch twin dequantizes one expert per pair, so up to TWIN_GATHER_PAIRS pairs
# take it, and more loop over the experts hit: each runs once on all of its tokens (a host sync, and two
# mxfp4_linear calls per expert). eval/bench_moe.py times each path at each size.
TWIN_GATHER_PAIRS = 16
# Tokens a routed call takes at once: its temporaries are [tokens x top_k, H] (the pairs' rows, sorted
# and unsorted), so a long prompt runs in chunks of this many tokens (each expert still read once per
# row tile of its pairs in a chunk: 4096 tokens at top-8 over 128 experts is 256 rows an expert).
GATHER_CHUNK_TOKENS = 4096


def gather_pairs(module: nn.Module, hidden_states: torch.Tensor) -> int | None:
    """Up to how many (token, expert) pairs ``experts_forward`` runs as routed calls for this module and
    input (None: every count)."""
    down_k = module.down_proj.shape[-1] * F4_CODES_PER_BYTE  # codes [E, N, K/2]: down's reduction length
    dtype = hidden_states.dtype
    if hidden_states.is_cuda and routed_fits(dtype, hidden_states.shape[-1]) and routed_fits(dtype, down_k):
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            # Training: the routed op's backward dequantizes an expert per pair, the loop's one per expert hit.
            return gemv_pairs(module.num_experts)
        return None
    return TWIN_GATHER_PAIRS


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts implementation ``qwantize_mxfp4``: each routed expert's ``gate_up``, the module's gate and
    ``down``, each an ``mxfp4_linear`` on that expert's codes and scales, weighted by the router and summed
    per token. On CUDA every pair count runs as one routed call per product (``mxfp4_linear_routed``: the
    routed kernel for a few pairs, the grouped kernel for more); elsewhere a few pairs do, and more loop
    over the experts hit, in the order of transformers' eager loop (``gather_pairs``)."""
    limit = gather_pairs(self, hidden_states)
    if limit is None or top_k_index.numel() <= limit:
        return _gathered(self, hidden_states, top_k_index, top_k_weights)
    return _looped(self, hidden_states, top_k_index, top_k_weights)


def _tensors(self: nn.Module, index: int) -> dict[str, torch.Tensor | None]:
    """The codes, scales and (GPT-OSS) biases of expert ``index``."""
    names = [name for pair in stored_pairs(self) for name in pair]
    tensors: dict[str, torch.Tensor | None] = {name: getattr(self, name)[index] for name in names}
    for projection in PROJECTIONS:
        bias = getattr(self, projection + "_bias", None) if getattr(self, "has_bias", False) else None
        tensors[projection + "_bias"] = None if bias is None else bias[index]
    return tensors


def _expert(self: nn.Module, state: torch.Tensor, tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
    block_size = self.mxfp4_block_size
    gate_up = mxfp4_linear(
        state, tensors["gate_up_proj"], tensors["gate_up_proj_scale"], tensors["gate_up_proj_bias"], block_size
    )
    state = mxfp4_linear(
        gated(self, gate_up), tensors["down_proj"], tensors["down_proj_scale"], tensors["down_proj_bias"],
        block_size,
    )  # fmt: skip
    return self.post_expert_norm(state) if getattr(self, "has_post_expert_norm", False) else state


def _looped(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hit = torch.unique(top_k_index).tolist()
    for expert in hit:
        if not 0 <= expert < self.num_experts:  # expert-parallel sentinels add nothing
            continue
        token, position = torch.where(top_k_index == expert)
        state = _expert(self, hidden_states[token], _tensors(self, expert)) * top_k_weights[token, position, None]
        final.index_add_(0, token, state.to(final.dtype))
    return final


def _gathered(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    tokens, top_k = top_k_index.shape
    if tokens > GATHER_CHUNK_TOKENS:  # bounds the [pairs, H] temporaries of a long prompt
        step = GATHER_CHUNK_TOKENS
        parts = [
            _gathered(self, hidden_states[i : i + step], top_k_index[i : i + step], top_k_weights[i : i + step])
            for i in range(0, tokens, step)
        ]
        return torch.cat(parts)
    flat = top_k_index.reshape(-1)
    valid = (flat >= 0) & (flat < self.num_experts)  # expert-parallel sentinels add nothing
    ids = flat.clamp(0, self.num_experts - 1)
    state = hidden_states.repeat_interleave(top_k, dim=0)  # [pairs, H]: each pair's row, its expert's codes
    biases = {p: getattr(self, p + "_bias", None) if getattr(self, "has_bias", False) else None for p in PROJECTIONS}
    block_size = self.mxfp4_block_size
    gate_up = mxfp4_linear_routed(
        state, ids, self.gate_up_proj, self.gate_up_proj_scale, biases["gate_up_proj"], block_size
    )
    out = mxfp4_linear_routed(
        gated(self, gate_up), ids, self.down_proj, self.down_proj_scale, biases["down_proj"], block_size
    )
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    weights = torch.where(valid, top_k_weights.reshape(-1), torch.zeros_like(top_k_weights.reshape(-1)))
    out = (out * weights[:, None]).to(hidden_states.dtype)
    return out.reshape(tokens, top_k, -1).sum(dim=1)


def register_implementation() -> None:
    """Make ``qwantize_mxfp4`` a valid experts implementation (transformers' ExpertsInterface is class-wide)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def use_implementation(model: nn.Module, names: Iterable[str]) -> None:
    """Run the named MXFP4 experts modules with ``experts_forward``; raise if transformers would not."""
    register_implementation()
    model.set_experts_implementation(IMPLEMENTATION)
    guard_implementation(model)
    for name in names:
        config = getattr(model.get_submodule(name), "config", None)
        if getattr(config, "_experts_implementation", None) != IMPLEMENTATION:
            raise RuntimeError(
                f"{name}: transformers did not switch this experts module to the {IMPLEMENTATION!r} implementation, "
                "so its MXFP4 weights cannot run; keep its experts float with modules_to_not_convert"
            )


def guard_implementation(model: nn.Module) -> None:
    """Make ``model.set_experts_implementation`` refuse any implementation but ``qwantize_mxfp4`` while the
    model holds MXFP4 experts (transformers' own ones would run on the uint8 codes)."""

    def set_experts_implementation(self: nn.Module, experts_implementation: str | dict) -> None:
        requested = (
            experts_implementation.values() if isinstance(experts_implementation, dict) else [experts_implementation]
        )
        if any(value != IMPLEMENTATION for value in requested) and any(is_mxfp4_experts(m) for m in self.modules()):
            raise ValueError(
                f"this model's experts are MXFP4 and run only as the {IMPLEMENTATION!r} experts implementation, "
                f"not {experts_implementation!r}: call model.dequantize() first for float experts"
            )
        type(self).set_experts_implementation(self, experts_implementation)

    model.set_experts_implementation = types.MethodType(set_experts_implementation, model)


def record_scale_conversions(model: nn.Module) -> None:
    """Give the scales the load-time conversions their codes had, so that save_pretrained writes them per
    expert beside the codes (``...experts.<e>.gate_proj.weight_scale``) in every transformers version.

    transformers keeps in ``model._weight_conversions`` the converters that matched the checkpoint; each
    one that made an expert projection from ``...weight`` tensors gets a twin from ``...weight_scale``
    tensors to ``<projection>_scale``, with the same operations (merge, concatenate: byte-exact)."""
    from transformers.core_model_loading import WeightConverter

    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return
    present = {tuple(c._original_source_patterns) for c in conversions if isinstance(c, WeightConverter)}
    twins = []
    for converter in conversions:
        if not isinstance(converter, WeightConverter):
            continue
        sources, targets = converter._original_source_patterns, converter._original_target_patterns
        if not all(s.endswith(".weight") for s in sources):
            continue
        if not any(t.rsplit(".", 1)[-1] in PROJECTIONS for t in targets):
            continue
        scale_sources = [s + SCALE_SUFFIX for s in sources]
        if tuple(scale_sources) in present:
            continue
        scale_targets = [t + SCALE_SUFFIX for t in targets]
        twin = WeightConverter(scale_sources, scale_targets, operations=list(converter.operations))
        twin.scope_prefix, twin.base_model_prefix = converter.scope_prefix, converter.base_model_prefix
        twins.append(twin)
    model._weight_conversions = [*conversions, *twins]


def dequantize(module: nn.Module, dtype: torch.dtype) -> None:
    """Turn an MXFP4 experts module back into float weights (and drop its scales)."""
    block_size = module.mxfp4_block_size
    for projection in PROJECTIONS:
        codes, scales = getattr(module, projection), getattr(module, projection + SCALE_SUFFIX)
        weight = dequantize_mxfp4(codes, scales, block_size=block_size, dtype=dtype)
        if getattr(module, "is_transposed", False):  # back to the [E, K, N] the module computes with
            weight = weight.transpose(-1, -2).contiguous()
        setattr(module, projection, nn.Parameter(weight))
        delattr(module, projection + SCALE_SUFFIX)
    del module.mxfp4_block_size


__all__ = [
    "IMPLEMENTATION",
    "PROJECTIONS",
    "SCALE_SUFFIX",
    "awaits_quantization",
    "check_shapes",
    "dequantize",
    "expert_weight",
    "float_product",
    "gated",
    "install",
    "quantize_float",
    "TWIN_GATHER_PAIRS",
    "GATHER_CHUNK_TOKENS",
    "gather_pairs",
    "experts_forward",
    "product_shape",
    "guard_implementation",
    "is_fused_experts",
    "is_mxfp4_experts",
    "prepare_for_loading",
    "record_scale_conversions",
    "register_implementation",
    "stored_pairs",
    "unsupported_layout",
    "use_implementation",
]
