"""Where the kernels may run: Triton's presence, its interpreter, a device's compute capability,
the inline-PTX switch, and the choice between the Triton and torch backends.

The tensor ops (``ops.py``) and every kernel module (``kernels/``) ask here; this module
imports nothing of the package, so it sits below both and no import circle can form. It
reads the environment on every call (``TRITON_INTERPRET``, ``QWANTIZE_HF_NO_INLINE_PTX``,
``QWANTIZE_HF_DEQUANTIZE_BATCHES``),
so kernels that ask per launch see a switch changed after import.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (kernels on CPU tensors, no PTX)."""
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
    if interpreting() or torch.version.hip is not None:
        return False
    return os.environ.get("QWANTIZE_HF_NO_INLINE_PTX", "0") != "1"


def batch_kernels_enabled() -> bool:
    """False when QWANTIZE_HF_DEQUANTIZE_BATCHES=1: above 16 rows of activations the matmul then always
    dequantizes and multiplies by cuBLAS (nothing compiled or timed on a first call, the same rounding in
    every process), instead of timing the fused batch and prefill kernels against that."""
    return os.environ.get("QWANTIZE_HF_DEQUANTIZE_BATCHES", "0") != "1"


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
    usable = triton_available() and (tensor.is_cuda or interpreting())
    if backend == "triton" and not usable:
        why = "Triton is not installed" if not triton_available() else f"the tensor is on {tensor.device}"
        raise RuntimeError(
            f"backend='triton' cannot run here: {why}. Use a CUDA tensor with Triton installed, "
            "set TRITON_INTERPRET=1 to run the kernels on the CPU (slow), or pass backend='torch'"
        )
    if backend == "auto":
        return "triton" if usable and tensor.is_cuda else "torch"
    return backend
