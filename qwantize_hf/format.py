"""The MXFP4 format in plain torch: the specification and the CPU path.

Every Triton kernel in ``qwantize_hf.kernels`` is an optimisation of a function
here and is tested byte for byte against it. This file must never depend on
Triton, and its functions must stay simple enough to read as the format's
definition (DESIGN.md, "The format" and "Scale methods").

Conventions: a weight ``[..., K]`` is cut into blocks of ``block_size``
consecutive elements along the last dimension. Quantizing gives
``packed uint8 [..., K/2]`` (element 2i in the low nibble, 2i+1 in the high
nibble) and ``scales uint8 [..., K/block_size]`` (UE8M0: value 2**(e-127),
255 = NaN).

How the ``mse`` search is evaluated, exactly (the kernels do the same
floating-point operations in the same order, so both give the same bytes):

* ``e0`` is the naive byte; the candidates are ``e0-1`` (when ``e0 >= 1``),
  ``e0`` and ``e0+1`` (when ``e0+1 <= max_byte``: ``max_scale_byte`` of the
  weight's dtype, the largest byte whose grid, up to ``6 * scale``, is finite
  in that dtype: 252 for float32 and bfloat16, 140 for float16; a larger
  byte could round a finite block max up to infinity). Every method caps its
  byte there (naive only ever reaches it when GPTQ's feedback pushed a
  block past the dtype's range).
  DESIGN.md explains why no other byte can be better for unweighted error;
  with ``weights`` the same three are searched.
* Errors are measured in units of the smallest candidate scale ``s_min``:
  ``a = |x| / s_min`` is exact (a power of two). Elements with ``a <= 0.25``
  round to zero under every candidate, so they add the same ``x**2`` to every
  candidate's error and are left out; what remains is exact in float32.
* For candidate ``j`` (scale ``2**j * s_min``) an element's error is
  ``d = a - 2**j * round_e2m1(a / 2**j)``, exact in float32; its term is
  ``d * d`` (times the element's weight), rounded to float32, and a block's
  terms are summed by a fixed pairwise tree (0+1, 2+3, ... then again), so the
  order of additions is the same everywhere.
* The smallest sum wins; an exact tie keeps ``e0``, then prefers the larger
  scale.
"""

from __future__ import annotations

import torch

from qwantize_hf.constants import (
    BLOCK_SIZES,
    E8M0_BIAS,
    E8M0_MAX,
    E8M0_MAX_QUANTIZE,
    E8M0_MIN,
    E8M0_NAN,
    F4_CODES_PER_BYTE,
    F4_E2M1_EMAX,
    F4_E2M1_MAG_MASK,
    F4_E2M1_MANTISSA_BITS,
    F4_E2M1_MAX,
    F4_E2M1_SIGN_BIT,
    F4_E2M1_VALUES,
    F4_NIBBLE_BITS,
    F4_NIBBLE_MASK,
    F32_ABS_MASK,
    F32_EXP_BIAS,
    F32_EXP_NONFINITE,
    F32_MANTISSA_BITS,
    F32_SIGN_SHIFT,
    MSE_WEIGHT_RELATIVE_FLOOR,
)
from qwantize_hf.methods import scale_method as _scale_method_row

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Midpoints between neighbouring E2M1 magnitudes. A value exactly on a midpoint
# goes to the neighbour with the even index: up when the lower index is odd.
E2M1_MIDPOINTS = tuple((lo + hi) / 2 for lo, hi in zip(F4_E2M1_VALUES, F4_E2M1_VALUES[1:]))
E2M1_TIE_GOES_UP = tuple(index % 2 == 1 for index in range(len(E2M1_MIDPOINTS)))  # ties go to the even index
# Below this, a scaled element rounds to zero (the first midpoint ties to 0).
ROUNDS_TO_ZERO_BELOW = E2M1_MIDPOINTS[0]
# torchao's EVEN rule: add half of the E2M1 mantissa's last place to amax's bits.
EVEN_ROUNDING_ADD = 1 << (F32_MANTISSA_BITS - F4_E2M1_MANTISSA_BITS - 1)
# An E2M1 magnitude r >= 1 with index m has float32 bits (m + 252) << 22: the
# exponent field and the one mantissa bit, read as one number, count up with m.
E2M1_F32_CODE_SHIFT = F32_MANTISSA_BITS - F4_E2M1_MANTISSA_BITS
E2M1_F32_CODE_OFFSET = (F32_EXP_BIAS - 1) << F4_E2M1_MANTISSA_BITS
# 2**-127, the UE8M0 byte 0, is a float32 subnormal: its bit pattern.
_F32_BITS_OF_SMALLEST_SCALE = 1 << (F32_MANTISSA_BITS - 1)


