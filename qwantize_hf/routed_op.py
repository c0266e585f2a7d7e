"""The routed custom op for mixture-of-experts decode: ``mxfp4_linear_routed``, each row of x times its
own expert's MXFP4 weight, in one call that reads the routed experts' bytes where they lie.

``qwantize_hf::mxfp4_linear_routed(x [P, K], experts [P], packed [E, N, K/2], scales [E, N, K/bs],
bias [E, N] | None, block_size) -> [P, N]`` has, like ``mxfp4_linear``:

- a fake implementation (``torch.compile(fullgraph=True)`` and CUDA graphs take it as one call);
- a CUDA implementation for bf16/fp16 x with K a multiple of 32: a few pairs (``gemv_pairs``) run the
  routed CUDA-core kernel (``kernels.matmul_routed``: each pair reads its expert's bytes), more the grouped
  tensor-core kernel (``kernels.matmul_grouped``: pairs sorted by expert, each expert read once per row
  tile of its pairs); other x the torch twin;
- a CPU implementation, the torch twin (``routed_reference``: each pair's expert dequantized and
  ``F.linear``);
- autograd for x and the bias (the codes and scales are frozen integers).

Expert ids are not checked against E on the device (a host sync per call); the experts forward passes
ids it clamped itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwantize_hf.constants import DEFAULT_BLOCK_SIZE, F4_CODES_PER_BYTE
from qwantize_hf.linear_op import check_mxfp4_linear_args, plain_eager_call
from qwantize_hf.ops import dequantize_mxfp4

# K a multiple of this for the routed kernel (its CUDA-core body reads K in groups of 32 codes)
_KERNEL_K_MULTIPLE = 32
# Up to this many pairs, and at most GEMV_PAIRS_PER_EXPERT pairs an expert on average, the routed CUDA-core
# kernel runs (one expert's bytes read per pair: decode, where most experts get one pair); above, the grouped
# kernel, which reads each expert's bytes once per row tile of its pairs. eval/bench_moe.py times both.
GEMV_MAX_PAIRS = 256
GEMV_PAIRS_PER_EXPERT = 2


def gemv_pairs(experts: int) -> int:
    """Pairs up to which the CUDA implementation runs the routed CUDA-core kernel, for a stack of ``experts``."""
    return min(GEMV_MAX_PAIRS, GEMV_PAIRS_PER_EXPERT * experts)


def routed_fits(dtype: torch.dtype, k: int) -> bool:
    """Whether the routed kernel takes x of this dtype and reduction length (bf16 or fp16, K a multiple of
    32); else the torch twin runs."""
    return dtype in (torch.bfloat16, torch.float16) and k % _KERNEL_K_MULTIPLE == 0


def routed_reference(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """The torch twin: each pair's expert dequantized in x's dtype and ``F.linear`` on its row (the expert
    picked by indexing with the id tensor: no host synchronisation)."""
    rows = []
    for pair in range(x.shape[0]):
        expert = experts[pair : pair + 1]  # a 1-element tensor: index_select reads it on the device
        weight = dequantize_mxfp4(
            packed.index_select(0, expert)[0], scales.index_select(0, expert)[0], block_size=block_size, dtype=x.dtype
        )
        row_bias = None if bias is None else bias.index_select(0, expert)[0].to(x.dtype)
        rows.append(F.linear(x[pair : pair + 1], weight, row_bias))
    return torch.cat(rows) if rows else x.new_empty(0, packed.shape[1])


def check_routed_args(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> None:
    """Raise naming the bad argument: x ``[P, K]``, experts ``[P]`` integers, a stack of 3-D weights."""
    if packed.ndim != 3 or packed.shape[0] == 0:
        raise ValueError(
            f"mxfp4_linear_routed: packed must be a stack of expert weights [E, N, K/2], got {tuple(packed.shape)}"
        )
    if x.ndim != 2 or experts.ndim != 1 or experts.shape[0] != x.shape[0]:
        raise ValueError(
            f"mxfp4_linear_routed: x must be [pairs, K] and experts [pairs], got {tuple(x.shape)} and "
            f"{tuple(experts.shape)}"
        )
    if experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"mxfp4_linear_routed: experts must be int32 or int64 expert ids, got {experts.dtype}")
    if experts.device != x.device:
        raise ValueError(
            f"mxfp4_linear_routed: x is on {x.device} but experts is on {experts.device}; move both to one"
        )
    try:  # one expert's weight, for the shared checks of x, codes, scales and bias
        check_mxfp4_linear_args(x, packed[0], scales[0], None if bias is None else bias[0], block_size)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("mxfp4_linear:", "mxfp4_linear_routed (one expert's weight):")) from None
    if tuple(scales.shape[:1]) != tuple(packed.shape[:1]) or (bias is not None and bias.shape[0] != packed.shape[0]):
        raise ValueError(
            f"mxfp4_linear_routed: packed {tuple(packed.shape)}, scales {tuple(scales.shape)} and bias "
            f"{None if bias is None else tuple(bias.shape)} must hold the same number of experts"
        )


def _routed_default(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    check_routed_args(x, experts, packed, scales, bias, block_size)
    return routed_reference(x, experts, packed, scales, bias, block_size)


@torch.library.custom_op("qwantize_hf::mxfp4_linear_routed", mutates_args=())
def _routed_op(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    return _routed_default(x, experts, packed, scales, bias, block_size)


@_routed_op.register_kernel("cuda")
def _routed_cuda(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    check_routed_args(x, experts, packed, scales, bias, block_size)
    if not routed_fits(x.dtype, x.shape[-1]):
        return routed_reference(x, experts, packed, scales, bias, block_size)
    # Triton imported where a GPU kernel runs; it launches on the current device, so make it x's.
    with torch.cuda.device(x.device):
        if x.shape[0] > gemv_pairs(packed.shape[0]):
            from qwantize_hf.kernels.matmul_grouped import grouped_matmul

            return grouped_matmul(x, experts, packed, scales, bias, block_size)
        from qwantize_hf.kernels.matmul_routed import routed_gemv

        return routed_gemv(x, experts, packed, scales, bias, block_size)


@_routed_op.register_fake
def _routed_fake(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    check_routed_args(x, experts, packed, scales, bias, block_size)
    return x.new_empty(x.shape[0], packed.shape[1])


# pairs whose experts the backward dequantizes at once (their weights in the gradient's dtype are held together)
_BACKWARD_PAIRS = 16


@torch.library.custom_op("qwantize_hf::mxfp4_linear_routed_grad_input", mutates_args=())
def _grad_input_op(
    grad: torch.Tensor, experts: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``grad[p] @ W[experts[p]]``: the pairs' experts dequantized in the gradient's dtype, _BACKWARD_PAIRS at a
    time; an op of its own, so that a compiled backward traces it as one call."""
    rows = []
    for first in range(0, grad.shape[0], _BACKWARD_PAIRS):
        ids = experts[first : first + _BACKWARD_PAIRS]
        weights = dequantize_mxfp4(packed[ids], scales[ids], block_size=block_size, dtype=grad.dtype)
        rows.append(torch.bmm(grad[first : first + _BACKWARD_PAIRS, None, :], weights)[:, 0, :])
    return torch.cat(rows) if rows else grad.new_empty(0, packed.shape[-1] * F4_CODES_PER_BYTE)


