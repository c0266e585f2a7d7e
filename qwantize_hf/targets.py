"""Which modules of a model, and which of their tensors, become MXFP4: the one place that says so.

Each ``WeightKind`` names a float module type, the MXFP4 module that replaces it, the
parameter that is quantized and the tensors the quantized module stores in a
checkpoint (``<module>.<name>``). ``replace.py``, ``calibration.py`` and the GPTQ
pipeline ask ``weight_kind(module)`` instead of testing types themselves. Today the
one kind is ``nn.Linear`` (weight ``[out, in]``, blocks along ``in``); GPT-2's Conv1D
(weight ``[in, out]``) and fused mixture-of-experts weights (``[E, N, K]``) are the
kinds to add here, each with its MXFP4 module.

The match is on the exact type: a subclass may carry a forward of its own that the
MXFP4 module would silently drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qwantize_hf.linear import MXFP4Linear


@dataclass(frozen=True)
class WeightKind:
    name: str
    float_module: type[nn.Module]
    mxfp4_module: type[nn.Module]
    quantized_parameter: str  # the float tensor that is quantized
    stored_tensors: tuple[str, ...]  # what the MXFP4 module saves: packed codes, then scales

    def reduction_size(self, module: nn.Module) -> int:
        """Length of the dimension the blocks run along (the product's reduction dimension)."""
        return module.in_features


LINEAR = WeightKind("linear", nn.Linear, MXFP4Linear, "weight", ("weight", "weight_scale"))
WEIGHT_KINDS = (LINEAR,)


def weight_kind(module: nn.Module) -> WeightKind | None:
    """The kind of a float module that MXFP4 can take, or None."""
    return next((kind for kind in WEIGHT_KINDS if type(module) is kind.float_module), None)


def mxfp4_kind(module: nn.Module) -> WeightKind | None:
    """The kind of an MXFP4 module, or None."""
    return next((kind for kind in WEIGHT_KINDS if isinstance(module, kind.mxfp4_module)), None)


__all__ = ["LINEAR", "WEIGHT_KINDS", "WeightKind", "mxfp4_kind", "weight_kind"]
