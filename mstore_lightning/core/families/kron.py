"""Factor kernels shared by the layers whose weight gradient is ``Σ_t d_t a_tᵀ`` (Linear, Conv, Conv1D).

Each such family maps its stored rows to matrices ``A (B, G, T, I)`` and ``D (B, G, T, O)``, where
``G`` is the number of weight groups and ``T`` runs over positions and uses. Then, per sample,
``W_g = D_gᵀ A_g`` and ``b = Σ_t D_t``, and between samples

    ⟨G_x, G_y⟩ = Σ_{g,t,s} (A_x[g,t]·A_y[g,s] + β) (D_x[g,t]·D_y[g,s]),   β = 1 if the bias is captured,

which never forms a gradient.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from mstore_lightning.core.families.registry import Extractor, Hyper, Rows
from mstore_lightning.core.tensor_codes import Coded, decoded

_BLOCK_ELEMS = 1 << 23  # bounds the (rows, rows, T, T) temporaries of the kernels


class KroneckerExtractor(Extractor):
    """An extractor whose families reduce to grouped ``(A, D)`` matrices.

    Attributes:
        plain: :meth:`matrices` only reshapes the rows to ``(B, 1, -1, width)``, so the Gram of
            ``int8`` rows can be formed on their codes (:func:`kron_gram_codes`).
    """

    plain: ClassVar[bool] = False

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
        rows = (x["a"], x["d"], y["a"], y["d"])
        if cls.plain and all(isinstance(r, Coded) for r in rows) and _exact_in_int32(rows) and int_matmul():
            return kron_gram_codes(*(_plain_codes(r) for r in rows), "weight" in params, "bias" in params)
        x, y = decoded(x), decoded(y)
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


def kron_gram_codes(
    ax: tuple[Tensor, Tensor],
    dx: tuple[Tensor, Tensor],
    ay: tuple[Tensor, Tensor],
    dy: tuple[Tensor, Tensor],
    weight: bool,
    bias: bool,
) -> Tensor:
    """:func:`kron_gram` of ``int8`` factors, each ``(codes (B, T, I), scales (B, T))``.

    A value is its code times its group's scale, and a scale never varies along the contracted
    axis, so ``A_x A_yᵀ = S_x (Q_x Q_yᵀ) S_y``: the products of codes are exact in int32
    (``127² · I`` stays under ``2³¹`` for ``I`` up to 133,144), and only the ``T × T`` blocks are
    scaled, in float32. No float copy of the rows is made, and the integer matmul runs several
    times faster than float32's on CPUs with int8 dot-product units.
    """
    n, t = ax[0].shape[:2]
    m, s = ay[0].shape[:2]
    out = torch.zeros((n, m), dtype=torch.float32)
    step = max(1, _BLOCK_ELEMS // max(1, m * t * s))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        dd = _scaled_products(dx, dy, lo, hi)
        if weight:
            aa = _scaled_products(ax, ay, lo, hi)
            dd *= aa.add_(1.0) if bias else aa
        out[lo:hi] = dd.sum((1, 3))
    return out


def _scaled_products(x: tuple[Tensor, Tensor], y: tuple[Tensor, Tensor], lo: int, hi: int) -> Tensor:
    """``(hi - lo, T, m, S)``: every position's row of ``x[lo:hi]`` against every one of ``y``."""
    (qx, sx), (qy, sy) = x, y
    n, t, m, s = hi - lo, qx.shape[1], qy.shape[0], qy.shape[1]
    ints = torch._int_mm(qx[lo:hi].reshape(n * t, -1), qy.reshape(m * s, -1).T)
    out = ints.to(torch.float32).view(n, t, m, s)
    return out.mul_(sx[lo:hi].reshape(n, t, 1, 1)).mul_(sy.reshape(1, 1, m, s))


def _plain_codes(rows: Coded) -> tuple[Tensor, Tensor]:
    """Codes ``(B, T, width)`` and their scales ``(B, T)``, positions and uses together."""
    b = rows.codes.shape[0]
    return rows.codes.reshape(b, -1, rows.codes.shape[-1]), rows.group_scale().reshape(b, -1)


def _exact_in_int32(rows: tuple[Coded, ...]) -> bool:
    # A sum of I products of codes in [-127, 127] fits int32 for I up to 133,144.
    return all(r.codes.shape[-1] * 127 * 127 < 2**31 for r in rows)


@functools.cache
def int_matmul() -> bool:
    """Whether this torch multiplies ``int8`` matrices on the CPU (``torch._int_mm``, exact), checked
    once on a small product; without it, coded rows are decoded to float32."""
    try:
        a = torch.arange(-6, 6, dtype=torch.int8).reshape(3, 4)
        return bool((torch._int_mm(a, a.T) == a.int() @ a.int().T).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


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