# --------------------------------------------------------------------------- validation


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


def check_scale_method(scale_method: str) -> None:
    """Raise a ValueError naming the valid scale methods (methods.SCALE_METHODS) and a close match."""
    _scale_method_row(scale_method)


def check_weight(w: torch.Tensor, block_size: int, name: str = "w") -> None:
    """Raise a clear error for a tensor ``quantize_mxfp4`` cannot take."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: it has a shape but no values (a model skeleton not yet loaded); "
            "quantize a tensor that holds its weights"
        )
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {w.dtype}; MXFP4 quantization takes bfloat16, float16 or float32 "
            f"(convert with {name}.to(torch.bfloat16))"
        )
    if w.ndim == 0 or w.shape[-1] % block_size != 0:
        last = "a scalar" if w.ndim == 0 else f"last dimension {w.shape[-1]}"
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}: {last} is not a multiple of block_size "
            f"{block_size}; blocks run along the last dimension (pad it, or keep this tensor unquantized)"
        )


def normalize_mse_weights(weights: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    """Validate per-input-feature weights and rescale them by a power of two.

    The rescaling is exact and cannot change which scale wins; it puts the
    largest weight in [1, 2) so that no error term under- or overflows.
    Relative weights below MSE_WEIGHT_RELATIVE_FLOOR become zero.
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor of shape [{k}], got {type(weights).__name__}")
    if weights.shape != (k,):
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}; it needs one non-negative weight per input "
            f"feature, shape [{k}] (the last dimension of the tensor being quantized)"
        )
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    weights = weights.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"weights must be finite and non-negative; weights[{index}] = {weights[index].item()} "
            f"({int(bad.sum())} bad entries)"
        )
    largest = weights.max()
    if largest == 0:
        return weights
    _, exponent = torch.frexp(largest)  # largest = m * 2**exponent, m in [0.5, 1)
    weights = torch.ldexp(weights, 1 - exponent)
    return torch.where(weights < MSE_WEIGHT_RELATIVE_FLOOR, 0.0, weights)


# --------------------------------------------------------------------------- element level


def float32_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit pattern of ``x`` converted (exactly) to float32."""
    return x.to(torch.float32).contiguous().view(torch.int32)


def pow2_of_scale_byte(e: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """float32 ``2**(e-127)`` (or ``2**(127-e)`` when ``negate``) for bytes 0..253, exactly."""
    e = e.to(torch.int32)
    if negate:
        # 2**(127-e) has float32 exponent field 254-e, normal for e in [0, 253].
        return ((2 * E8M0_BIAS - e) << F32_MANTISSA_BITS).view(torch.float32)
    bits = torch.where(e == E8M0_MIN, _F32_BITS_OF_SMALLEST_SCALE, e << F32_MANTISSA_BITS)
    return bits.view(torch.float32)


def e2m1_magnitude_index(q: torch.Tensor) -> torch.Tensor:
    """Index 0..7 of the E2M1 magnitude nearest to ``q >= 0``; ties to even; saturates at 6."""
    index = torch.zeros(q.shape, dtype=torch.int32, device=q.device)
    for midpoint, tie_goes_up in zip(E2M1_MIDPOINTS, E2M1_TIE_GOES_UP):
        index += (q >= midpoint) if tie_goes_up else (q > midpoint)
    return index


def e2m1_round(q: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude nearest to ``q >= 0`` (float32), as ``e2m1_magnitude_index`` picks it."""
    table = torch.tensor(F4_E2M1_VALUES, dtype=torch.float32, device=q.device)
    return table[e2m1_magnitude_index(q)]


def pairwise_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum the last dimension (a power of two) as a fixed tree: (0+1), (2+3), ... then again."""
    while terms.shape[-1] > 1:
        terms = terms[..., 0::2] + terms[..., 1::2]
    return terms[..., 0]


# --------------------------------------------------------------------------- scales


def block_amax_bits(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each block's amax as float32 bits: the integer max of the magnitude bits, exact and
    NaN-aware (NaN's bits are the largest). ``[n_blocks]`` int32."""
    return (float32_bits(w).reshape(-1, block_size) & F32_ABS_MASK).amax(dim=-1)


