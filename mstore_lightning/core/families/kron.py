"""Factor kernels shared by the layers whose weight gradient is ``Σ_t d_t a_tᵀ`` (Linear, Conv, Conv1D).

Each such family maps its stored rows to matrices ``A (B, G, T, I)`` and ``D (B, G, T, O)``, where
``G`` is the number of weight groups and ``T`` runs over positions and uses. Then, per sample,
``W_g = D_gᵀ A_g`` and ``b = Σ_t D_t``, and between samples

    ⟨G_x, G_y⟩ = Σ_{g,t,s} (A_x[g,t]·A_y[g,s] + β) (D_x[g,t]·D_y[g,s]),   β = 1 if the bias is captured,

which never forms a gradient.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from mstore_lightning.core.families.registry import Extractor, Hyper, Rows

_BLOCK_ELEMS = 1 << 23  # bounds the (rows, rows, T, T) temporaries of the kernels


class KroneckerExtractor(Extractor):
    """An extractor whose families reduce to grouped ``(A, D)`` matrices."""

    @classmethod
    @abstractmethod
    def matrices(cls, hyper: Hyper, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, U, ...)`` rows to ``A (B, G, T, I)`` and ``D (B, G, T, O)`` in float32 or wider."""

    @classmethod
    @abstractmethod
    def weight_from(cls, hyper: Hyper, g: Tensor) -> Tensor:
        """``(B, G, O, I)`` per-group gradients to ``(B, *weight.shape)``."""

    @classmethod
    def restore(cls, hyper: Hyper, params: list[str], rows: Rows) -> Rows:
        a_m, d_m = cls.matrices(hyper, rows["a"], rows["d"])
        out: Rows = {}
        if "weight" in params:
            out["weight"] = cls.weight_from(hyper, torch.einsum("bgto,bgti->bgoi", d_m, a_m))
        if "bias" in params:
            out["bias"] = d_m.sum(2).reshape(d_m.shape[0], -1)
        return out

    @classmethod
    def gram(cls, hyper: Hyper, params: list[str], x: Rows, y: Rows) -> Tensor:
        ax, dx = cls.matrices(hyper, x["a"], x["d"])
        ay, dy = cls.matrices(hyper, y["a"], y["d"])
        return kron_gram(ax, dx, ay, dy, "weight" in params, "bias" in params)

    @classmethod
    def sqnorm(cls, hyper: Hyper, params: list[str], x: Rows) -> Tensor:
        a_m, d_m = cls.matrices(hyper, x["a"], x["d"])
        return kron_sqnorm(a_m, d_m, "weight" in params, "bias" in params)


def kron_gram(ax: Tensor, dx: Tensor, ay: Tensor, dy: Tensor, weight: bool, bias: bool) -> Tensor:
    """``(n, m)`` gradient inner products from grouped factor matrices."""
    n, g, t, _ = ax.shape
    m, s = ay.shape[0], ay.shape[2]
    if t == 1 and s == 1:
        # T = 1: ⟨G_x, G_y⟩ = (a_x·a_y + β)(d_x·d_y), one matmul per factor, in place: at thousands
        # of rows the temporaries cost as much as the matmuls.
        out = None
        for k in range(g):
            term = dx[:, k, 0] @ dy[:, k, 0].T
            if weight:
                aa = ax[:, k, 0] @ ay[:, k, 0].T
                term *= aa.add_(1.0) if bias else aa
            out = term if out is None else out.add_(term)
        return out if out is not None else ax.new_zeros((n, m))
    out = ax.new_zeros((n, m))
    step = max(1, _BLOCK_ELEMS // max(1, m * t * s))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        for k in range(g):
            aa = torch.einsum("nti,msi->nmts", ax[lo:hi, k], ay[:, k])
            dd = torch.einsum("nto,mso->nmts", dx[lo:hi, k], dy[:, k])
            out[lo:hi] += (_ab(aa, weight, bias) * dd).sum((2, 3))
    return out


def kron_sqnorm(a_m: Tensor, d_m: Tensor, weight: bool, bias: bool) -> Tensor:
    """``(B,)`` squared gradient norms from grouped factor matrices.

    Over ``T`` positions there are two ways, and the cheaper one is taken: the ``T × T`` Gram
    matrices of the factors (``T²(I + O)`` a sample, the "ghost norm"), or the gradient
    ``Dᵀ A`` itself (``T·I·O``, what the layer's own weight gradient costs).
    """
    b, g, t, i = a_m.shape
    o = d_m.shape[-1]
    if not weight:  # the bias gradient is Σ_t d_t
        return d_m.sum(2).pow(2).sum((1, 2)) if bias else a_m.new_zeros(b)
    if t == 1:
        a0, d0 = a_m[:, :, 0], d_m[:, :, 0]
        return (_ab(a0.pow(2).sum(-1), weight, bias) * d0.pow(2).sum(-1)).sum(1)
    out = a_m.new_zeros(b)
    if t * (i + o) > i * o:
        step = max(1, _BLOCK_ELEMS // max(1, g * o * i))
        for lo in range(0, b, step):
            w = torch.einsum("bgto,bgti->bgoi", d_m[lo : lo + step], a_m[lo : lo + step])
            out[lo : lo + step] = w.pow(2).sum((1, 2, 3))
        return out + d_m.sum(2).pow(2).sum((1, 2)) if bias else out
    step = max(1, _BLOCK_ELEMS // max(1, g * t * t))
    for lo in range(0, b, step):
        aa = a_m[lo : lo + step] @ a_m[lo : lo + step].transpose(-1, -2)
        dd = d_m[lo : lo + step] @ d_m[lo : lo + step].transpose(-1, -2)
        out[lo : lo + step] = (_ab(aa, weight, bias) * dd).sum((1, 2, 3))
    return out


def _ab(aa: Tensor, weight: bool, bias: bool) -> Tensor:
    # The weight contributes a·a', the bias a constant 1 per position pair.
    if weight and bias:
        return aa + 1.0
    if weight:
        return aa
    return torch.ones_like(aa)


def as_float(t: Tensor) -> Tensor:
    """Float32 (or float64, kept) view of stored rows: AMP mixes dtypes and einsum needs one."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
