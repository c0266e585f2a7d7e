"""MXFP4Linear: a Linear layer whose weight lives as packed MXFP4 bytes.

The module owns three tensors, named as in the checkpoint:
``weight`` (uint8 ``[out, in/2]``, two E2M1 codes a byte), ``weight_scale``
(uint8 ``[out, in/block_size]``, UE8M0) and ``bias`` (as the original layer).
The uint8 tensors are ``nn.Parameter(requires_grad=False)`` rather than
buffers: accelerate offloads parameters with ``device_map`` splits, while
buffers of offloaded modules are pinned to the execution device, which would
put every packed weight back on the GPU.

This file knows nothing about transformers; module replacement and loading live
in ``replace.py``. It must never hold a dequantized weight between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from qwantize_hf.constants import DEFAULT_BLOCK_SIZE, F4_CODES_PER_BYTE
from qwantize_hf.format import check_block_size
from qwantize_hf.linear_op import mxfp4_linear
from qwantize_hf.methods import DEFAULT_SCALE_METHOD
from qwantize_hf.ops import dequantize_mxfp4, quantize_mxfp4


class MXFP4Linear(nn.Module):
    """``y = x @ dequantize(weight, weight_scale).T + bias``; output dtype = input dtype."""

    # The float weight this layer replaces is stored [in, out] (GPT-2's Conv1D), so a loader
    # transposes it before quantizing; the MXFP4 tensors are in the Linear layout either way.
    source_transposed = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_block_size(block_size)
        if in_features % block_size:
            raise ValueError(
                f"in_features {in_features} is not a multiple of block_size {block_size}; "
                "MXFP4 blocks run along the input dimension, so keep this layer as nn.Linear"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        packed_shape = (out_features, in_features // F4_CODES_PER_BYTE)
        scales_shape = (out_features, in_features // block_size)
        self.weight = nn.Parameter(torch.zeros(packed_shape, dtype=torch.uint8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.zeros(scales_shape, dtype=torch.uint8, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._float_dtype = bias_dtype

    @property
    def float_dtype(self) -> torch.dtype:
        """The float dtype the layer stands for (its bias's; else the dtype of the weight it replaced)."""
        return self.bias.dtype if self.bias is not None else self._float_dtype

    @classmethod
    def like(cls, linear: nn.Linear, *, block_size: int, device: torch.device | str) -> MXFP4Linear:
        """An MXFP4Linear of ``linear``'s shape and bias dtype on ``device``, its tensors not yet filled."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            block_size=block_size,
            bias_dtype=linear.weight.dtype,
            device=device,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scale_method: str = DEFAULT_SCALE_METHOD,
        name: str = "linear",
    ) -> MXFP4Linear:
        """Quantize an existing ``nn.Linear`` (on its own device) into a new MXFP4Linear."""
        module = cls.like(linear, block_size=block_size, device=linear.weight.device)
        packed, scales = quantize_mxfp4(
            linear.weight.detach(), block_size=block_size, scale_method=scale_method, name=name
        )
        module.weight.data = packed
        module.weight_scale.data = scales
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight ``[out, in]`` the layer multiplies by, as ``dtype``."""
        return dequantize_mxfp4(self.weight, self.weight_scale, block_size=self.block_size, dtype=dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new ``nn.Linear`` on this layer's device holding ``dequantize(weight)`` (and a copy of the bias) as
        ``dtype`` (default ``float_dtype``): the float layer this one stands for, trainable like any other."""
        if self.weight.device.type == "meta":
            raise RuntimeError(
                "this MXFP4Linear is offloaded (its weight is on the meta device), so it cannot be dequantized "
                "in place; load with device_map on a single device (e.g. 'cpu' or 'cuda') to dequantize"
            )
        dtype = dtype or self.float_dtype
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(self.dequantized_weight(dtype))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The custom op: the fused Triton kernel for CUDA bf16/fp16 decode-sized
        # inputs, dequantize + F.linear otherwise (see qwantize_hf/linear_op.py).
        return mxfp4_linear(x, self.weight, self.weight_scale, self.bias, self.block_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}"
        )
