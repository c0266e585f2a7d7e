"""Adversarial inputs for the MXFP4 tests: random blocks of every magnitude plus the cases
that break quantizers (zeros, subnormals, exact rounding ties, ±6·scale and just above,
values near the dtype's largest finite number), and an independent float64 model of the
format for brute-force checks."""

from __future__ import annotations

import torch

from qwantize_hf.constants import E8M0_BIAS, E8M0_MAX, E8M0_MIN, F4_E2M1_EMAX, F4_E2M1_MAX, F4_E2M1_VALUES
from qwantize_hf.format import e2m1_round, pow2_of_scale_byte

MIDPOINTS = [(lo + hi) / 2 for lo, hi in zip(F4_E2M1_VALUES, F4_E2M1_VALUES[1:])]


def mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]


def adversarial(rows: int, k: int, block_size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``[rows, k]`` of ``dtype``: each block is one of several kinds, chosen at random."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    max_exp = int(torch.tensor(info.max, dtype=torch.float64).log2().floor())
    min_exp = int(torch.tensor(info.tiny, dtype=torch.float64).log2())  # smallest normal
    mant = mantissa_bits(dtype)
    n_blocks = rows * k // block_size
    out = torch.empty(n_blocks, block_size, dtype=torch.float64)
    kinds = torch.randint(0, 9, (n_blocks,), generator=gen)
    # block scales 2**lo .. 2**hi keep 8·s and the finest grid step inside the dtype's normal range
    lo, hi = max(-20, min_exp + 2), min(20, max_exp - 3)
    for b in range(n_blocks):
        kind = int(kinds[b])
        signs = torch.where(torch.rand(block_size, generator=gen) < 0.5, -1.0, 1.0).double()
        if kind == 0:  # ordinary gaussian block at a random magnitude
            scale = 2.0 ** float(torch.randint(max(lo, -12), min(hi, 12), (1,), generator=gen))
            out[b] = torch.randn(block_size, generator=gen).double() * scale
        elif kind == 1:  # all zeros (some negative zeros)
            out[b] = 0.0 * signs
        elif kind == 2:  # exact rounding ties at every E2M1 midpoint; amax = 6·s sets the scale
            s = 2.0 ** float(torch.randint(lo, hi, (1,), generator=gen))
            picks = torch.tensor(MIDPOINTS + list(F4_E2M1_VALUES), dtype=torch.float64)
            vals = picks[torch.randint(0, len(picks), (block_size,), generator=gen)]
            vals[0] = F4_E2M1_MAX
            out[b] = vals * s * signs
        elif kind == 3:  # ±6·s and just above (one ulp of dtype), plus values between 4s and 8s
            s = 2.0 ** float(torch.randint(lo, hi, (1,), generator=gen))
            just_above = F4_E2M1_MAX * (1 + 2.0**-mant)
            vals = torch.tensor([F4_E2M1_MAX, just_above, 7.0, 7.5, 4.0, 5.0, 0.25, 0.75], dtype=torch.float64)
            out[b] = vals[torch.randint(0, len(vals), (block_size,), generator=gen)] * s * signs
        elif kind == 4:  # subnormals of the dtype (and a few smallest normals)
            tiny = 2.0 ** (min_exp - mant)
            out[b] = torch.randint(0, 2**mant, (block_size,), generator=gen).double() * tiny * signs
        elif kind == 5:  # huge: near the dtype's largest finite value
            out[b] = info.max * torch.rand(block_size, generator=gen).double().clamp(0.5, 1.0) * signs
        elif kind == 6:  # tiny normals
            out[b] = torch.randn(block_size, generator=gen).double() * 2.0 ** (min_exp + 3)
        elif kind == 7:  # wide dynamic range inside one block
            exps = torch.randint(max(min_exp, -60), min(max_exp - 1, 60), (block_size,), generator=gen).double()
            out[b] = 2.0**exps * (1 + torch.rand(block_size, generator=gen).double()) * signs
        else:  # the design's counterexample: 31 × 0.25 and one 4.0 (best at s0/2), scaled
            s = 2.0 ** float(torch.randint(lo, hi, (1,), generator=gen))
            vals = torch.full((block_size,), 0.25, dtype=torch.float64)
            vals[int(torch.randint(0, block_size, (1,), generator=gen))] = 4.0
            out[b] = vals * s * signs
    return out.reshape(rows, k).to(dtype)


# --------------------------------------------------------------------------- float64 model


def nearest_e2m1_f64(q: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude of q >= 0 by exhaustive distance, ties to the even index."""
    grid = torch.tensor(F4_E2M1_VALUES, dtype=torch.float64)
    dist = (q[..., None] - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    candidates = dist == best
    # among equally near neighbours take the even index
    index = torch.arange(len(F4_E2M1_VALUES))
    even_first = torch.where(candidates & (index % 2 == 0), index, len(F4_E2M1_VALUES) + index)
    chosen = torch.where(candidates, even_first, 10 * len(F4_E2M1_VALUES)).argmin(dim=-1)
    return grid[chosen]


def block_sse_f64(block: torch.Tensor, e: int, weights: torch.Tensor | None = None) -> float:
    """Squared error of a float64 block quantized with scale byte e, in float64."""
    scale = 2.0 ** (e - E8M0_BIAS)
    q = nearest_e2m1_f64(block.abs() / scale) * scale
    err = (block.abs() - q) ** 2
    if weights is not None:
        err = err * weights
    return float(err.sum())


def ocp_e0_f64(amax: float) -> int:
    """The OCP MX scale byte from a float64 log2, independent of the bit tricks."""
    if amax == 0:
        return 0
    import math

    return max(E8M0_MIN, min(E8M0_MAX, math.floor(math.log2(amax)) - F4_E2M1_EMAX + E8M0_BIAS))


def nearest_value_rounding(w: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 nearest-value rounding of ``w`` on the grid of the given scale bytes (for tests).

    ``dequantize(quantize(w))`` must equal this; it is computed from values,
    with no packing, as an independent statement of the element rounding.
    """
    x = w.to(torch.float32).reshape(-1, block_size)
    scale = pow2_of_scale_byte(scales.reshape(-1).to(torch.int32))[:, None]
    magnitude = e2m1_round(x.abs() / scale) * scale
    return torch.where(torch.signbit(x), -magnitude, magnitude).reshape(w.shape)
