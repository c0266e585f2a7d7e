"""GPTQ-style MXFP4 for one Linear: error feedback with each block's scale chosen inside the loop.

Given a weight ``W [N, K]`` and the Hessian ``H = X^T X`` of its calibration inputs
``X [n, K]``, the layer's output error for a quantized ``Q`` is
``tr((W - Q) H (W - Q)^T)``. GPTQ quantizes the columns (input features) one at a
time and spreads each column's rounding error over the columns not yet quantized,
through the upper Cholesky factor ``U`` of ``H^-1`` (lazy block updates, as in the
GPTQ paper). Quantizing column ``j`` to ``q`` costs ``(w_j - q)^2 / U_jj^2`` per row,
given the columns before it and the best use of the ones after.

MXFP4 adds one choice GPTQ does not have: each run of 32 columns of a row shares a
power-of-two scale. It is chosen when the block's first column comes up, from the
block's *current* values (the original weights plus the feedback of every column
quantized before), as the byte among ``e0-1, e0, e0+1`` of least Hessian-weighted
error: each element's squared error weighted by its column's ``1 / U_jj^2``, the
same cost GPTQ's own loop charges. That is the weighted ``mse`` search of
``format.py``, so the proof that those three bytes hold the optimum of every
non-negatively weighted squared error (DESIGN.md) applies as it stands;
``tests/test_gptq.py`` also checks it against all 255 bytes. With ``H = I`` nothing
is fed back and every weight is equal, so the bytes are plain ``mse``'s.

With ``act_order`` the columns are visited in order of decreasing ``H_jj``; a
block's scale is still chosen, from its current values, when the first of its
columns comes up, and scales are stored per 32 columns in storage order, so the
result is an ordinary MXFP4 tensor either way.

This file is tensor math only: it never touches a module or a model.
"""

from __future__ import annotations

import torch

from qwantize_hf.constants import F4_E2M1_SIGN_BIT, F4_E2M1_VALUES
from qwantize_hf.format import e2m1_magnitude_index, max_scale_byte, pack_codes, pow2_of_scale_byte
from qwantize_hf.methods import DEFAULT_SCALE_METHOD
from qwantize_hf.methods import scale_method as scale_method_row
from qwantize_hf.ops import quantize_mxfp4

DEFAULT_DAMPING = 0.01  # share of the mean diagonal of H added to its diagonal
LAZY_COLUMNS = 128  # columns updated together before the rest of W sees their error
_MAX_DAMPING_TRIES = 6  # each retry multiplies the damping by 10


