"""Cosine similarity, outliers and clustering in per-sample gradient space, on the factors.

``cluster`` runs k-means on a seeded sketch of each sample's gradient rather than on the gradient:
per layer, the Kronecker sketch ``P_outᵀ G P_in`` (``dim × dim``, computed from the factors as
``Σ_t (P_outᵀ d_t)(P_inᵀ a_t)ᵀ``) plus ``P_outᵀ b`` for the bias; layers kept as full gradients get
a Gaussian sketch of the flattened gradient instead. Sketches preserve inner products in expectation
(:mod:`mstore_lightning.core.projection`), so distances between samples are kept approximately.
The result reports the predicted error and the error measured on a sample of pairs against the
exact inner products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mstore_lightning.analytics import kernels
from mstore_lightning.analytics.frames import frame
from mstore_lightning.analytics.kernels import as_scan
from mstore_lightning.core import projection
from mstore_lightning.core.checks import whole

_TINY = np.finfo(np.float64).tiny


def cosine(
    store: Any,
    epoch: int,
    ids_a: Sequence[int] | np.ndarray,
    ids_b: Sequence[int] | np.ndarray,
    layers: Sequence[str] | None = None,
) -> np.ndarray:
    """``(len(ids_a), len(ids_b))`` cosines between per-sample gradients of ``epoch``."""
    scan = as_scan(store)
    dots = kernels.dot(scan, epoch, ids_a, ids_b, layers)
    norms = np.sqrt(kernels.sqnorms(scan, epoch, layers))
    na, nb = norms[scan.catalog.rows_of(epoch, ids_a)], norms[scan.catalog.rows_of(epoch, ids_b)]
    return dots / np.maximum(np.outer(na, nb), _TINY)


@dataclass
class Outliers:
    """Samples whose gradient norm is far from the epoch's typical norm.

    ``scores`` is the robust z-score ``0.6745 · (log n − median) / MAD`` of each sample's log gradient
    norm (aligned with ``ids``); ``flagged`` the ids above ``threshold``, largest first.
    """

    ids: np.ndarray
    scores: np.ndarray
    threshold: float
    flagged: np.ndarray

    def to_pandas(self) -> Any:
        """One row per sample: id, robust z-score and whether it is flagged."""
        return frame({"id": self.ids, "score": self.scores, "flagged": self.scores > self.threshold})


def outliers(store: Any, epoch: int, threshold: float = 3.5, layers: Sequence[str] | None = None) -> Outliers:
    """Samples with unusually large gradients (robust z-score of the log norm above ``threshold``)."""
    scan = as_scan(store)
    ids = scan.catalog.row_field(epoch, "ids")
    scores = robust_z(np.log(np.maximum(np.sqrt(kernels.sqnorms(scan, epoch, layers)), _TINY)))
    order = np.argsort(-scores, kind="stable")
    flagged = ids[order[scores[order] > threshold]]
    return Outliers(ids, scores, float(threshold), flagged)


def robust_z(values: np.ndarray) -> np.ndarray:
    """``0.6745 · (x − median) / MAD``: a z-score that a few extreme values cannot inflate.

    Where more than half the values are equal (a share among a few neighbours, say) the MAD is 0,
    and the standard deviation sets the scale instead.
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return values
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad > 0:
        return 0.6745 * (values - median) / mad
    return (values - median) / max(float(values.std()), _TINY)


@dataclass
class Clusters:
    """k-means in sketched gradient space.

    Attributes:
        ids: the epoch's sample ids; ``labels`` their clusters (aligned).
        sizes: samples per cluster.
        inertia: k-means' sum of squared distances, in sketch space.
        sketch_dim: numbers in one sample's sketch.
        predicted_error: bound on the relative std of a sketched inner product (rank-one layers).
        measured_error: ``‖S − X‖_F / ‖X‖_F`` of sketched against exact inner products on a sample.
    """

    ids: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    inertia: float
    sketch_dim: int
    predicted_error: float
    measured_error: float

    def to_pandas(self) -> Any:
        """One row per sample: id and cluster."""
        return frame({"id": self.ids, "cluster": self.labels})


def sketches(
    store: Any, epoch: int, dim: int = 16, layers: Sequence[str] | None = None, seed: int = 0
) -> np.ndarray:
    """``(samples, sketch_dim)`` seeded sketches of each sample's gradient, aligned with ``sample_ids``."""
    parts = []
    for src in as_scan(store).sources(epoch, layers):
        blocks = [src.rep.sketch(block.load(), dim, seed) for block in src.blocks()]
        parts.append(torch.cat(blocks) if blocks else torch.zeros(0, 0))
    return torch.cat(parts, 1).numpy()


def cluster(
    store: Any,
    epoch: int,
    k: int,
    dim: int = 16,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    check_samples: int = 128,
) -> Clusters:
    """k-means (scikit-learn) with ``k`` clusters on :func:`sketches` of ``epoch``'s gradients."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:  # pragma: no cover - the analytics extra installs it
        raise ImportError("cluster() needs scikit-learn: pip install 'mstore-lightning[analytics]'.") from exc
    whole("k", k, low=1)
    scan = as_scan(store)
    ids = scan.catalog.row_field(epoch, "ids")
    x = sketches(scan, epoch, dim, layers, seed)
    km = KMeans(n_clusters=min(int(k), len(ids)), n_init=4, random_state=seed).fit(x)
    pick = np.linspace(0, len(ids) - 1, min(check_samples, len(ids))).astype(np.int64)
    exact = kernels.dot(scan, epoch, ids[pick], ids[pick], layers)
    approx = x[pick] @ x[pick].T
    measured = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), _TINY))
    return Clusters(
        ids=ids,
        labels=km.labels_.astype(np.int64),
        sizes=np.bincount(km.labels_, minlength=km.n_clusters),
        inertia=float(km.inertia_),
        sketch_dim=int(x.shape[1]),
        predicted_error=projection.predicted_error(dim, dim),
        measured_error=measured,
    )
