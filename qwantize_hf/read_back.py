"""The default's second pass: each float weight read back from the checkpoint the model was quantized
from as it loaded, and quantized again with its random-token statistics, over its own bytes.

``MXFP4Config()`` never holds the float model: every weight is quantized (plain ``mse``) as it loads,
the random tokens run through that quantized model, and only then does each float weight come back,
one tensor at a time, from the ``.safetensors`` files (``float_weight_reader``, which first checks that
the checkpoint is the one the load read) to be quantized with the statistics (``requantize_linears``).
quantizer.py decides when this runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qwantize_hf.linear import MXFP4Linear
from qwantize_hf.ops import quantize_mxfp4
from qwantize_hf.replace import offload_hook, store_offloaded


class FloatWeightsUnavailable(ValueError):
    """The float checkpoint cannot give back the weights the load quantized (why is the message)."""


def mxfp4_module_names(model: nn.Module) -> list[str]:
    """Names of the model's MXFP4Linear modules, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, MXFP4Linear)]


def float_weight_reader(
    checkpoint_files: Iterable[str] | None,
    model: nn.Module,
    names: Iterable[str],
    *,
    block_size: int,
    dtype: torch.dtype,
) -> Callable[[str], torch.Tensor]:
    """``name -> float weight`` of each named MXFP4Linear, read again from the float checkpoint it was
    quantized from as it loaded (plain ``mse``), one tensor at a time (each file is opened once and
    mapped; a tensor is read when it is asked for).

    Raises FloatWeightsUnavailable, saying why, unless every weight is in a ``.safetensors`` file
    under its module's name with its module's shape, and the first rows read back, cast to
    ``dtype`` (the load's) and quantized, give the bytes the module holds: a checkpoint that
    transformers renames, reshapes or converts on load cannot be read back this way."""
    from safetensors import safe_open

    files = [str(path) for path in checkpoint_files or ()]
    if not files:
        raise FloatWeightsUnavailable("the model did not come from checkpoint files")
    others = [path for path in files if not path.endswith(".safetensors")]
    if others:
        raise FloatWeightsUnavailable(f"{os.path.basename(others[0])} is not a .safetensors file")
    handles = [safe_open(path, framework="pt") for path in files]
    where = {key: handle for handle in handles for key in handle.keys()}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    keys: dict[str, str] = {}
    for name in names:
        key = f"{name}.weight"
        if key not in where and key.startswith(prefix) and key[len(prefix) :] in where:
            key = key[len(prefix) :]  # a checkpoint saved from the bare base model
        if key not in where:
            raise FloatWeightsUnavailable(f"the checkpoint has no tensor {name}.weight")
        module = model.get_submodule(name)
        stored = where[key].get_slice(key)
        shape = tuple(stored.get_shape())
        expected = (module.out_features, module.in_features)
        if module.source_transposed:
            expected = expected[::-1]  # a Conv1D's [in, out]
        if shape != expected:
            raise FloatWeightsUnavailable(f"the checkpoint's {key} has shape {shape}, not {name}'s {expected}")
        head = stored[:, :_CHECKED_ROWS].t() if module.source_transposed else stored[:_CHECKED_ROWS]
        head = head.to(dtype).contiguous()
        packed, scales = _held_bytes(module)
        rows = head.shape[0]
        again = quantize_mxfp4(
            head.to(packed.device), block_size=block_size, scale_method="mse", name=name + READ_BACK
        )
        if not (torch.equal(again[0], packed[:rows]) and torch.equal(again[1], scales[:rows])):
            raise FloatWeightsUnavailable(f"the checkpoint's {key} is not the weight {name} was loaded with")
        keys[name] = key

    def read(name: str) -> torch.Tensor:
        tensor = where[keys[name]].get_tensor(keys[name])
        return tensor.t().contiguous() if model.get_submodule(name).source_transposed else tensor

    return read


_CHECKED_ROWS = 64  # rows of each weight read back and checked against the bytes it loaded as
READ_BACK = " (read back)"  # the name those rows are quantized under (errors, and tests, tell them apart)


def _held_bytes(module: MXFP4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scales) of an MXFP4Linear, from accelerate's weights_map when they are offloaded."""
    offload = offload_hook(module)
    if offload is not None:
        return offload.weights_map["weight"], offload.weights_map["weight_scale"]
    return module.weight, module.weight_scale


def requantize_linears(
    model: nn.Module,
    weights_by_name: dict[str, torch.Tensor],
    read_weight: Callable[[str], torch.Tensor],
    *,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    """Quantize each named MXFP4Linear's float weight again (``read_weight(name)``, cast to ``dtype``, the
    load's) with ``weights=weights_by_name[name]`` (mse), writing the new bytes over its own in place."""
    for name, per_feature in weights_by_name.items():
        module = model.get_submodule(name)
        offload = offload_hook(module)
        # where the load quantized it: an offloaded weight in CPU memory, the others on their device
        device = torch.device("cpu") if offload is not None else module.weight.device
        weight = read_weight(name).to(device=device, dtype=dtype)
        packed, scales = quantize_mxfp4(
            weight, block_size=block_size, scale_method="mse", weights=per_feature, name=name
        )
        del weight
        if offload is not None:
            store_offloaded(offload.weights_map, "weight", packed.cpu())
            store_offloaded(offload.weights_map, "weight_scale", scales.cpu())
        else:
            module.weight.data.copy_(packed)
            module.weight_scale.data.copy_(scales)


__all__ = ["READ_BACK", "FloatWeightsUnavailable", "float_weight_reader", "mxfp4_module_names", "requantize_linears"]
