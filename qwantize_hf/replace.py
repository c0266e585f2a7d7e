"""The mechanism behind quantizer.py: which Linears to swap, the swap, quantize-on-load, dequantize,
and the calibrated path's quantize-after-loading.

quantizer.py decides *when* each of these runs; this file does the work on
modules and tensors. Loading goes through transformers' weight-loading loop:
the model skeleton sits on the meta device, every checkpoint tensor arrives on
the device the device_map gives it, and ``QuantizeOnLoad`` turns a float
weight into ``(packed, scales)`` right there, one tensor at a time, so the
whole model is never held in bf16 on the target device.

Placeholders matter because transformers casts or shape-checks an incoming
tensor against the parameter it replaces, and the rules changed inside 5.x
(5.17 casts a tensor to the placeholder's dtype before the quantize op runs):

* quantize-on-load: ``weight`` is a float ``[N, K]`` placeholder of the model
  dtype, so a bf16 checkpoint tensor is never truncated by a cast to uint8;
* loading stored bytes (and after each quantization): ``weight`` is a uint8
  ``[N, K/2]`` placeholder, so the stored bytes are never cast to a float type
  and a weight offloaded to disk is read back with the right shape and dtype.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from qwantize_hf import experts
from qwantize_hf.constants import E8M0_NAN, F4_CODES_PER_BYTE
from qwantize_hf.linear import MXFP4Linear
from qwantize_hf.ops import quantize_mxfp4
from qwantize_hf.targets import mxfp4_kind, mxfp4_module_like, weight_kind

logger = logging.getLogger(__name__)

DEFAULT_MODULES_TO_NOT_CONVERT = ("lm_head",)


# --------------------------------------------------------------------------- which modules


def module_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when one of ``patterns`` is ``name`` or a run of its dotted components.

    ``"lm_head"`` matches ``lm_head`` and ``model.lm_head``; ``"layers.0.mlp"``
    matches ``model.layers.0.mlp.up_proj``; ``"proj"`` does not match ``q_proj``.
    """
    padded = f".{name}."
    return any(f".{pattern.strip('.')}." in padded for pattern in patterns)


def tied_module_names(model: nn.Module) -> set[str]:
    """Modules whose weight is tied to another module's (e.g. lm_head ↔ embed_tokens).

    A tied weight is one tensor seen under two names; quantizing it under one
    name would change the other, so such modules always stay unquantized.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied) | set(tied.values())
    return {name.rpartition(".")[0] for name in names if name.endswith(".weight")}


def resolve_modules_to_not_convert(
    model: nn.Module, requested: list[str] | None, *, stored: bool = False, quantize_lm_head: bool = False
) -> list[str]:
    """``lm_head`` (unless ``quantize_lm_head``) + ``_keep_in_fp32_modules``, then the user's list (it
    adds to them), then every tied module. ``stored``: ``requested`` is a checkpoint's record, the list
    it was quantized with, and is taken as it is (plus tied modules): a record written before lists
    were additive may lack ``lm_head`` because that checkpoint stores ``lm_head`` quantized."""
    if stored and requested is not None:
        skip = list(requested)
    else:
        keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
        defaults = () if quantize_lm_head else DEFAULT_MODULES_TO_NOT_CONVERT
        skip = [*defaults, *keep_fp32, *(requested or ())]
    skip += sorted(tied_module_names(model))
    return sorted(set(skip), key=skip.index)


def output_head_name(model: nn.Module) -> str | None:
    """The name of the model's output head (``get_output_embeddings()``, ``lm_head`` in most models)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def untie_output_head(model: nn.Module) -> tuple[str, str] | None:
    """Give a head whose weight is tied to the input embeddings a weight of its own (a copy), so it can
    be quantized while the embeddings stay float; the config then says the weights are not tied, so a
    save stores both and a reload does not tie them again. Returns ``(head, embeddings)`` names, or None
    when the head is not tied."""
    name = output_head_name(model)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    key = f"{name}.weight"
    if name is None or key not in tied and key not in tied.values():
        return None
    source = tied.get(key) or next(target for target, value in tied.items() if value == key)
    head = model.get_submodule(name)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for target in [target for target, value in tied.items() if key in (target, value)]:
        del tied[target]
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return name, source.rpartition(".")[0]


