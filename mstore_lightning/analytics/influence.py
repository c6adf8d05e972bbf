"""Self-influence, TracIn and top-k on the factors, summed over captured epochs.

With ``g_i(e)`` the per-sample gradient of training row ``i`` in epoch ``e`` and ``lr_e`` the epoch's
learning rate (recorded in the store):

- self-influence of a sample: ``Σ_e lr_e ‖g_i(e)‖²`` (high for mislabeled or atypical samples);
- TracIn of a query on a training sample: ``Σ_e lr_e ⟨g_train(e), g_query(e)⟩``;
- top-k: the training samples with the largest cosine (or inner product) to a query in one epoch.

Every norm and inner product comes from the store's streaming kernels on the factors; no gradient is
restored. Captured rows use the weights of their own step, so these are TracIn's "during training"
form. Every operator takes ``client=`` (a ``distributed.Client``) to run its chunk kernels on Dask.
A sample seen several times in an epoch (a sampler with replacement) adds every row. Use them
through the store: ``ids, scores = open_store(path).self_influence()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from mstore_lightning.analytics import kernels
from mstore_lightning.analytics.frames import frame
from mstore_lightning.analytics.kernels import as_scan
from mstore_lightning.analytics.ranking import RunningSum, cosines, merge_best, scatter_add
from mstore_lightning.core.checks import whole
from mstore_lightning.store.catalog import Catalog
from mstore_lightning.store.layout import SQNORMS


class Influence(NamedTuple):
    """Scores keyed by sample id: ``ids`` (N,) ascending, ``scores`` (N,) or (queries, N)."""

    ids: np.ndarray
    scores: np.ndarray

    def to_pandas(self) -> Any:
        """One row per sample id; TracIn scores get one column per query (``query_0``, ...)."""
        if self.scores.ndim == 1:
            return frame({"id": self.ids, "score": self.scores})
        return frame({"id": self.ids, **{f"query_{q}": s for q, s in enumerate(self.scores)}})


class Neighbours(NamedTuple):
    """Per query, ``k`` training sample ids and their scores, best first: both ``(queries, k)``."""

    ids: np.ndarray
    scores: np.ndarray

    def to_pandas(self) -> Any:
        """Long form: one row per (query position, rank) with the neighbour's id and score."""
        q, k = self.ids.shape
        return frame(
            {
                "query": np.repeat(np.arange(q), k),
                "rank": np.tile(np.arange(k), q),
                "id": self.ids.reshape(-1),
                "score": self.scores.reshape(-1),
            }
        )


def self_influence(
    store: Any,
    epochs: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    client: Any = None,
) -> Influence:
    """``Σ_e lr_e ‖g_i(e)‖²`` for every sample captured in ``epochs`` (all committed by default)."""
    scan = as_scan(store)
    cat = scan.catalog
    epochs = _epochs(cat, epochs)
    cat.preload(epochs, ("ids", SQNORMS))  # norms kept at capture, where they were
    run = RunningSum()
    for e in epochs:
        run.add(cat.row_field(e, "ids"), cat.lr(e) * kernels.sqnorms(scan, e, layers, client=client), [e])
    return Influence(run.ids, run.scores())


def tracin(
    store: Any,
    query_ids: Sequence[int] | np.ndarray,
    epochs: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    client: Any = None,
) -> Influence:
    """``Σ_e lr_e ⟨g_train(e), g_query(e)⟩``: scores ``(len(query_ids), N)`` over every training id.

    The queries' gradients are the query rows captured at each epoch's end
    (``GradientCapture(query=...)``, end-of-epoch weights) when every epoch asked for has them, else
    the queries' own training rows of each epoch.
    """
    scan = as_scan(store)
    cat = scan.catalog
    epochs = _epochs(cat, epochs)
    split = _query_split(cat, epochs)
    query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
    cat.preload(epochs, ("ids",))
    ids = (
        np.unique(np.concatenate([cat.row_field(e, "ids") for e in epochs]))
        if epochs
        else np.zeros(0, np.int64)
    )
    scores = np.zeros((len(query_ids), len(ids)), dtype=np.float64)
    runs = [epochs] if client is not None else scan.stage(epochs, layers, [split, "train"])
    for run in runs:
        for e in run:
            train = cat.row_field(e, "ids")
            dots = kernels.dot(scan, e, query_ids, train, layers, split_a=split, client=client)
            scatter_add(scores, np.searchsorted(ids, train), cat.lr(e) * dots)
    return Influence(ids, scores)


def topk(
    store: Any,
    query_ids: Sequence[int] | np.ndarray,
    k: int,
    epoch: int | None = None,
    metric: str = "cosine",
    layers: Sequence[str] | None = None,
    client: Any = None,
) -> Neighbours:
    """The ``k`` training samples of ``epoch`` (the last by default) closest to each query (its query
    row when the epoch captured queries, else its training row).

    Exact and streaming: the training rows are scored a window at a time, and each window's best
    are merged into each query's best so far, so memory holds one window of scores and ``k`` per
    query, not a score for every row. With ``client``, each Dask task scores one window on its
    worker and returns only its best, which the client merges as tasks finish.

    Args:
        metric: ``"cosine"`` or ``"dot"`` (the gradient inner product).
    """
    if metric not in ("cosine", "dot"):
        raise ValueError(f"`metric` can be 'cosine' or 'dot'; got {metric!r}.")
    whole("k", k, low=1)
    scan = as_scan(store)
    cat = scan.catalog
    epoch = cat.epochs[-1] if epoch is None else epoch
    query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
    train = cat.row_field(epoch, "ids")
    split = _query_split(cat, [epoch])
    k = min(int(k), len(train))
    rows_q = cat.rows_of(epoch, query_ids, split)
    norms = q_norms = None
    if metric == "cosine":
        norms = np.sqrt(kernels.sqnorms(scan, epoch, layers, client=client))
        q_all = norms if split == "train" else np.sqrt(kernels.sqnorms(scan, epoch, layers, split, client))
        q_norms = q_all[rows_q]
    if client is not None:
        from mstore_lightning.analytics import dask_engine

        names = [rep.name for rep in cat.select(layers)]
        scores, rows = dask_engine.topk(scan, epoch, rows_q, names, split, k, client, q_norms, norms)
    else:
        scores = np.zeros((len(query_ids), 0), dtype=np.float64)
        rows = np.zeros((len(query_ids), 0), dtype=np.int64)
        window = max(1, SCORE_BYTES // (8 * max(1, len(query_ids))))
        # Training rows as queries are taken from the scan that reads them anyway.
        xa = rows_q if split == "train" else kernels.gather(scan, epoch, query_ids, layers, split)
        for first, block in kernels.dot_windows(scan, epoch, xa, layers, window):
            if norms is not None:
                block = cosines(block, q_norms, norms[first : first + block.shape[1]])
            scores, rows = merge_best(scores, rows, block, np.arange(first, first + block.shape[1]), k)
    return Neighbours(train[rows], scores)


# Scores of one window of training rows held at once by a local top-k: 64 MB, 8M rows for one query.
SCORE_BYTES = 64 << 20


def _query_split(cat: Catalog, epochs: list[int]) -> str:
    return "query" if epochs and all(cat.has_queries(e) for e in epochs) else "train"


def _epochs(cat: Catalog, epochs: Sequence[int] | None) -> list[int]:
    return list(cat.epochs) if epochs is None else [int(e) for e in epochs]
