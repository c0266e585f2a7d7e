"""What quantization did to each Linear: weight error, scale choices, bits a weight as stored.

``layer_stats`` compares an ``MXFP4Linear``'s stored weight with the float
weight it was quantized from (relative error, and how many blocks took the
naive scale byte e0, one below or one above); ``storage_bits_per_weight``
counts the bits a checkpoint of the model stores. Read-only: nothing here
quantizes or changes a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BF16_BITS = 16  # what every unquantized tensor costs a weight in the checkpoint


@dataclass
class LayerStats:
    """How one quantized Linear's weight compares with the unquantized one."""

    squared_error: float  # ||W - W_hat||^2
    squared_norm: float  # ||W||^2
    blocks: int
    scale_offsets: dict[str, int]  # blocks whose scale byte is e0-1 / e0 / e0+1 / anything else

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm else 0.0


def naive_bytes_of(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """e0 of every block of ``weight`` (the naive OCP byte), the reference the offsets are counted from."""
    from qwantize_hf.format import block_amax_bits, naive_scale_bytes

    return naive_scale_bytes(block_amax_bits(weight, block_size))


def layer_stats(reference: torch.Tensor, module: nn.Module) -> LayerStats:
    """Compare an MXFP4Linear's stored weight with the float weight it was quantized from."""
    weight = reference.to(module.weight.device, torch.float32)
    dequantized = module.dequantized_weight(torch.float32)
    offsets = module.weight_scale.reshape(-1).to(torch.int32) - naive_bytes_of(weight, module.block_size)
    counts = {name: int((offsets == value).sum()) for name, value in (("e0-1", -1), ("e0", 0), ("e0+1", 1))}
    counts["other"] = offsets.numel() - sum(counts.values())
    return LayerStats(
        squared_error=float((weight - dequantized).double().square().sum()),
        squared_norm=float(weight.double().square().sum()),
        blocks=offsets.numel(),
        scale_offsets=counts,
    )


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    from qwantize_hf.linear import MXFP4Linear

    return {name: module for name, module in model.named_modules() if isinstance(module, MXFP4Linear)}


def storage_bits_per_weight(model: nn.Module) -> tuple[float, float]:
    """(bits per weight of the quantized Linears, bits per weight of the whole model) as saved.

    Quantized Linears are measured from the uint8 tensors held (a packed byte
    holds two weights; scales add their bytes); every other tensor counts as
    bf16, as the checkpoint stores it, whatever dtype it is computed in. Tied
    tensors count once.
    """
    quantized = quantized_modules(model)
    packed_ids = {id(m.weight) for m in quantized.values()}
    scale_ids = {id(m.weight_scale) for m in quantized.values()}
    total_bits = total_weights = quantized_bits = quantized_weights = 0
    for tensor in model.parameters():
        bits = tensor.numel() * (tensor.element_size() * 8 if tensor.dtype == torch.uint8 else BF16_BITS)
        if id(tensor) in packed_ids:
            weights = tensor.numel() * 2
            quantized_bits += bits
            quantized_weights += weights
        elif id(tensor) in scale_ids:
            weights = 0
            quantized_bits += bits
        else:
            weights = tensor.numel()
        total_bits += bits
        total_weights += weights
    layer_bits = quantized_bits / quantized_weights if quantized_weights else float(total_bits / total_weights)
    return layer_bits, total_bits / total_weights