# --------------------------------------------------------------------------- placeholders


def use_float_placeholder(module: MXFP4Linear, dtype: torch.dtype) -> None:
    """Make ``weight`` a meta float tensor that a checkpoint weight can be loaded into: ``[N, K]``, or
    ``[K, N]`` where the float layer was a Conv1D."""
    shape = (module.out_features, module.in_features)
    if module.source_transposed:
        shape = shape[::-1]
    module.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


def use_packed_placeholder(module: MXFP4Linear) -> None:
    """Make ``weight`` a meta uint8 ``[N, K/2]`` tensor, the layout stored in a checkpoint."""
    shape = (module.out_features, module.in_features // F4_CODES_PER_BYTE)
    module.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device="meta"), requires_grad=False)


def awaits_quantization(module: nn.Module) -> bool:
    return isinstance(module, MXFP4Linear) and module.weight.is_floating_point()


# --------------------------------------------------------------------------- the swap


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def linears_to_convert(
    model: nn.Module, *, block_size: int, modules_to_not_convert: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(Linears that become MXFP4Linear, Linears left alone because ``in_features % block_size``).

    Which modules are eligible is ``targets.weight_kind``'s answer (exactly ``nn.Linear``
    today). Modules in ``modules_to_not_convert`` are in neither list.
    """
    skip = list(modules_to_not_convert)
    convert, not_divisible = [], []
    for name, module in model.named_modules():
        kind = weight_kind(module)
        if kind is None or module_matches(name, skip):
            continue
        (not_divisible if kind.reduction_size(module) % block_size else convert).append(name)
    return convert, not_divisible


def replace_linear_with_mxfp4(
    model: nn.Module,
    *,
    block_size: int,
    modules_to_not_convert: Iterable[str],
    quantize_on_load: bool,
) -> list[str]:
    """Swap every eligible ``nn.Linear`` of a (meta) model for an MXFP4Linear, in place.

    Returns the Linears left alone because ``in_features`` is not a multiple of
    ``block_size`` (modules in ``modules_to_not_convert`` are not listed).
    """
    convert, not_divisible = linears_to_convert(
        model, block_size=block_size, modules_to_not_convert=modules_to_not_convert
    )
    for name in convert:
        module = model.get_submodule(name)
        replacement = mxfp4_module_like(module, block_size=block_size, device=module.weight.device)
        if quantize_on_load:
            use_float_placeholder(replacement, module.weight.dtype)
        else:
            use_packed_placeholder(replacement)
        _set_submodule(model, name, replacement)
    return not_divisible


# --------------------------------------------------------------------------- after loading: calibrated


def offload_hook(module: nn.Module) -> Any:
    """The accelerate hook that keeps ``module``'s own tensors off the device (in its weights_map), or None."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


