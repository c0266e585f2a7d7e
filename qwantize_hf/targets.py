"""Which modules of a model, and which of their tensors, become MXFP4: the one place that says so.

Each ``WeightKind`` names a float module type, the MXFP4 module that replaces it, the
parameter that is quantized and the tensors the quantized module stores in a
checkpoint (``<module>.<name>``). ``replace.py``, ``calibration.py`` and the GPTQ
pipeline ask ``weight_kind(module)`` instead of testing types themselves. The kinds:
``nn.Linear`` (weight ``[out, in]``, blocks along ``in``) and GPT-2's ``Conv1D`` (weight
``[in, out]``, ``y = x @ W + b``: the same product with the weight transposed), both stored as
an ``MXFP4Linear`` in the Linear layout (codes ``[out, in/2]``, scales ``[out, in/32]``); fused
mixture-of-experts weights (``[E, N, K]``) are the kind to add next.

The match is on the exact type: a subclass may carry a forward of its own that the
MXFP4 module would silently drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qwantize_hf.linear import MXFP4Linear


@dataclass(frozen=True)
class WeightKind:
    name: str
    float_module: type[nn.Module]
    mxfp4_module: type[nn.Module]
    quantized_parameter: str  # the float tensor that is quantized
    stored_tensors: tuple[str, ...]  # what the MXFP4 module saves: packed codes, then scales
    transposed: bool = False  # the float weight is stored [in, out] (Conv1D), not [out, in]

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(out_features, in_features)`` of the product, from the float weight's shape."""
        rows, columns = getattr(module, self.quantized_parameter).shape
        return (columns, rows) if self.transposed else (rows, columns)

    def reduction_size(self, module: nn.Module) -> int:
        """Length of the dimension the blocks run along (the product's reduction dimension)."""
        return self.shape(module)[1]

    def linear_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """The float weight as ``[out, in]`` (a view), the layout MXFP4 quantizes; its own inverse."""
        return weight.t() if self.transposed else weight


LINEAR = WeightKind("linear", nn.Linear, MXFP4Linear, "weight", ("weight", "weight_scale"))
CONV1D = WeightKind("conv1d", Conv1D, MXFP4Linear, "weight", ("weight", "weight_scale"), transposed=True)
WEIGHT_KINDS = (LINEAR, CONV1D)


def weight_kind(module: nn.Module) -> WeightKind | None:
    """The kind of a float module that MXFP4 can take, or None."""
    return next((kind for kind in WEIGHT_KINDS if type(module) is kind.float_module), None)


def mxfp4_kind(module: nn.Module) -> WeightKind | None:
    """The kind of an MXFP4 module (its layout's: the Linear one for every kind today), or None."""
    return next((kind for kind in WEIGHT_KINDS if isinstance(module, kind.mxfp4_module)), None)


def mxfp4_module_like(module: nn.Module, *, block_size: int, device: torch.device | str) -> MXFP4Linear:
    """An MXFP4Linear standing for the float ``module`` (a Linear or a Conv1D), its tensors not yet
    filled; ``source_transposed`` tells the loaders that the float weight it replaces is ``[in, out]``."""
    kind = weight_kind(module)
    if kind is None:
        raise TypeError(f"a {type(module).__name__} has no MXFP4 kind")
    out_features, in_features = kind.shape(module)
    weight = getattr(module, kind.quantized_parameter)
    replacement = MXFP4Linear(
        in_features, out_features, module.bias is not None, block_size=block_size, bias_dtype=weight.dtype,
        device=device,
    )  # fmt: skip
    replacement.source_transposed = kind.transposed
    return replacement


__all__ = ["CONV1D", "LINEAR", "WEIGHT_KINDS", "WeightKind", "mxfp4_kind", "mxfp4_module_like", "weight_kind"]