def max_scale_byte(dtype: torch.dtype) -> int:
    """The largest scale byte whose grid (up to ``6 * 2**(byte-127)``) is finite in ``dtype``."""
    largest = torch.finfo(dtype).max
    byte = E8M0_MAX_QUANTIZE
    while F4_E2M1_MAX * 2.0 ** (byte - E8M0_BIAS) > largest:
        byte -= 1
    return byte


def naive_scale_bytes(amax_bits: torch.Tensor, max_byte: int = E8M0_MAX_QUANTIZE) -> torch.Tensor:
    """OCP MX v1.0: clamp(floor(log2(amax)) - 2 + 127, 0, max_byte), from amax's float32 bits.

    For a normal amax, floor(log2(amax)) + 127 is its exponent field; zero and
    subnormal amax give a negative byte, clamped to 0. Non-finite → 255.
    """
    exponent_field = amax_bits >> F32_MANTISSA_BITS
    e0 = (exponent_field - F4_E2M1_EMAX).clamp(E8M0_MIN, max_byte)
    return torch.where(exponent_field == F32_EXP_NONFINITE, E8M0_NAN, e0)


def even_scale_bytes(amax_bits: torch.Tensor, max_byte: int = E8M0_MAX_QUANTIZE) -> torch.Tensor:
    """torchao EVEN: ``e0 + 1`` when amax's mantissa is 1.75 or more (it rounds up to 2)."""
    rounded_field = (amax_bits + EVEN_ROUNDING_ADD) >> F32_MANTISSA_BITS
    e = (rounded_field - F4_E2M1_EMAX).clamp(E8M0_MIN, max_byte)
    return torch.where((amax_bits >> F32_MANTISSA_BITS) == F32_EXP_NONFINITE, E8M0_NAN, e)


