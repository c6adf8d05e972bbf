"""The per-layer choice of what to store: factors, the full gradient, a projection, or pooled factors.

Exact candidates are the factors (``T·(in+out)`` numbers a sample) and the full per-sample gradient
(``in·out``). Without a budget the smaller one is kept. With a per-layer budget
(``policy.budget``'s ``layer_bytes_per_sample`` and ``max_error``):

- ``layer_bytes_per_sample`` alone: the most accurate candidate that fits (an exact one if it can,
  else the projection with the largest dimension that fits);
- ``max_error`` alone: the smallest candidate whose predicted relative error of inner products is
  within it (exact ones have none);
- both: the smallest candidate within both; when none is, the most accurate that fits the bytes, and
  the choice says the tolerance is missed.

The whole capture's ``bytes_per_sample`` is met across layers (:func:`fit_total`): each layer takes its
per-layer choice, and while the total is over, the largest layers are projected, largest first.

Sizes are stored bytes before compression at the policy's precision, scales included. Every choice
comes with its reason, which the store keeps and ``describe()`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mstore_lightning.core import projection as proj
from mstore_lightning.core import quant
from mstore_lightning.core.families.kron import KroneckerExtractor
from mstore_lightning.core.families.registry import Extractor

_DIMS = tuple(2**j for j in range(1, 13))  # projection sizes tried: 2 .. 4096


@dataclass
class Candidate:
    """One way to store a layer."""

    representation: str  # "factors" | "full" | "projection"
    arrays: dict[str, dict[str, Any]]
    error: float = 0.0  # predicted relative error of inner products; 0 for exact storage
    projection: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # pooling: approximate by construction

    @property
    def nbytes(self) -> int:
        return sum(quant.row_nbytes(s) for s in self.arrays.values())

    def describe(self) -> str:
        if self.representation == "projection":
            p = self.projection
            return f"projection {p['k_out']}x{p['k_in']} ({p['form']}, seed {p['seed']})"
        if self.summary:
            return f"factors pooled {self.summary['pool']}x"
        return self.representation


def candidates(
    extractor: type[Extractor],
    hyper: dict[str, Any],
    params: list[str],
    param_shapes: dict[str, list[int]],
    a: Tensor,
    d: Tensor,
    precision: str,
    pool: int,
    seed: int,
) -> list[Candidate]:
    """Ways to store a layer, from one sample's stacked uses ``a (1, U, ...)`` and ``d (1, U, ...)``."""
    full = Candidate("full", {p: quant.array_spec(p, param_shapes[p], precision) for p in params})
    if not extractor.has_factors:
        return [full]
    index = extractor.prefix_is_index()
    if pool > 1:
        a_shape, d_shape = pooled_shape(list(a.shape[1:]), pool), pooled_shape(list(d.shape[1:]), pool)
        summary = {
            "pool": pool,
            "a_shape": list(a.shape[1:]),
            "d_shape": list(d.shape[1:]),
            "approximate": True,
        }
        pooled = {
            "a": quant.array_spec("a", a_shape, precision),
            "d": quant.array_spec("d", d_shape, precision),
        }
        return [Candidate("factors", pooled, summary=summary)]
    factors = Candidate(
        "factors",
        {
            "a": quant.array_spec("a", list(a.shape[1:]), precision, index=index),
            "d": quant.array_spec("d", list(d.shape[1:]), precision),
        },
    )
    out = [factors, full]
    if issubclass(extractor, KroneckerExtractor):
        a_m, d_m = extractor.matrices(hyper, a, d)
        _, groups, positions, dim_in = a_m.shape
        dim_out = d_m.shape[-1]
        for k in _DIMS:
            k_in, k_out = min(k, dim_in), min(k, dim_out)
            best = None
            for form in ("factors", "full"):
                shapes = proj.shapes(form, groups, positions, k_in, k_out, params)
                arrays = {n: quant.array_spec(n, s, precision) for n, s in shapes.items()}
                c = Candidate(
                    "projection",
                    arrays,
                    error=proj.predicted_error(k_in, k_out, dim_in, dim_out),
                    projection={
                        "seed": seed,
                        "k_in": k_in,
                        "k_out": k_out,
                        "form": form,
                        "dim_in": dim_in,
                        "dim_out": dim_out,
                    },
                )
                best = c if best is None or c.nbytes < best.nbytes else best
            out.append(best)
            if k_in == dim_in and k_out == dim_out:
                break
    return out