def store_offloaded(weights_map: Any, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` under ``key`` in an accelerate weights_map, in CPU memory.

    A weights_map is a PrefixedDataset over an OffloadedWeightsLoader (whose
    in-memory ``state_dict`` takes priority over what it reads from disk), or a
    plain dict. A disk-offloaded weight thus comes back as packed bytes in memory,
    a quarter of the bf16 tensor it replaces.
    """
    if hasattr(weights_map, "prefix") and hasattr(weights_map, "dataset"):
        store_offloaded(weights_map.dataset, weights_map.prefix + key, tensor)
    elif hasattr(weights_map, "all_keys") and isinstance(getattr(weights_map, "state_dict", None), dict):
        weights_map.state_dict[key] = tensor
        if key not in weights_map.all_keys:
            weights_map.all_keys.append(key)
    elif isinstance(weights_map, dict):
        weights_map[key] = tensor
    else:
        raise TypeError(f"cannot store {key} in an accelerate weights_map of type {type(weights_map).__name__}")


def quantize_linears_with_weights(
    model: nn.Module, weights_by_name: dict[str, torch.Tensor | None], *, block_size: int, scale_method: str = "mse"
) -> None:
    """Quantize each named ``nn.Linear`` with ``weights=weights_by_name[name]`` (``scale_method``: mse unless
    the weights are None) and swap in an MXFP4Linear.

    Each weight is quantized where it executes (an offloaded one on its accelerate
    hook's execution device) and its bf16 tensor is dropped as soon as its bytes
    exist, so the peak is the unquantized model plus one layer's bytes.
    """
    for name, per_feature in weights_by_name.items():
        linear = _calibrated_linear(model, name)
        offload = offload_hook(linear)
        if offload is not None:
            weight = offload.weights_map["weight"].to(offload.execution_device)
        else:
            weight = linear.weight.detach()
        weight = weight_kind(linear).linear_layout(weight)
        packed, scales = quantize_mxfp4(
            weight, block_size=block_size, scale_method=scale_method, weights=per_feature, name=name
        )
        del weight
        swap_in_mxfp4(model, name, packed, scales, block_size=block_size)


def _calibrated_linear(model: nn.Module, name: str) -> nn.Linear:
    linear = model.get_submodule(name)
    if weight_kind(linear) is None:
        raise TypeError(f"{name} is a {type(linear).__name__}, not the nn.Linear that calibration expects")
    return linear


def swap_in_mxfp4(model: nn.Module, name: str, packed: torch.Tensor, scales: torch.Tensor, *, block_size: int) -> None:
    """Replace the ``nn.Linear`` called ``name`` by an MXFP4Linear holding ``packed`` and ``scales``.

    The bytes go where the Linear's weight is (an offloaded Linear's into its accelerate
    hook's weights_map, in CPU memory); an accelerate hook on the Linear moves to its
    replacement; the bias is kept.
    """
    linear = _calibrated_linear(model, name)
    hook = getattr(linear, "_hf_hook", None)
    offload = offload_hook(linear)
    replacement = mxfp4_module_like(linear, block_size=block_size, device="meta")
    if offload is not None:
        # The tensors stay meta placeholders; the hook fills them from its weights_map at forward time.
        store_offloaded(offload.weights_map, "weight", packed.cpu())
        store_offloaded(offload.weights_map, "weight_scale", scales.cpu())
    else:
        device = linear.weight.device
        replacement.weight = nn.Parameter(packed.to(device), requires_grad=False)
        replacement.weight_scale = nn.Parameter(scales.to(device), requires_grad=False)
        if linear.bias is not None:
            replacement.bias = linear.bias
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(replacement, hook)
    _set_submodule(model, name, replacement)


def check_all_quantized(model: nn.Module) -> None:
    """Raise when a layer still waits for a weight that the checkpoint never provided."""
    waiting = [name for name, module in model.named_modules() if awaits_quantization(module)]
    if waiting:
        raise RuntimeError(
            f"{len(waiting)} layer(s) never received a weight to quantize, first {waiting[0]!r}: the "
            "checkpoint has no such weight (is it tied to another one?). Add those modules to "
            "MXFP4Config(modules_to_not_convert=[...])"
        )


def _stored_tensor_present(module: nn.Module, tensor_name: str) -> bool:
    tensor = getattr(module, tensor_name)
    if tensor.device.type != "meta":
        return getattr(tensor, "_is_hf_initialized", False)
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        return False
    try:
        weights_map[tensor_name]
    except KeyError:
        return False
    return True


def stored_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, tensor name)`` of every tensor an MXFP4 module of ``model`` stores
    (packed codes, then scales), in module order."""
    for name, module in model.named_modules():
        for pair in stored_pairs(module):
            for tensor_name in pair:
                yield name, module, tensor_name


def stored_pairs(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(codes, scales)`` tensor names of an MXFP4 module: one pair for an MXFP4Linear, one per
    projection for MXFP4 experts, none for anything else."""
    kind = mxfp4_kind(module)
    if kind is not None:
        return (kind.stored_tensors,)
    return experts.stored_pairs(module) if experts.is_mxfp4_experts(module) else ()


def check_stored_tensors_loaded(model: nn.Module) -> None:
    """Raise when an MXFP4 checkpoint lacked a layer's codes or scales.

    transformers gives a missing tensor an uninitialised placeholder and only logs it;
    for packed bytes that is garbage that would run. Every tensor it loads is flagged
    ``_is_hf_initialized`` (5.17 and 5.24 alike); an offloaded one stays on meta here
    and must be in its accelerate hook's weights map instead.
    """
    missing = [
        f"{name}.{tensor_name}"
        for name, module, tensor_name in stored_tensors(model)
        if not _stored_tensor_present(module, tensor_name)
    ]
    if missing:
        raise RuntimeError(
            f"this MXFP4 checkpoint lacks {len(missing)} tensor(s) its config says are quantized, first "
            f"{missing[0]!r}: the packed codes and scales must both be saved. Re-save the model with "
            "save_pretrained, or re-quantize it from the original weights"
        )


# --------------------------------------------------------------------------- stored dtypes

# The dtypes (safetensors names) whose bytes are MXFP4's bytes as they stand: uint8, and the
# same bits under another name that other MX tools use (int8 codes, float8_e8m0fnu scales).
# Loaded as such and viewed as uint8, never cast by value (a cast would turn E8M0 scale 2**-3
# into byte 0). Any other dtype is refused before a byte is read.
STORED_BYTE_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F8_E8M0": torch.float8_e8m0fnu}


def _safetensors_dtypes(path: str) -> dict[str, str]:
    """``tensor name -> safetensors dtype`` from a .safetensors file's header (nothing else is read)."""
    import json
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def stored_dtypes(checkpoint_files: Iterable[str] | None) -> dict[str, str]:
    """``tensor name -> safetensors dtype`` over the checkpoint's ``.safetensors`` files (headers only)."""
    stored: dict[str, str] = {}
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors"):
            stored.update(_safetensors_dtypes(str(path)))
    return stored


def match_stored_dtypes(model: nn.Module, stored: dict[str, str]) -> None:
    """Before loading stored MXFP4 bytes: give each packed/scales placeholder the dtype its checkpoint
    tensor has (``stored``: ``stored_dtypes`` of the checkpoint files, read from ``.safetensors`` headers;
    other formats load as they always did) when that dtype holds the bytes as they are
    (``STORED_BYTE_DTYPES``), so transformers loads it without a cast; refuse any other dtype, naming
    the tensor."""
    if not stored:
        return
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for name, module, tensor_name in stored_tensors(model):
        key = f"{name}.{tensor_name}"
        # a checkpoint saved from the bare base model lacks the prefix the task model adds
        dtype = stored.get(key, stored.get(key[len(prefix) :]) if key.startswith(prefix) else None)
        if dtype is None or dtype == "U8":
            continue
        if dtype not in STORED_BYTE_DTYPES:
            raise ValueError(
                f"the checkpoint stores {key} as {dtype}, but MXFP4 codes and scales are bytes (uint8; int8 "
                "and float8_e8m0fnu are read as their bytes); a cast would change their values. Re-save it "
                "with save_pretrained, or store tensor.view(torch.uint8) of the original bytes"
            )
        placeholder = getattr(module, tensor_name)
        empty = torch.empty(placeholder.shape, dtype=STORED_BYTE_DTYPES[dtype], device=placeholder.device)
        setattr(module, tensor_name, nn.Parameter(empty, requires_grad=False))


def view_stored_bytes(model: nn.Module) -> None:
    """After loading: codes or scales that arrived as int8 / float8_e8m0fnu become the uint8 view of
    the same bytes (``match_stored_dtypes`` let them load uncast)."""
    for name, module, tensor_name in stored_tensors(model):
        tensor = getattr(module, tensor_name)
        if tensor.dtype == torch.uint8:
            continue
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name}.{tensor_name} is stored as {tensor.dtype} and offloaded; offloaded layers need "
                "uint8 bytes in the checkpoint: re-save it with save_pretrained, or load it without offloading"
            )
        setattr(module, tensor_name, nn.Parameter(tensor.detach().view(torch.uint8), requires_grad=False))


def check_stored_scales(model: nn.Module) -> None:
    """Raise when a stored scale byte is 255 (NaN in UE8M0), naming the tensor and its first bad block.

    Quantization never writes 255 (a NaN or Inf weight is refused instead), so in a checkpoint it
    means the file is corrupt; loaded as it is, the layer would compute NaN or wrong numbers. One
    pass over the scale bytes, 1/16 of the packed codes. Layers offloaded by accelerate (scales on
    the meta device until a forward brings them in) are not checked.
    """
    for name, module in model.named_modules():
        for _, scales_name in stored_pairs(module):
            _check_scale_bytes(name, scales_name, getattr(module, scales_name))


def _check_scale_bytes(name: str, scales_name: str, scales: torch.Tensor) -> None:
    # 255 is the largest byte: a max (3x faster than == and any) finds whether there is one
    if scales.device.type == "meta" or scales.numel() == 0 or int(scales.max()) != E8M0_NAN:
        return
    bad = scales == E8M0_NAN
    first = [int(i) for i in bad.nonzero()[0]]
    raise ValueError(
        f"{name}.{scales_name} holds {int(bad.sum())} scale byte(s) 255, which no quantizer writes (NaN "
        f"in UE8M0), first at block {first}: the checkpoint is corrupt. Re-download or re-save it"
    )


def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Swap every MXFP4Linear back to an ``nn.Linear`` holding ``dequantize(weight)``; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, MXFP4Linear):
            continue
        try:
            # a plain model again: trainable like any nn.Linear
            linear = module.to_linear(dtype or (module.bias.dtype if module.bias is not None else torch.bfloat16))
        except RuntimeError as error:
            raise RuntimeError(f"{name}: {error}") from None
        _set_submodule(model, name, linear)
        count += 1
    return count


# --------------------------------------------------------------------------- loading


class QuantizeOnLoad(ConversionOps):
    """transformers' load-time op: a float ``<module>.weight`` becomes ``weight`` + ``weight_scale``.

    It runs on the tensor as transformers placed it (the device_map's device),
    so on CUDA the Triton quantize kernel does the work.
    """

    def __init__(self, hf_quantizer: Any) -> None:
        # transformers looks for `hf_quantizer` on an op to tell load ops from others.
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        config = self.hf_quantizer.quantization_config
        converted = {}
        for name, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            module_name, _, tensor_name = name.rpartition(".")
            module = model.get_submodule(module_name) if model is not None else None
            if experts.awaits_quantization(module, tensor_name):  # fused experts [E, N, K], already merged
                if getattr(module, "is_transposed", False):  # GPT-OSS's [E, K, N]: blocks along K all the same
                    tensor = tensor.transpose(-1, -2).contiguous()
                packed, scales = quantize_mxfp4(
                    tensor, block_size=config.block_size, scale_method=config.scale_method, name=name
                )
                converted[name] = packed
                converted[name + experts.SCALE_SUFFIX] = scales
                continue
            if tensor_name != "weight" or not awaits_quantization(module):
                converted[name] = tensor
                continue
            if module.source_transposed:  # a Conv1D's [in, out] weight
                tensor = tensor.t().contiguous()
            packed, scales = quantize_mxfp4(
                tensor, block_size=config.block_size, scale_method=config.scale_method, name=module_name
            )
            use_packed_placeholder(module)
            converted[name] = packed
            converted[f"{module_name}.weight_scale"] = scales
        return converted


def hub_id_or_none(name_or_path: str | os.PathLike | None) -> str | None:
    """``name_or_path`` when it names a Hub repository (``org/name``), None for a local folder."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name
