"""One object per representation of a layer's per-sample gradients: what it stores and how to read it.

A layer is stored in one of these forms (chosen per layer at capture, see ``capture.choice``):

- :class:`Factors`: the layer input ``a`` and output gradient ``d``; exact, restored by the family.
- :class:`PooledFactors`: factors of a convolution kept as block means (MISTIQUE's POOL); approximate.
- :class:`Full`: the per-sample gradient of each parameter, formed at capture.
- :class:`ProjectedFactors` and :class:`ProjectedSketch`: a seeded Kronecker projection of the factors,
  or of the gradient they make; unbiased estimates, never restored.

Each is a small frozen dataclass that round-trips to the layer's JSON spec in the store (like zarr's
codecs) and knows, in this one place, the arrays it stores, how to restore gradients, their squared
norms, their Gram block with another block, class sums and a seeded sketch. Readers and operators
call these methods; none of them branches on the representation.

Rows passed to the methods are the decoded stored arrays of a block of samples (``{"a": ..., "d":
...}`` or ``{param: ...}``), each with the samples along dim 0.

Example:
    >>> spec = {"name": "fc", "kind": "linear", "params": ["weight"], "param_shapes": {"weight": [2, 3]},
    ...         "hyper": {}, "representation": "factors", "arrays": {}}
    >>> rep = Representation.from_spec(spec)
    >>> type(rep).__name__, rep.to_spec() == spec
    ('Factors', True)
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from mstore_lightning.core import notes, pooling, projection
from mstore_lightning.core.errors import StoreReadError
from mstore_lightning.core.families.kron import KroneckerExtractor, int_matmul, kron_gram, kron_sqnorm
from mstore_lightning.core.families.registry import Extractor, extractor_for_kind, flat_gram
from mstore_lightning.core.quant import StoredArray, stored_arrays

Rows = dict[str, Tensor]
MATRIX = "__matrix__"  # a class sum's weight part in the (G, O, I) layout its factors multiply in


@dataclass(frozen=True)
class Representation(ABC):
    """What every representation shares: the layer, its family and its stored arrays.

    Attributes:
        name: the module's name in the model.
        kind: the layer family (``linear``, ``conv``, ...), see ``core.families``.
        params: the module's captured parameters.
        param_shapes: their shapes.
        hyper: the family's JSON hyperparameters.
        arrays: how each stored logical array is encoded (``core.quant.array_spec``).
        batch_coupled: the training-mode BatchNorms the layer's output gradient passed through (or
            the layer itself, a training-mode BatchNorm): its rows mix the batch's samples.
    """

    name: str
    kind: str
    params: list[str]
    param_shapes: dict[str, list[int]]
    hyper: dict[str, Any]
    arrays: dict[str, dict[str, Any]] = field(repr=False)
    batch_coupled: tuple[str, ...] = ()

    tag: ClassVar[str]
    _KEYS: ClassVar[tuple[str, ...]] = ("name", "kind", "params", "param_shapes", "hyper", "arrays")

    # ---------------------------------------------------------------- the JSON spec
    @staticmethod
    def from_spec(spec: dict[str, Any]) -> Representation:
        """The representation a layer spec (``store.layer_spec(name)``) records."""
        base = {k: spec[k] for k in Representation._KEYS}
        base["batch_coupled"] = tuple(spec.get("batch_coupled", ()))
        tag = spec["representation"]
        if tag == "factors" and spec.get("summary", {}).get("pool"):
            return PooledFactors(**base, summary=dict(spec["summary"]))
        if tag == "factors":
            return Factors(**base)
        if tag == "full":
            return Full(**base)
        if tag == "projection":
            cls = ProjectedFactors if spec["projection"]["form"] == "factors" else ProjectedSketch
            return cls(**base, projection=dict(spec["projection"]))
        raise StoreReadError(f"Layer {spec.get('name')!r} has an unknown representation {tag!r}.")

    def to_spec(self) -> dict[str, Any]:
        """The keys of the layer spec this representation owns."""
        out = {**{k: getattr(self, k) for k in self._KEYS}, "representation": self.tag}
        if self.batch_coupled:
            out["batch_coupled"] = list(self.batch_coupled)
        return out

    # ---------------------------------------------------------------- what is stored
    @functools.cached_property
    def extractor(self) -> type[Extractor]:
        """The layer family's rules (looked up once: the kernels ask on every block)."""
        return extractor_for_kind(self.kind)

    @property
    def stored(self) -> list[StoredArray]:
        """Every Zarr array the layer stores: row parts, code tables and dedup references."""
        return stored_arrays(self.arrays)

    @functools.cached_property
    def approximate(self) -> str | None:
        """Why results from this layer are estimates, or ``None`` when exact up to precision."""
        return notes.approximate(self.to_spec())

    @functools.cached_property
    def estimate(self) -> str | None:
        """Why this form of storage gives estimates, or ``None`` when it is exact."""
        return notes.estimate(self.to_spec())

    @property
    def input_width(self) -> int | None:
        """The width of :meth:`input_features`, or ``None`` where the layer stores no input."""
        return None

    def input_features(self, rows: Rows) -> Tensor:
        """``(n, width)``: each row's stored layer input as one point (see
        ``Extractor.input_features``), for finding the samples nearest it."""
        raise ValueError(f"Layer {self.name!r} stores no input ({self.tag}).")

    def check_restore(self) -> None:
        """Raises where this representation's gradients cannot be restored (before any read)."""

    def unpacked(self, rows: Rows) -> Rows:
        """Rows as the layer family reads them (pooled maps repeated over their blocks)."""
        return rows

    @property
    def takes_codes(self) -> bool:
        """Whether :meth:`gram` takes ``int8`` rows as stored, as ``tensor_codes.Coded`` codes and
        scales, and multiplies the codes exactly in integers (rather than decoded floats)."""
        return False

    # ---------------------------------------------------------------- kernels
    @abstractmethod
    def restore(self, rows: Rows) -> Rows:
        """Per-sample gradients ``{param: (n, *shape)}``."""

    def sqnorm(self, rows: Rows) -> Tensor:
        """``(n,)`` squared gradient norms, float64."""
        g = self.restore(rows)
        return _flat_sqnorm(g, self.params)

    def gram(self, x: Rows, y: Rows) -> Tensor:
        """``(n, m)`` gradient inner products between two blocks."""
        gx, gy = self.restore(x), self.restore(y)
        return sum(flat_gram(gx[p], gy[p]) for p in self.params)

    def scaled(self, rows: Rows, w: Tensor) -> Rows:
        """Rows whose gradients are the given rows' times ``w`` (one factor per row): every
        stored array is linear in the gradient here; factor forms override it."""
        return {n: v * w.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1))) for n, v in rows.items()}

    def class_sum(self, rows: Rows) -> Rows:
        """The sum of the rows' gradients ``{param: shape}``; families with a factor form add
        ``MATRIX``: the weight part in the ``(G, O, I)`` layout of the factors."""
        return {p: g.sum(0) for p, g in self.restore(rows).items()}

    def dot_class(self, rows: Rows, sums: Rows, matrix: Tensor | None) -> Tensor:
        """``(n,)`` inner products of the rows' gradients with one class sum (float64)."""
        g = self.restore(rows)
        return sum(g[p].reshape(g[p].shape[0], -1).double() @ sums[p].reshape(-1) for p in self.params)

    def sketch(self, rows: Rows, dim: int, seed: int) -> Tensor:
        """``(n, width)`` seeded Gaussian sketches of the flattened gradients (inner products kept in
        expectation), ``width <= dim²``."""
        g = self.restore(rows)
        n = next(iter(rows.values())).shape[0]
        flat = torch.cat([g[p].reshape(n, -1).double() for p in self.params], 1)
        width = min(dim * dim, flat.shape[1])
        gen = torch.Generator().manual_seed(seed * 1_000_003 + len(self.name))
        jl = torch.randn(flat.shape[1], width, generator=gen, dtype=torch.float64) / math.sqrt(width)
        return flat @ jl


