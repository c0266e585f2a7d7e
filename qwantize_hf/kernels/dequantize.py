"""Triton MXFP4 dequantize kernel: packed codes and UE8M0 bytes in, bf16/fp16/fp32 out.

Its torch twin is ``qwantize_hf.format.dequantize_blocks_torch``: code value ×
2**(e-127) in float32, then one cast. Byte 255 gives NaN. The scale byte's value is
``mx_decode.e8m0_value``, the one the matmul kernels use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwantize_hf import constants as C
from qwantize_hf.format import E2M1_F32_CODE_OFFSET, E2M1_F32_CODE_SHIFT
from qwantize_hf.kernels.mx_decode import e8m0_value

_NIBBLE: tl.constexpr = tl.constexpr(C.F4_NIBBLE_BITS)
_NIBBLE_MASK: tl.constexpr = tl.constexpr(C.F4_NIBBLE_MASK)
_MAG_MASK: tl.constexpr = tl.constexpr(C.F4_E2M1_MAG_MASK)
_CODE_SIGN: tl.constexpr = tl.constexpr(C.F4_E2M1_SIGN_BIT)
_SIGN_SHIFT: tl.constexpr = tl.constexpr(C.F4_SIGN_TO_F32_SHIFT)  # code bit 3 → float sign bit
_BF16_SHIFT: tl.constexpr = tl.constexpr(C.BF16_SHIFT)
# Magnitude index m >= 2 is 2**(m//2 - 1) * (1 + (m % 2) / 2): float32 bits (m + 252) << 22.
_VALUE_SHIFT: tl.constexpr = tl.constexpr(E2M1_F32_CODE_SHIFT)
_VALUE_BASE: tl.constexpr = tl.constexpr(E2M1_F32_CODE_OFFSET)


@triton.jit
def e2m1_code_value(codes):
    """float32 value of E2M1 codes (int32, 0..15), sign included; -0.0 for code 8."""
    magnitude_index = codes & _MAG_MASK
    normal = ((magnitude_index + _VALUE_BASE) << _VALUE_SHIFT).to(tl.float32, bitcast=True)
    value = tl.where(magnitude_index >= 2, normal, magnitude_index.to(tl.float32) * 0.5)
    # Set the sign bit directly: negation written as 0 - x would turn code 8 into +0.0.
    sign = (codes & _CODE_SIGN) << _SIGN_SHIFT
    return (value.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_kernel(
    packed_ptr,
    scales_ptr,
    out_ptr,
    n_blocks,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    in_range = blocks < n_blocks
    half_cols = tl.arange(0, BLOCK_SIZE // 2)
    packed = tl.load(
        packed_ptr + blocks[:, None] * (BLOCK_SIZE // 2) + half_cols[None, :], mask=in_range[:, None], other=0
    ).to(tl.int32)
    codes = tl.reshape(tl.join(packed & _NIBBLE_MASK, packed >> _NIBBLE), [BLOCKS_PER_PROG, BLOCK_SIZE])
    e = tl.load(scales_ptr + blocks, mask=in_range, other=0).to(tl.int32)
    values = e2m1_code_value(codes) * e8m0_value(e)[:, None]
    cols = tl.arange(0, BLOCK_SIZE)
    out_ptrs = out_ptr + blocks[:, None] * BLOCK_SIZE + cols[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Every MXFP4 value has at most two significant bits, so bf16 is float32's top
        # half with nothing to round; narrowing the bits directly is exact (also for
        # subnormals, which Triton's interpreter converts wrongly).
        out = (values.to(tl.int32, bitcast=True) >> _BF16_SHIFT).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = values.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=in_range[:, None])


def dequantize_triton(
    packed: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype, blocks_per_prog: int = 128
) -> torch.Tensor:
    """Launch on contiguous, checked ``packed``/``scales``; same contract as the torch twin."""
    k = packed.shape[-1] * C.F4_CODES_PER_BYTE
    out = torch.empty(*packed.shape[:-1], k, dtype=dtype, device=packed.device)
    n_blocks = out.numel() // block_size
    if n_blocks == 0:
        return out
    grid = (triton.cdiv(n_blocks, blocks_per_prog),)
    _dequantize_kernel[grid](
        packed, scales, out, n_blocks, BLOCK_SIZE=block_size, BLOCKS_PER_PROG=blocks_per_prog, num_warps=4
    )
    return out