def pick(
    cands: list[Candidate], representation: str, budget: dict[str, Any] | None, dim: int
) -> tuple[Candidate, str]:
    """The candidate a policy keeps, and why; ``budget``'s per-layer fields apply here, its whole-capture
    ``bytes_per_sample`` in :func:`fit_total`."""
    budget = {k: v for k, v in (budget or {}).items() if k in ("layer_bytes_per_sample", "max_error")}
    exact = [c for c in cands if c.representation != "projection"]
    smallest_exact = min(exact, key=lambda c: c.nbytes)
    sizes = ", ".join(f"{c.describe()} {c.nbytes:,} B" for c in exact)
    if representation in ("factors", "full"):
        forced = [c for c in exact if c.representation == representation] or exact
        return forced[0], f"policy representation={representation!r} ({sizes})"
    projections = [c for c in cands if c.representation == "projection"]
    if representation == "projection":
        if not projections:
            return smallest_exact, f"no projection for this layer type; kept the smaller exact form ({sizes})"
        if not budget:
            fit = [c for c in projections if max(c.projection["k_in"], c.projection["k_out"]) <= dim]
            chosen = (fit or projections[:1])[-1]
            return chosen, f"policy representation='projection', projection_dim={dim}"
        cands = projections
    if not budget:
        return smallest_exact, f"smallest exact form ({sizes})"
    max_bytes, max_error = budget.get("layer_bytes_per_sample"), budget.get("max_error")
    fits = [c for c in cands if max_bytes is None or c.nbytes <= max_bytes]
    within = [c for c in fits if max_error is None or c.error <= max_error]
    limits = " and ".join(
        s
        for s in (
            f"{max_bytes:,} B/sample for the layer" if max_bytes is not None else "",
            f"error {max_error:g}" if max_error is not None else "",
        )
        if s
    )
    if within and max_error is not None:
        chosen = min(within, key=lambda c: (c.nbytes, c.error))
        return chosen, f"smallest within {limits} ({sizes})"
    if fits:
        chosen = min(fits, key=lambda c: (c.error, c.nbytes))
        missed = f"; predicted error {chosen.error:.3g} misses {max_error:g}" if max_error is not None else ""
        return chosen, f"most accurate within {limits}{missed} ({sizes})"
    chosen = min(cands, key=lambda c: c.nbytes)
    return chosen, f"nothing fits {limits}; kept the smallest ({chosen.nbytes:,} B; {sizes})"


def pooled_shape(shape: list[int], pool: int) -> list[int]:
    """``(U, C, *S)`` with every spatial size divided by ``pool`` (rounded up)."""
    return [*shape[:2], *[-(-s // pool) for s in shape[2:]]]


def fit_total(
    sizes: dict[str, int], projections: dict[str, list[Candidate]], fixed: int, total: int
) -> dict[str, Candidate]:
    """Projections that bring a whole capture within ``total`` bytes a sample, largest layer first.

    While the capture is over, the layer that is now the largest steps down to its next smaller
    projection. The large layers so shrink together, each keeping the widest sketch the budget allows,
    rather than one of them being crushed to fit beside the others.

    Args:
        sizes: each adjustable layer's bytes a sample as chosen per layer.
        projections: each adjustable layer's projection candidates.
        fixed: bytes a sample that cannot change (layers without a projection, or already stored).
        total: the whole capture's budget.

    Returns:
        ``{layer: projection}`` for the layers to project. When even the smallest projections do not
        fit (``fixed`` alone is over), every projectable layer takes its smallest.
    """
    current = dict(sizes)
    steps = {
        n: sorted((c for c in projections.get(n, []) if c.nbytes < sizes[n]), key=lambda c: -c.nbytes)
        for n in sizes
    }
    now = fixed + sum(current.values())
    out: dict[str, Candidate] = {}
    while now > total:
        shrinkable = [n for n in current if any(c.nbytes < current[n] for c in steps[n])]
        if not shrinkable:
            break
        name = max(shrinkable, key=lambda n: (current[n], n))
        nxt = next(c for c in steps[name] if c.nbytes < current[name])
        now += nxt.nbytes - current[name]
        current[name], out[name] = nxt.nbytes, nxt
    return out