@dataclass(frozen=True)
class Factors(Representation):
    """The layer input and output gradient: exact, restored and analysed by the layer family."""

    tag: ClassVar[str] = "factors"

    def restore(self, rows: Rows) -> Rows:
        return self.extractor.restore(self.hyper, self.params, self.unpacked(rows))

    def sqnorm(self, rows: Rows) -> Tensor:
        return self.extractor.sqnorm(self.hyper, self.params, self.unpacked(rows)).double()

    def gram(self, x: Rows, y: Rows) -> Tensor:
        return self.extractor.gram(self.hyper, self.params, self.unpacked(x), self.unpacked(y))

    @property
    def takes_codes(self) -> bool:
        return getattr(self.extractor, "plain", False) and int_matmul()

    @property
    def input_width(self) -> int | None:
        return self.extractor.input_width(self.hyper, self._a_shape)

    @property
    def _a_shape(self) -> list[int]:
        return list(self.arrays["a"]["row_shape"])

    def input_features(self, rows: Rows) -> Tensor:
        return self.extractor.input_features(self.hyper, self.unpacked(rows)["a"])

    def scaled(self, rows: Rows, w: Tensor) -> Rows:
        # A gradient is linear in its output-gradient factor d; the input factor stays as stored.
        d = rows["d"]
        return {**rows, "d": d * w.to(d.dtype).reshape(-1, *([1] * (d.dim() - 1)))}

    def _matrices(self, rows: Rows) -> tuple[Tensor, Tensor] | None:
        ext = self.extractor
        if not issubclass(ext, KroneckerExtractor):
            return None
        rows = self.unpacked(rows)
        return ext.matrices(self.hyper, rows["a"], rows["d"])

    def class_sum(self, rows: Rows) -> Rows:
        mats = self._matrices(rows)
        if mats is None:
            return super().class_sum(rows)  # bounded by the block
        a_m, d_m = mats
        out = {}
        if "weight" in self.params:
            out[MATRIX] = torch.einsum("bgto,bgti->goi", d_m, a_m)
            out["weight"] = self.extractor.weight_from(self.hyper, out[MATRIX][None])[0]
        if "bias" in self.params:
            out["bias"] = d_m.sum((0, 2)).reshape(-1)
        return out

    def dot_class(self, rows: Rows, sums: Rows, matrix: Tensor | None) -> Tensor:
        mats = self._matrices(rows) if matrix is not None else None
        if mats is None:
            return super().dot_class(rows, sums, matrix)
        a_m, d_m = (m.double() for m in mats)
        out = torch.zeros(a_m.shape[0], dtype=torch.float64)
        if "weight" in self.params:
            out += torch.einsum("bgto,goi,bgti->b", d_m, matrix, a_m)
        if "bias" in self.params:
            out += d_m.sum(2).reshape(d_m.shape[0], -1) @ sums["bias"]
        return out

    def sketch(self, rows: Rows, dim: int, seed: int) -> Tensor:
        mats = self._matrices(rows)
        if mats is None:
            return super().sketch(rows, dim, seed)
        a_m, d_m = mats
        n = a_m.shape[0]
        k_in, k_out = min(dim, a_m.shape[-1]), min(dim, d_m.shape[-1])
        proj = {"seed": seed, "k_in": k_in, "k_out": k_out}
        p_in, p_out = projection.projection_matrices(proj, self.name, a_m.shape[-1], d_m.shape[-1])
        out = projection.project(
            a_m.double(), d_m.double(), p_in.double(), p_out.double(), "full", self.params
        )
        return torch.cat([v.reshape(n, -1) for v in out.values()], 1)


