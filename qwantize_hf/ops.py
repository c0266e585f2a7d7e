"""The public quantize/dequantize functions: checks, then the Triton kernel or the torch twin.

Every check on user input lives here, once, so both backends see the same
validated, contiguous tensors. A block holding NaN or Inf gets scale byte 255
from either backend, and this module turns that into an error: such a weight
never leaves here looking like a valid quantized tensor. Which backend runs is
``qwantize_hf.backend``'s call; the kernels never import this module.
"""

from __future__ import annotations

import functools

import torch

from qwantize_hf.backend import resolve_backend
from qwantize_hf.constants import (
    DEFAULT_BLOCK_SIZE,
    E8M0_BIAS,
    E8M0_MAX_QUANTIZE,
    E8M0_MIN,
    E8M0_NAN,
    F4_CODES_PER_BYTE,
)
from qwantize_hf.format import (
    SUPPORTED_DTYPES,
    check_block_size,
    check_scale_method,
    check_weight,
    dequantize_blocks_torch,
    normalize_mse_weights,
    quantize_blocks_torch,
)
from qwantize_hf.methods import DEFAULT_SCALE_METHOD, SCALE_METHODS


def _raise_on_nonfinite(scales: torch.Tensor, shape: torch.Size, block_size: int, name: str) -> None:
    bad = scales == E8M0_NAN
    if not bool(bad.any()):
        return
    first = tuple(int(i) for i in bad.nonzero()[0])
    start = first[-1] * block_size
    where = ", ".join(str(i) for i in first[:-1] + (f"{start}:{start + block_size}",))
    raise ValueError(
        f"{name} (shape {tuple(shape)}) holds NaN or Inf in {int(bad.sum())} block(s) of {block_size}, "
        f"first at [{where}]; MXFP4 cannot represent them. Fix or drop the weights, or keep this "
        "tensor unquantized (e.g. list its module in modules_to_not_convert)"
    )


def quantize_mxfp4(
    w: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale_method: str = DEFAULT_SCALE_METHOD,
    weights: torch.Tensor | None = None,
    backend: str = "auto",
    name: str = "w",
    max_byte: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` ([..., K], bf16/fp16/fp32) to MXFP4 along its last dimension.

    Returns ``(packed uint8 [..., K/2], scales uint8 [..., K/block_size])``.
    ``scale_method``: ``"naive"`` (OCP MX), ``"even"`` (torchao EVEN), or
    ``"mse"`` (least squared error; with ``weights``, a non-negative float
    tensor ``[K]``, each element's squared error is weighted by its input
    feature's weight). ``name`` is used in error messages. Every method keeps the
    scale byte at most ``max_byte``, by default ``format.max_scale_byte(w.dtype)``, so
    dequantizing in ``w``'s dtype never gives infinity (140 for float16, 252 otherwise);
    pass the byte of the dtype the result will be dequantized in when ``w`` is wider.
    """
    check_block_size(block_size)
    check_scale_method(scale_method)
    check_weight(w, block_size, name)
    if max_byte is not None and (
        isinstance(max_byte, bool) or not isinstance(max_byte, int) or not E8M0_MIN <= max_byte <= E8M0_MAX_QUANTIZE
    ):
        raise ValueError(f"max_byte must be an int in [{E8M0_MIN}, {E8M0_MAX_QUANTIZE}] or None, got {max_byte!r}")
    if weights is not None:
        if not SCALE_METHODS[scale_method].takes_weights:
            takers = " / ".join(repr(name) for name, method in SCALE_METHODS.items() if method.takes_weights)
            raise ValueError(f"weights only change the {takers} search; scale_method={scale_method!r} ignores them")
        weights = normalize_mse_weights(weights, w.shape[-1], w.device)
    chosen = resolve_backend(backend, w)
    w = w.contiguous()
    if chosen == "triton" and SCALE_METHODS[scale_method].kernel_id is not None:
        from qwantize_hf.kernels.quantize import quantize_triton

        packed, scales = quantize_triton(w, block_size, scale_method, weights, max_byte=max_byte)
    else:
        packed, scales = quantize_blocks_torch(w, block_size, scale_method, weights, max_byte)
    _raise_on_nonfinite(scales, w.shape, block_size, name)
    return packed, scales


def dequantize_mxfp4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Codes × 2**(e-127), as ``dtype`` ([..., K]); a block with scale byte 255 comes back NaN."""
    check_block_size(block_size)
    for tensor_name, tensor in (("packed", packed), ("scales", scales)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{tensor_name} must be a torch.uint8 tensor, got {got}")
        if tensor.ndim == 0:
            raise ValueError(f"{tensor_name} must have at least one dimension")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    k = packed.shape[-1] * F4_CODES_PER_BYTE
    if k % block_size or scales.shape != (*packed.shape[:-1], k // block_size):
        raise ValueError(
            f"packed {tuple(packed.shape)} holds rows of {k} elements, which need scales of shape "
            f"{(*packed.shape[:-1], k // block_size)} for block_size {block_size}; got {tuple(scales.shape)} "
            "(was it quantized with another block_size?)"
        )
    if scales.device != packed.device:
        raise ValueError(f"packed is on {packed.device} but scales is on {scales.device}")
    packed, scales = packed.contiguous(), scales.contiguous()
    if resolve_backend(backend, packed) == "triton":
        from qwantize_hf.kernels.dequantize import dequantize_triton

        return dequantize_triton(packed, scales, block_size, dtype)
    return dequantize_blocks_lut(packed, scales, block_size, dtype)


@functools.cache
def _lut_tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values of the two codes of every byte ``[256, 2]``, value of every scale byte ``[256]``) in
    ``dtype``: the twin's own numbers (every one exact in bfloat16 and float32), looked up per byte."""
    every_byte = torch.arange(256, dtype=torch.uint8)
    pairs = dequantize_blocks_torch(every_byte[:, None], torch.full((256, 1), E8M0_BIAS, dtype=torch.uint8), 2,
                                    torch.float32)  # fmt: skip  (scale 2**0: the codes' own values)
    ones = torch.zeros(256, 1, dtype=torch.uint8) | 0x22  # codes 2, 2: value 1.0
    scale_values = dequantize_blocks_torch(ones, every_byte[:, None], 2, torch.float32)[:, 0]
    return pairs.to(device=device, dtype=dtype), scale_values.to(device=device, dtype=dtype)


def dequantize_blocks_lut(
    packed: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``dequantize_blocks_torch``'s numbers (NaN wherever it gives NaN) from two table lookups and one
    product, several times faster on a CPU. Each byte's two values are looked up as one integer twice
    their width (``index_select`` with int32 indices, not advanced indexing with int64 ones). In
    bfloat16 the product of a code value and a power-of-two scale is exact, as in float32; other
    dtypes multiply in float32 and cast, as the twin does."""
    compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    pairs, scale_values = _lut_tables(compute, packed.device)
    pair_type = torch.int32 if compute == torch.bfloat16 else torch.int64  # two values as one integer
    values = torch.index_select(pairs.view(pair_type).view(-1), 0, packed.reshape(-1).to(torch.int32))
    values = values.view(compute).view(-1, block_size)
    block_scales = torch.index_select(scale_values, 0, scales.reshape(-1).to(torch.int32))
    out = values * block_scales.view(-1, 1)
    return out.view(*packed.shape[:-1], packed.shape[-1] * F4_CODES_PER_BYTE).to(dtype)