def inverse_hessian_factor(hessian: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``; more damping if H is singular."""
    diagonal = torch.diagonal(hessian)
    mean = float(diagonal.mean())
    if not mean > 0:
        raise ValueError(f"{name}: the calibration inputs are all zero (H has no positive diagonal)")
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(_MAX_DAMPING_TRIES):
        damped = hessian + (damping * 10**attempt) * mean * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(f"{name}: H is not positive definite even with damping {damping * 10**_MAX_DAMPING_TRIES:g}")


def block_weights(u_diagonal: torch.Tensor) -> torch.Tensor | None:
    """Per-column weights ``1 / U_jj^2`` of one block; None when they are all equal (plain mse)."""
    weights = 1.0 / u_diagonal.square()
    if bool((weights == weights[0]).all()):
        return None
    return weights


def _quantize_column(
    column: torch.Tensor,
    was_negative: torch.Tensor,
    inverse_scale: torch.Tensor,
    scale: torch.Tensor,
    table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values) of one column at per-row scales: the format's rounding (nearest E2M1, ties to
    the even code, saturating at 6; a negative value that rounds to zero keeps its sign bit). A value
    that feedback left at exactly zero takes the sign of the weight it came from (``was_negative``):
    adding zeros can turn -0.0 into +0.0."""
    magnitude = e2m1_magnitude_index(column.abs() * inverse_scale)
    negative = torch.where(column == 0, was_negative, torch.signbit(column))
    codes = magnitude | (negative.to(torch.int32) * F4_E2M1_SIGN_BIT)
    values = table[magnitude] * scale
    return codes, torch.where(negative, -values, values)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    block_size: int = 32,
    scale_method: str = DEFAULT_SCALE_METHOD,
    damping: float = DEFAULT_DAMPING,
    act_order: bool = False,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 ``(packed uint8 [N, K/2], scales uint8 [N, K/block_size])`` of ``weight [N, K]`` by GPTQ.

    ``hessian`` is ``X^T X`` (any positive multiple: a mean works as well as a sum) of
    the layer's calibration inputs, ``[K, K]``; it is damped by ``damping`` times its
    mean diagonal. Each block's scale byte comes from ``scale_method`` applied to the
    block's current values, with the Hessian's column weights when the method takes
    weights (``mse``; the rules ``naive`` and ``even`` look at amax only). The work runs
    on ``weight``'s device in float32.
    """
    weighted = scale_method_row(scale_method).takes_weights
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: the Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    if k % block_size:
        raise ValueError(f"{name}: {k} input features are not a multiple of block_size {block_size}")
    device = weight.device
    max_byte = max_scale_byte(weight.dtype)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} holds NaN or Inf; MXFP4 cannot represent them")
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name}: the Hessian of its calibration inputs holds NaN or Inf")
    # A feature that never saw a non-zero input has no curvature: give it an independent unit one,
    # so its column is rounded alone and feeds no error to the others.
    dead = torch.diagonal(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if order is not None:
        w = w[:, order]
        h = h[order][:, order]
    u = inverse_hessian_factor(h, damping, name)
    del h
    was_negative = torch.signbit(w)

    # position of each storage column in the processing order, and the first position of each block
    position = torch.empty(k, dtype=torch.long, device=device)
    storage_column = order if order is not None else torch.arange(k, device=device)
    position[storage_column] = torch.arange(k, device=device)
    n_blocks = k // block_size
    block_of_position = (storage_column // block_size).tolist()
    scale_chosen = [False] * n_blocks
    scales = torch.empty(n, n_blocks, dtype=torch.uint8, device=device)
    scale_values = torch.empty(n, n_blocks, dtype=torch.float32, device=device)
    inverse_scales = torch.empty(n, n_blocks, dtype=torch.float32, device=device)
    codes = torch.empty(n, k, dtype=torch.int32, device=device)
    u_diagonal = torch.diagonal(u)
    table = torch.tensor(F4_E2M1_VALUES, dtype=torch.float32, device=device)

    for start in range(0, k, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, k)
        errors = torch.empty(n, end - start, dtype=torch.float32, device=device)
        for p in range(start, end):
            block = block_of_position[p]
            if not scale_chosen[block]:
                members = position[block * block_size : (block + 1) * block_size]
                current = w[:, members]
                # With act_order a block's columns may lie past this lazy run, still without its feedback.
                pending = members >= end
                if p > start and bool(pending.any()):
                    current[:, pending] -= errors[:, : p - start] @ u[start:p][:, members[pending]]
                _, block_scales = quantize_mxfp4(
                    current,
                    block_size=block_size,
                    scale_method=scale_method,
                    weights=block_weights(u_diagonal[members]) if weighted else None,
                    name=name,
                    max_byte=max_byte,  # the float32 copy must not pick a byte the weight's dtype overflows
                )
                scales[:, block] = block_scales[:, 0]
                scale_values[:, block] = pow2_of_scale_byte(block_scales[:, 0])
                inverse_scales[:, block] = pow2_of_scale_byte(block_scales[:, 0], negate=True)
                scale_chosen[block] = True
            column_codes, quantized = _quantize_column(
                w[:, p], was_negative[:, p], inverse_scales[:, block], scale_values[:, block], table
            )
            codes[:, storage_column[p]] = column_codes
            error = (w[:, p] - quantized) / u[p, p]
            w[:, p + 1 : end] -= error[:, None] * u[p, p + 1 : end][None, :]
            errors[:, p - start] = error
        w[:, end:] -= errors @ u[start:end, end:]

    return pack_codes(codes), scales


__all__ = ["DEFAULT_DAMPING", "block_weights", "gptq_quantize", "inverse_hessian_factor"]