@dataclass(frozen=True)
class PooledFactors(Factors):
    """Factors of a convolution kept as block means; reads repeat each mean over its block."""

    summary: dict[str, Any] = field(default_factory=dict)

    def to_spec(self) -> dict[str, Any]:
        return {**super().to_spec(), "summary": self.summary}

    @property
    def takes_codes(self) -> bool:
        return False  # the means are repeated over their blocks first

    @property
    def _a_shape(self) -> list[int]:
        return list(self.summary["a_shape"])

    def unpacked(self, rows: Rows) -> Rows:
        s = self.summary
        return {
            "a": pooling.unpool(rows["a"], s["a_shape"], s["pool"]),
            "d": pooling.unpool(rows["d"], s["d_shape"], s["pool"]),
        }


@dataclass(frozen=True)
class Full(Representation):
    """Each parameter's per-sample gradient, formed at capture."""

    tag: ClassVar[str] = "full"

    def restore(self, rows: Rows) -> Rows:
        return rows

    def sqnorm(self, rows: Rows) -> Tensor:
        return _flat_sqnorm(rows, rows)

    def gram(self, x: Rows, y: Rows) -> Tensor:
        return sum(flat_gram(x[p], y[p]) for p in x)


@dataclass(frozen=True)
class _Projected(Representation):
    """A seeded Kronecker projection: unbiased inner products, no parameter-space gradient."""

    projection: dict[str, Any] = field(default_factory=dict)

    tag: ClassVar[str] = "projection"

    def to_spec(self) -> dict[str, Any]:
        return {**super().to_spec(), "projection": self.projection}

    def restore(self, rows: Rows) -> Rows:
        raise self._unrestorable()

    def check_restore(self) -> None:
        raise self._unrestorable()

    def _unrestorable(self) -> StoreReadError:
        return StoreReadError(
            f"Layer {self.name!r} is stored as a {self.estimate}; its gradients cannot be restored. "
            "norms, dot and the analytics work on it; capture it with representation='factors' or a "
            "larger budget to restore it."
        )

    def class_sum(self, rows: Rows) -> Rows:
        raise ValueError(
            f"Layer {self.name!r} is stored as a projection; class gradients need factors or full."
        )

    def dot_class(self, rows: Rows, sums: Rows, matrix: Tensor | None) -> Tensor:
        return self.class_sum(rows)  # refused with the same message: there is no class sum to meet

    def sketch(self, rows: Rows, dim: int, seed: int) -> Tensor:
        raise ValueError(f"Layer {self.name!r} is stored as a projection already; cluster the others.")


