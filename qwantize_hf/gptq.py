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

from qwantize_hf.backend import resolve_backend
from qwantize_hf.constants import E8M0_NAN, F4_E2M1_SIGN_BIT, F4_E2M1_VALUES
from qwantize_hf.format import (
    E2M1_MIDPOINTS,
    E2M1_TIE_GOES_UP,
    max_scale_byte,
    normalize_mse_weights,
    pack_codes,
    pow2_of_scale_byte,
    quantize_blocks_torch,
)
from qwantize_hf.methods import DEFAULT_SCALE_METHOD
from qwantize_hf.methods import scale_method as scale_method_row

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


def _block_quantizer(device: torch.device, scale_method: str, block_size: int, max_byte: int):
    """``(block [n, block_size] float32, normalized weights or None) -> scale bytes [n, 1]``: the
    quantizer ``quantize_mxfp4`` would run, without its checks (GPTQ's values are finite and
    checked once at the end), each of which would make the GPU wait for the host."""
    if resolve_backend("auto", torch.empty(0, device=device)) == "triton" and device.type == "cuda":
        from qwantize_hf.kernels.quantize import quantize_triton

        return lambda block, weights: quantize_triton(block, block_size, scale_method, weights, max_byte=max_byte)[1]
    return lambda block, weights: quantize_blocks_torch(block, block_size, scale_method, weights, max_byte)[1]


def block_weights(u_diagonal: torch.Tensor) -> torch.Tensor | None:
    """Per-column weights ``1 / U_jj^2`` of one block; None when they are all equal (plain mse)."""
    weights = 1.0 / u_diagonal.square()
    if bool((weights == weights[0]).all()):
        return None
    return weights


# e2m1_magnitude_index as one bucketize: the index is the number of midpoints at or below q, where a
# midpoint whose tie goes down only counts when q is above it, i.e. at or above the next float32.
_BOUNDARIES = tuple(
    midpoint if up else float(torch.nextafter(torch.tensor(midpoint), torch.tensor(float("inf"))))
    for midpoint, up in zip(E2M1_MIDPOINTS, E2M1_TIE_GOES_UP)
)


def magnitude_index(q: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """``format.e2m1_magnitude_index`` of float32 ``q >= 0`` in one launch (``boundaries``: ``_BOUNDARIES``)."""
    return torch.bucketize(q, boundaries, out_int32=True, right=True)


def _quantize_column(
    column: torch.Tensor,
    was_negative: torch.Tensor,
    inverse_scale: torch.Tensor,
    scale: torch.Tensor,
    table: torch.Tensor,
    boundaries: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values) of one column at per-row scales: the format's rounding (nearest E2M1, ties to
    the even code, saturating at 6; a negative value that rounds to zero keeps its sign bit). A value
    that feedback left at exactly zero takes the sign of the weight it came from (``was_negative``):
    adding zeros can turn -0.0 into +0.0."""
    magnitude = magnitude_index(column.abs() * inverse_scale, boundaries)
    negative = torch.where(column == 0, was_negative, torch.signbit(column))
    codes = torch.where(negative, magnitude + F4_E2M1_SIGN_BIT, magnitude)
    values = table[magnitude] * scale
    return codes, torch.where(negative, -values, values)


def _normalized_block_weights(u_diagonal: torch.Tensor) -> torch.Tensor | None:
    """``block_weights`` as ``quantize_mxfp4(weights=...)`` normalizes them, computed on the CPU (so
    the GPU never waits for the host), or None when they are all equal."""
    weights = block_weights(u_diagonal)
    if weights is None:
        return None
    return normalize_mse_weights(weights, weights.numel(), weights.device)


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

    # position of each storage column in the processing order, and the first position of each block;
    # the loop's decisions are made from CPU copies, so the GPU never waits for the host
    storage_column = order if order is not None else torch.arange(k, device=device)
    storage = storage_column.tolist()
    position = [0] * k
    for p, column in enumerate(storage):
        position[column] = p
    n_blocks = k // block_size
    members_of = torch.tensor(position, device=device).view(n_blocks, block_size)
    block_of_position = [column // block_size for column in storage]
    # per block, from its first column's lazy run: which members lie past it (still without that
    # run's feedback when the block's scale is chosen), and its normalized column weights
    pending_rows, has_pending, weight_rows, has_weights = [], [], [], []
    u_diagonal = torch.diagonal(u).cpu()
    for block in range(n_blocks):
        members_list = position[block * block_size : (block + 1) * block_size]
        end = min((min(members_list) // LAZY_COLUMNS + 1) * LAZY_COLUMNS, k)
        pending_rows.append([float(m >= end) for m in members_list])
        has_pending.append(any(m >= end for m in members_list))
        weights = _normalized_block_weights(u_diagonal[members_list]) if weighted else None
        has_weights.append(weights is not None)
        weight_rows.append(weights if weights is not None else torch.ones(block_size))
    pending_of = torch.tensor(pending_rows, dtype=torch.float32, device=device)
    weights_of = torch.stack(weight_rows).to(device)
    scale_chosen = [False] * n_blocks
    scales = torch.empty(n, n_blocks, dtype=torch.uint8, device=device)
    scale_values = torch.empty(n, n_blocks, dtype=torch.float32, device=device)
    inverse_scales = torch.empty(n, n_blocks, dtype=torch.float32, device=device)
    codes = torch.empty(n, k, dtype=torch.int32, device=device)
    table = torch.tensor(F4_E2M1_VALUES, dtype=torch.float32, device=device)
    boundaries = torch.tensor(_BOUNDARIES, dtype=torch.float32, device=device)
    quantize_block = _block_quantizer(device, scale_method, block_size, max_byte)

    for start in range(0, k, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, k)
        errors = torch.empty(n, end - start, dtype=torch.float32, device=device)
        for p in range(start, end):
            block = block_of_position[p]
            if not scale_chosen[block]:
                members = members_of[block]
                current = w[:, members]
                if p > start and has_pending[block]:
                    # the members past this lazy run get the feedback of its columns so far (the others
                    # already hold it: their share is multiplied by zero)
                    current -= (errors[:, : p - start] @ u[start:p][:, members]) * pending_of[block]
                block_scales = quantize_block(current, weights_of[block] if has_weights[block] else None)
                scales[:, block] = block_scales[:, 0]
                scale_values[:, block] = pow2_of_scale_byte(block_scales[:, 0])
                inverse_scales[:, block] = pow2_of_scale_byte(block_scales[:, 0], negate=True)
                scale_chosen[block] = True
            column_codes, quantized = _quantize_column(
                w[:, p], was_negative[:, p], inverse_scales[:, block], scale_values[:, block], table, boundaries
            )
            codes[:, storage[p]] = column_codes
            error = (w[:, p] - quantized) / u[p, p]
            w[:, p + 1 : end].addr_(error, u[p, p + 1 : end], alpha=-1)
            errors[:, p - start] = error
        w[:, end:] -= errors @ u[start:end, end:]

    if bool((scales == E8M0_NAN).any()):
        raise ValueError(f"{name}: the error feedback left NaN or Inf in the weights (is the Hessian degenerate?)")
    return pack_codes(codes), scales


__all__ = ["DEFAULT_DAMPING", "block_weights", "gptq_quantize", "inverse_hessian_factor"]
