"""The public quantize/dequantize functions: checks, then the Triton kernel or the torch twin.

Every check on user input lives here, once, so both backends see the same
validated, contiguous tensors. A block holding NaN or Inf gets scale byte 255
from either backend, and this module turns that into an error: such a weight
never leaves here looking like a valid quantized tensor.
"""

from __future__ import annotations

import functools
import os

import torch

from qwantize_hf.constants import DEFAULT_BLOCK_SIZE, DEFAULT_SCALE_METHOD, E8M0_NAN, F4_CODES_PER_BYTE
from qwantize_hf.format import (
    SUPPORTED_DTYPES,
    check_block_size,
    check_scale_method,
    check_weight,
    dequantize_blocks_torch,
    normalize_mse_weights,
    quantize_blocks_torch,
)

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device; (0, 0) for any other device."""
    if device.type != "cuda":
        return (0, 0)
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def inline_ptx_enabled() -> bool:
    """Inline PTX in the kernels: off under the interpreter (it cannot run PTX), on ROCm builds
    of torch (AMD GPUs also show as "cuda" devices, and have no PTX) and with
    QWANTIZE_HF_NO_INLINE_PTX=1; the kernels then run plain-op versions of the same arithmetic."""
    if _interpreting() or torch.version.hip is not None:
        return False
    return os.environ.get("QWANTIZE_HF_NO_INLINE_PTX", "0") != "1"


def inline_ptx_allowed(device: torch.device, capability: tuple[int, int]) -> bool:
    """Whether a kernel launched for ``device`` may use inline PTX that needs ``capability``:
    ``inline_ptx_enabled`` and a CUDA device at least that new."""
    return inline_ptx_enabled() and device_capability(device) >= capability


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """'auto' → 'triton' for CUDA tensors when Triton is installed, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return backend
    usable = triton_available() and (tensor.is_cuda or _interpreting())
    if backend == "triton" and not usable:
        why = "Triton is not installed" if not triton_available() else f"the tensor is on {tensor.device}"
        raise RuntimeError(
            f"backend='triton' cannot run here: {why}. Use a CUDA tensor with Triton installed, "
            "set TRITON_INTERPRET=1 to run the kernels on the CPU (slow), or pass backend='torch'"
        )
    if backend == "auto":
        return "triton" if usable and tensor.is_cuda else "torch"
    return backend


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` ([..., K], bf16/fp16/fp32) to MXFP4 along its last dimension.

    Returns ``(packed uint8 [..., K/2], scales uint8 [..., K/block_size])``.
    ``scale_method``: ``"naive"`` (OCP MX), ``"even"`` (torchao EVEN), or
    ``"mse"`` (least squared error; with ``weights``, a non-negative float
    tensor ``[K]``, each element's squared error is weighted by its input
    feature's weight). ``name`` is used in error messages.
    """
    check_block_size(block_size)
    check_scale_method(scale_method)
    check_weight(w, block_size, name)
    if weights is not None:
        if scale_method != "mse":
            raise ValueError(f"weights only change the 'mse' search; scale_method={scale_method!r} ignores them")
        weights = normalize_mse_weights(weights, w.shape[-1], w.device)
    chosen = resolve_backend(backend, w)
    w = w.contiguous()
    if chosen == "triton":
        from qwantize_hf.kernels.quantize import quantize_triton

        packed, scales = quantize_triton(w, block_size, scale_method, weights)
    else:
        packed, scales = quantize_blocks_torch(w, block_size, scale_method, weights)
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
    return dequantize_blocks_torch(packed, scales, block_size, dtype)
