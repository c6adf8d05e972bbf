"""Seeded Kronecker projection of a layer's factors, for layers too large to keep exactly.

A layer whose weight gradient is ``G = Σ_t d_t a_tᵀ`` (``O × I``) is kept as its sketch
``G̃ = P_outᵀ G P_in = Σ_t (P_outᵀ d_t)(P_inᵀ a_t)ᵀ`` (``k_out × k_in``), with Gaussian ``P`` of
variance ``1/k`` regenerated from a seed, so the store records the seed and the sizes, never the
matrices. A side no wider than ``k`` is kept whole (``P = I``). Either the projected factors
(``T·(k_in + k_out)`` numbers) or the sketch itself (``k_in·k_out``) is stored, whichever is smaller.

Inner products of sketches are unbiased: ``E⟨G̃_x, G̃_y⟩ = ⟨G_x, G_y⟩``, since ``E[P Pᵀ] = I`` for
each independent factor. For one position (rank-one gradients) the standard deviation of the error is
at most ``‖G_x‖‖G_y‖ · sqrt((1 + 2/k_in)(1 + 2/k_out) − 1)`` (:func:`predicted_error`); the same
holds for the squared norm (``x = y``). The bias gradient ``Σ_t d_t`` is sketched by ``P_out``.

Example:
    >>> round(predicted_error(64, 64), 3)
    0.252
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import Tensor


def predicted_error(k_in: int, k_out: int, dim_in: int | None = None, dim_out: int | None = None) -> float:
    """Bound on the relative standard deviation of a projected inner product (rank-one gradients).

    A side whose sketch is as wide as the side itself (``k >= dim``) is kept whole and adds no error.
    """
    f_in = 1.0 if dim_in is not None and k_in >= dim_in else 1 + 2 / k_in
    f_out = 1.0 if dim_out is not None and k_out >= dim_out else 1 + 2 / k_out
    return math.sqrt(f_in * f_out - 1)


def projection_matrices(proj: dict[str, Any], layer: str, dim_in: int, dim_out: int) -> tuple[Tensor, Tensor]:
    """``P_in (dim_in, k_in)`` and ``P_out (dim_out, k_out)`` of ``layer``, from the recorded seed."""
    # Each layer gets its own stream: the same seed in two layers must not correlate their sketches.
    g = torch.Generator().manual_seed((int(proj["seed"]) * 1_000_003 + zlib.crc32(layer.encode())) % 2**63)
    p_in = torch.randn(dim_in, proj["k_in"], generator=g) / math.sqrt(proj["k_in"])
    p_out = torch.randn(dim_out, proj["k_out"], generator=g) / math.sqrt(proj["k_out"])
    # A side no wider than its sketch is kept whole: a random square matrix would add error, save nothing.
    if proj["k_in"] >= dim_in:
        p_in = torch.eye(dim_in, proj["k_in"])
    if proj["k_out"] >= dim_out:
        p_out = torch.eye(dim_out, proj["k_out"])
    return p_in, p_out


def project(
    a_m: Tensor, d_m: Tensor, p_in: Tensor, p_out: Tensor, form: str, params: list[str]
) -> dict[str, Tensor]:
    """Rows to store for factor matrices ``A (B, G, T, I)`` and ``D (B, G, T, O)``."""
    pa = a_m @ p_in.to(a_m.device, a_m.dtype)
    pd = d_m @ p_out.to(d_m.device, d_m.dtype)
    if form == "factors":
        return {"a": pa, "d": pd}
    out = {}
    if "weight" in params:
        out["weight"] = torch.einsum("bgto,bgti->bgoi", pd, pa)
    if "bias" in params:
        out["bias"] = pd.sum(2).reshape(pd.shape[0], -1)
    return out


def shapes(
    form: str, groups: int, positions: int, k_in: int, k_out: int, params: list[str]
) -> dict[str, list[int]]:
    """Row shapes of the stored arrays of a projection."""
    if form == "factors":
        return {"a": [groups, positions, k_in], "d": [groups, positions, k_out]}
    out = {}
    if "weight" in params:
        out["weight"] = [groups, k_out, k_in]
    if "bias" in params:
        out["bias"] = [groups * k_out]
    return out