@dataclass(frozen=True)
class ProjectedFactors(_Projected):
    """Projected factors ``A (G, T, k_in)`` and ``D (G, T, k_out)``: a linear layer's kernels apply."""

    def _terms(self) -> tuple[bool, bool]:
        return "weight" in self.params, "bias" in self.params

    @property
    def input_width(self) -> int | None:
        return int(self.projection["k_in"])

    def input_features(self, rows: Rows) -> Tensor:
        # The projected inputs ``P_inᵀ a``, pooled by the families' default: Gaussian, so their
        # cosines are the inputs' in expectation, whatever the family.
        return Extractor.input_features(self.hyper, rows["a"])

    def scaled(self, rows: Rows, w: Tensor) -> Rows:
        d = rows["d"]
        return {**rows, "d": d * w.to(d.dtype).reshape(-1, *([1] * (d.dim() - 1)))}

    def sqnorm(self, rows: Rows) -> Tensor:
        return kron_sqnorm(rows["a"], rows["d"], *self._terms()).double()

    def gram(self, x: Rows, y: Rows) -> Tensor:
        return kron_gram(x["a"], x["d"], y["a"], y["d"], *self._terms())


@dataclass(frozen=True)
class ProjectedSketch(_Projected):
    """The projected gradient itself, ``P_outᵀ G P_in``, per parameter."""

    def sqnorm(self, rows: Rows) -> Tensor:
        return _flat_sqnorm(rows, rows)

    def gram(self, x: Rows, y: Rows) -> Tensor:
        return sum(flat_gram(x[p], y[p]) for p in x)


def _flat_sqnorm(rows: Rows, names: Any) -> Tensor:
    # Accumulated in float64 inside the reduction: no float64 copy of the rows, no overflow.
    return sum(
        torch.linalg.vector_norm(rows[p].reshape(rows[p].shape[0], -1), dim=1, dtype=torch.float64).square()
        for p in names
    )
