"""The custom op: ``mxfp4_linear``, ``x @ dequant(packed, scales).T + bias`` as one ``torch.library`` op.

It sits above the kernels and ``ops.py`` and below the modules (``linear.py``), which call it.
The op ``qwantize_hf::mxfp4_linear(x, packed, scales, bias, block_size)`` has

- a fake (meta) implementation, so ``torch.compile`` traces through it without
  graph breaks and CUDA graphs capture it as one opaque call;
- a CUDA implementation for bf16/fp16 activations: the dispatch
  (``qwantize_hf.kernels.matmul_dispatch``), whose fused Triton kernels never write the
  dequantized weight to memory; above 16 rows dequantize + cuBLAS competes with them;
- a CPU implementation (also the CUDA one for float32 activations):
  ``dequantize_mxfp4`` + ``F.linear`` in the input dtype, the kernel's torch twin;
- autograd for the input and the bias (``grad_y @ W``, the weight dequantized again in the
  gradient's dtype, never kept): the weight is frozen, its codes and scales are integers.

Every check on user input happens in ``check_mxfp4_linear_args``, which the fake
implementation runs too, so a bad shape fails at trace time with the same message.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwantize_hf.constants import DEFAULT_BLOCK_SIZE, F4_CODES_PER_BYTE
from qwantize_hf.format import check_block_size
from qwantize_hf.ops import dequantize_mxfp4

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_mxfp4_linear_args(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> None:
    """Raise a ValueError/TypeError naming the bad argument and the fix; return None when all is well."""
    check_block_size(block_size)
    if x.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"mxfp4_linear: x must be one of {_ACTIVATION_DTYPES}, got {x.dtype}")
    for name, tensor in (("packed", packed), ("scales", scales)):
        if tensor.dtype != torch.uint8 or tensor.ndim < 2:
            raise TypeError(
                f"mxfp4_linear: {name} must be a torch.uint8 tensor of at least 2 dimensions ([..., N, K/2] "
                f"and [..., N, K/block_size]), got {tensor.dtype} of shape {tuple(tensor.shape)} "
                "(quantize the [..., out, in] weight with quantize_mxfp4)"
            )
    *batch, n, half_k = packed.shape
    batch = tuple(batch)
    k = half_k * F4_CODES_PER_BYTE
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(
            f"mxfp4_linear: x has {x.shape[-1] if x.ndim else 0} input features but packed {tuple(packed.shape)} "
            f"holds rows of {k}; pass x of shape [..., {k}]"
        )
    if batch and (x.ndim != packed.ndim or tuple(x.shape[:-2]) != batch):
        raise ValueError(
            f"mxfp4_linear: packed {tuple(packed.shape)} holds {batch} weights of [{n}, {k}], so x must have "
            f"shape [{', '.join(map(str, batch))}, rows, {k}] (one matrix of rows per weight); got {tuple(x.shape)}"
        )
    if tuple(scales.shape) != (*batch, n, k // block_size):
        raise ValueError(
            f"mxfp4_linear: scales must have shape {(*batch, n, k // block_size)} for packed {tuple(packed.shape)} "
            f"and block_size {block_size}, got {tuple(scales.shape)} (was it quantized with another block_size?)"
        )
    if bias is not None and tuple(bias.shape) != (*batch, n):
        raise ValueError(f"mxfp4_linear: bias must have shape {(*batch, n)}, got {tuple(bias.shape)}")
    for name, tensor in (("packed", packed), ("scales", scales), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"mxfp4_linear: x is on {x.device} but {name} is on {tensor.device}; move both to one")


def _reference(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    if packed.ndim > 2:
        # each weight's F.linear on its own rows, so a stack rounds exactly as its weights alone do
        return _each_weight(_reference, x, packed, scales, bias, block_size)
    weight = dequantize_mxfp4(packed, scales, block_size=block_size, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _each_weight(
    one: Callable[..., torch.Tensor],
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """``one(x[b], packed[b], scales[b], bias[b], block_size)`` for every weight ``b`` of a stack, stacked."""
    n = packed.shape[-2]
    count = packed.shape[:-2].numel()
    flat_x = x.reshape(count, *x.shape[-2:])
    flat_packed, flat_scales = packed.reshape(count, *packed.shape[-2:]), scales.reshape(count, *scales.shape[-2:])
    flat_bias = None if bias is None else bias.reshape(count, n)
    outs = [
        one(flat_x[i], flat_packed[i], flat_scales[i], None if flat_bias is None else flat_bias[i], block_size)
        for i in range(count)
    ]
    return torch.stack(outs).reshape(*x.shape[:-1], n) if outs else x.new_empty(*x.shape[:-1], n)


def _mxfp4_linear_default(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    check_mxfp4_linear_args(x, packed, scales, bias, block_size)
    return _reference(x, packed, scales, bias, block_size)


@torch.library.custom_op("qwantize_hf::mxfp4_linear", mutates_args=())
def _mxfp4_linear_op(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    return _mxfp4_linear_default(x, packed, scales, bias, block_size)


@_mxfp4_linear_op.register_kernel("cuda")
def _mxfp4_linear_cuda(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    check_mxfp4_linear_args(x, packed, scales, bias, block_size)
    if x.dtype not in _KERNEL_DTYPES:
        # float32 activations would run the kernel's dot in tf32; the twin keeps them exact.
        return _reference(x, packed, scales, bias, block_size)
    # Every M takes the dispatch, whose candidates above 16 rows include dequantize + cuBLAS
    # (what wins where the product is compute-bound: eval/results/bench_matmul_h100.md).
    if packed.ndim > 2:
        return _each_weight(_fused, x, packed, scales, bias, block_size)  # one fused call per weight
    return _fused(x, packed, scales, bias, block_size)


def _fused(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    """The fused kernel on ``x [..., K]`` and one weight ``packed [N, K/2]``."""
    from qwantize_hf.kernels.matmul_dispatch import mxfp4_matmul_triton

    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = mxfp4_matmul_triton(x2d, packed.contiguous(), scales.contiguous(), bias, block_size)
    return out.reshape(*lead, packed.shape[0])


@torch.library.custom_op("qwantize_hf::mxfp4_linear_grad_input", mutates_args=())
def _grad_input_op(grad: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """``grad [..., N] @ W`` for ``W [N, K]`` (one weight of a stack per matrix of rows), the weight
    dequantized in the gradient's dtype: the transposed product, an op of its own so that a compiled
    backward traces it as one call."""
    weight = dequantize_mxfp4(packed, scales, block_size=block_size, dtype=grad.dtype)
    return torch.matmul(grad, weight)


@_grad_input_op.register_fake
def _grad_input_fake(grad: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    return grad.new_empty(*grad.shape[:-1], packed.shape[-1] * F4_CODES_PER_BYTE)


def _setup_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, packed, scales, bias, block_size = inputs
    ctx.save_for_backward(packed, scales)
    ctx.block_size = block_size


def _backward(ctx, grad: torch.Tensor):
    """The input's gradient ``grad @ W`` (the weight dequantized in the gradient's dtype, one weight of a
    stack per matrix of rows) and the bias's; the codes and scales are integers and never get one."""
    packed, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qwantize_hf.mxfp4_linear_grad_input(grad, packed, scales, ctx.block_size)
    if ctx.needs_input_grad[3]:
        stacked = packed.ndim > 2
        grad_bias = grad.sum(dim=-2) if stacked else grad.reshape(-1, grad.shape[-1]).sum(dim=0)
    return grad_x, None, None, grad_bias, None