@_grad_input_op.register_fake
def _grad_input_fake(
    grad: torch.Tensor, experts: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, block_size: int
) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], packed.shape[-1] * F4_CODES_PER_BYTE)


def _setup_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, experts, packed, scales, bias, block_size = inputs
    ctx.save_for_backward(experts, packed, scales)
    ctx.block_size = block_size
    ctx.bias = None if bias is None else (bias.shape, bias.dtype)


def _backward(ctx, grad: torch.Tensor):
    """``grad[p] @ W[experts[p]]`` for x (the pairs' experts dequantized in the gradient's dtype, 16 pairs at a
    time, so as many weights at most are held), and the bias's gradient summed per expert in float32."""
    experts, packed, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qwantize_hf.mxfp4_linear_routed_grad_input(grad, experts, packed, scales, ctx.block_size)
    if ctx.needs_input_grad[4]:
        shape, dtype = ctx.bias
        summed = torch.zeros(shape, dtype=torch.float32, device=grad.device).index_add_(0, experts, grad.float())
        grad_bias = summed.to(dtype)
    return grad_x, None, None, None, grad_bias, None


_routed_op.register_autograd(_backward, setup_context=_setup_backward)


def mxfp4_linear_routed(
    x: torch.Tensor,
    experts: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """``out[p] = x[p] @ W[experts[p]].T + bias[experts[p]]`` for a stack of MXFP4 expert weights
    ``packed [E, N, K/2]``, ``scales [E, N, K/block_size]`` (``bias [E, N]``): ``x [P, K]`` -> ``[P, N]``.
    On CUDA with bf16/fp16 x, one launch of the routed kernel (a few pairs) or the grouped kernel (more);
    elsewhere each pair's expert dequantized and ``F.linear``."""
    if plain_eager_call(x, packed, scales, bias):
        # the op's own implementation without the dispatcher's host time, as mxfp4_linear does
        impl = _routed_cuda if x.device.type == "cuda" else _routed_default
        return impl(x, experts, packed, scales, bias, block_size)
    return torch.ops.qwantize_hf.mxfp4_linear_routed(x, experts, packed, scales, bias, block_size)


__all__ = ["check_routed_args", "gemv_pairs", "mxfp4_linear_routed", "routed_fits", "routed_reference"]