def mse_candidate_errors(
    absx: torch.Tensor, e0: torch.Tensor, weights: torch.Tensor | None, max_byte: int = E8M0_MAX_QUANTIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared error of each block under scale bytes e0-1, e0, e0+1 (inf where not a candidate).

    ``absx`` float32 ``[nblocks, block_size]``, ``e0`` int32 ``[nblocks]``,
    ``weights`` float32 broadcastable to ``absx`` or None. See the module
    docstring for the exact evaluation.
    """
    e_min = (e0 - 1).clamp(min=E8M0_MIN)
    a = absx * pow2_of_scale_byte(e_min, negate=True)[:, None]
    counted = a > ROUNDS_TO_ZERO_BELOW
    sums = []
    for j in range(3):
        step = 2.0**j
        d = torch.where(counted, a - e2m1_round(a / step) * step, 0.0)
        terms = d * d
        if weights is not None:
            terms = terms * weights
        sums.append(pairwise_sum(terms))
    has_minus = e0 > E8M0_MIN
    inf = torch.full_like(sums[0], float("inf"))
    err_minus = torch.where(has_minus, sums[0], inf)
    err_zero = torch.where(has_minus, sums[1], sums[0])
    err_plus = torch.where(has_minus, sums[2], sums[1])
    err_plus = torch.where(e0 < max_byte, err_plus, inf)
    return err_minus, err_zero, err_plus


def mse_scale_bytes(
    absx: torch.Tensor, amax_bits: torch.Tensor, weights: torch.Tensor | None = None, max_byte: int = E8M0_MAX_QUANTIZE
) -> torch.Tensor:
    """The byte among e0-1, e0, e0+1 with the least (weighted) squared error; ties keep e0, then go up."""
    e0 = naive_scale_bytes(amax_bits, max_byte)
    e = choose_mse_byte(e0, *mse_candidate_errors(absx, e0, weights, max_byte))
    return torch.where(e0 == E8M0_NAN, E8M0_NAN, e)


def choose_mse_byte(
    e0: torch.Tensor, err_minus: torch.Tensor, err_zero: torch.Tensor, err_plus: torch.Tensor
) -> torch.Tensor:
    """The candidate of least error; an exact tie keeps e0, then prefers the larger scale."""
    keep = (err_zero <= err_minus) & (err_zero <= err_plus)
    up = err_plus <= err_minus
    return torch.where(keep, e0, torch.where(up, e0 + 1, e0 - 1))


# Each scale method's byte rule (methods.SCALE_METHODS names them): (|x| float32 [n_blocks, block_size],
# amax bits [n_blocks], per-element weights or None, largest byte allowed) -> int32 bytes [n_blocks],
# 255 for a non-finite block.
SCALE_BYTE_RULES = {
    "naive": lambda absx, amax_bits, weights, max_byte: naive_scale_bytes(amax_bits, max_byte),
    "even": lambda absx, amax_bits, weights, max_byte: even_scale_bytes(amax_bits, max_byte),
    "mse": mse_scale_bytes,
}


# --------------------------------------------------------------------------- quantize / dequantize


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., 2n]`` (values 0..15) → bytes ``[..., n]``, element 2i in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << F4_NIBBLE_BITS)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., n]`` → codes ``[..., 2n]``, the inverse of ``pack_codes``."""
    low = packed & F4_NIBBLE_MASK
    high = packed >> F4_NIBBLE_BITS
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_blocks_torch(
    w: torch.Tensor,
    block_size: int,
    scale_method: str,
    weights: torch.Tensor | None = None,
    max_byte: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference quantizer. Inputs are assumed checked (see ``quantize_mxfp4``).

    ``weights`` is float32 ``[K]``, already passed through ``normalize_mse_weights``.
    ``max_byte``: the largest scale byte to emit (None: ``max_scale_byte(w.dtype)``).
    A non-finite block gets scale byte 255 and all-zero codes.
    """
    max_byte = max_scale_byte(w.dtype) if max_byte is None else max_byte
    shape = w.shape
    bits = float32_bits(w).reshape(-1, block_size)
    absx = (bits & F32_ABS_MASK).view(torch.float32)
    amax_bits = block_amax_bits(w, block_size)
    block_weights = None
    if weights is not None:
        block_weights = weights.reshape(-1, block_size).repeat(bits.shape[0] * block_size // weights.numel(), 1)
    e = SCALE_BYTE_RULES[scale_method](absx, amax_bits, block_weights, max_byte)
    nonfinite = e == E8M0_NAN
    q = absx * pow2_of_scale_byte(torch.where(nonfinite, E8M0_BIAS, e), negate=True)[:, None]
    sign = ((bits >> F32_SIGN_SHIFT) & 1).to(torch.int32) * F4_E2M1_SIGN_BIT
    codes = torch.where(nonfinite[:, None], 0, e2m1_magnitude_index(q) | sign)
    packed = pack_codes(codes).reshape(*shape[:-1], shape[-1] // F4_CODES_PER_BYTE)
    scales = e.to(torch.uint8).reshape(*shape[:-1], shape[-1] // block_size)
    return packed, scales


def dequantize_blocks_torch(
    packed: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The reference dequantizer: code value × 2**(e-127), in float32, then cast. Byte 255 → NaN."""
    codes = unpack_codes(packed).to(torch.int32)
    table = torch.tensor(F4_E2M1_VALUES, dtype=torch.float32, device=packed.device)
    values = table[codes & F4_E2M1_MAG_MASK]
    values = torch.where((codes & F4_E2M1_SIGN_BIT) != 0, -values, values)
    k = codes.shape[-1]
    values = values.reshape(-1, block_size)
    e = scales.reshape(-1).to(torch.int32)
    scale = torch.where(e == E8M0_NAN, float("nan"), pow2_of_scale_byte(e.clamp(max=E8M0_MAX)))
    out = values * scale[:, None]
    return out.reshape(*codes.shape[:-1], k).to(dtype)


__all__ = [
    "max_scale_byte",
    "SCALE_BYTE_RULES",
    "SUPPORTED_DTYPES",
    "check_block_size",
    "check_scale_method",
    "block_amax_bits",
    "check_weight",
    "choose_mse_byte",
    "dequantize_blocks_torch",
    "e2m1_magnitude_index",
    "e2m1_round",
    "even_scale_bytes",
    "mse_candidate_errors",
    "mse_scale_bytes",
    "naive_scale_bytes",
    "normalize_mse_weights",
    "pack_codes",
    "pairwise_sum",
    "quantize_blocks_torch",
    "unpack_codes",
]