_mxfp4_linear_op.register_autograd(_backward, setup_context=_setup_backward)


@_mxfp4_linear_op.register_fake
def _mxfp4_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    check_mxfp4_linear_args(x, packed, scales, bias, block_size)
    return x.new_empty(*x.shape[:-1], packed.shape[-2])


def mxfp4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` for ``W`` stored as MXFP4 ``packed [N, K/2]``, ``scales [N, K/block_size]``.

    Output ``[..., N]`` in ``x.dtype``; accumulation in float32. A stack of weights (e.g. a
    mixture-of-experts layer's), ``packed [*B, N, K/2]`` with ``scales [*B, N, K/block_size]``
    and ``bias [*B, N]``, takes ``x [*B, M, K]`` and gives ``[*B, M, N]``: ``x[b] @ W[b].T``. On CUDA with bf16/fp16
    activations of at most 16 rows this is the fused Triton kernel; elsewhere it is
    ``dequantize_mxfp4`` + ``F.linear``. Works under ``torch.compile`` and CUDA graphs (a registered custom op).
    """
    if plain_eager_call(x, packed, scales, bias):
        # The op's own implementation, without the custom-op dispatcher's host time (about
        # 80 us a call on the H100 host, eval/kernels/bench_op_overhead.py): same code, same result.
        impl = _mxfp4_linear_cuda if x.device.type == "cuda" else _mxfp4_linear_default
        return impl(x, packed, scales, bias, block_size)
    return torch.ops.qwantize_hf.mxfp4_linear(x, packed, scales, bias, block_size)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when nothing needs the registered op: no compiler or tracer is watching, the
    inputs are ordinary CPU/CUDA tensors, and no gradient is wanted (the op's autograd gives it)."""
    if torch.compiler.is_compiling():
        return False
    if any(t is not None and type(t) not in _PLAIN_TYPES for t in (x, packed, scales, bias)):
        return False  # FX proxies, fake, functional or other subclass tensors (export, tracers)
    if x.device.type not in ("cpu", "cuda"):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
