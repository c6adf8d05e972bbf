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
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mstore_lightning.analytics.frames import frame
from mstore_lightning.analytics.ranking import cosines, merge_best, scatter_add

if TYPE_CHECKING:
    from mstore_lightning.store.reader import GradientStore


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
    store: GradientStore,
    epochs: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    client: Any = None,
) -> Influence:
    """``Σ_e lr_e ‖g_i(e)‖²`` for every sample captured in ``epochs`` (all committed by default)."""
    epochs = _epochs(store, epochs)
    store.preload(epochs, ("ids", "sqnorm"))  # norms kept at capture, where they were
    ids = _union_ids(store, epochs)
    scores = np.zeros(len(ids), dtype=np.float64)
    for e in epochs:
        rows = np.searchsorted(ids, store.sample_ids(e))
        np.add.at(scores, rows, store.lr(e) * np.asarray(store.norms(e, layers, client=client)) ** 2)
    return Influence(ids, scores)


def tracin(
    store: GradientStore,
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
    epochs = _epochs(store, epochs)
    split = _query_split(store, epochs)
    query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
    ids = _union_ids(store, epochs)
    scores = np.zeros((len(query_ids), len(ids)), dtype=np.float64)
    runs = (
        [epochs] if client is not None else store._in_batches(epochs, store._select(layers), [split, "train"])
    )
    for run in runs:
        for e in run:
            train = store.sample_ids(e)
            dots = store.dot(e, query_ids, train, layers, split_a=split, client=client)
            scatter_add(scores, np.searchsorted(ids, train), store.lr(e) * np.asarray(dots))
    return Influence(ids, scores)


def topk(
    store: GradientStore,
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
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}.")
    epoch = store.epochs[-1] if epoch is None else epoch
    query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
    train = store.sample_ids(epoch)
    split = _query_split(store, [epoch])
    k = min(int(k), len(train))
    norms = q_norms = None
    if metric == "cosine":
        norms = np.asarray(store.norms(epoch, layers, client=client))
        q_all = (
            norms if split == "train" else np.asarray(store.norms(epoch, layers, split=split, client=client))
        )
        q_norms = q_all[store._rows_of(epoch, query_ids, split)]
    if client is not None:
        from mstore_lightning.analytics import dask_engine

        names = [lay.name for lay in store._select(layers)]
        rows_q = store._rows_of(epoch, query_ids, split)
        scores, rows = dask_engine.topk(store, epoch, rows_q, names, split, k, client, q_norms, norms)
    else:
        scores = np.zeros((len(query_ids), 0), dtype=np.float64)
        rows = np.zeros((len(query_ids), 0), dtype=np.int64)
        window = max(1, SCORE_BYTES // (8 * max(1, len(query_ids))))
        for first, block in store._dot_windows(epoch, query_ids, layers, split, window):
            if norms is not None:
                block = cosines(block, q_norms, norms[first : first + block.shape[1]])
            scores, rows = merge_best(scores, rows, block, np.arange(first, first + block.shape[1]), k)
    return Neighbours(train[rows], scores)


# Scores of one window of training rows held at once by a local top-k: 64 MB, 8M rows for one query.
SCORE_BYTES = 64 << 20


def _query_split(store: GradientStore, epochs: list[int]) -> str:
    return "query" if epochs and all(store.has_queries(e) for e in epochs) else "train"


def _epochs(store: GradientStore, epochs: Sequence[int] | None) -> list[int]:
    return list(store.epochs) if epochs is None else [int(e) for e in epochs]


def _union_ids(store: GradientStore, epochs: list[int]) -> np.ndarray:
    store.preload(epochs, ("ids",))
    parts = [store.sample_ids(e) for e in epochs]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
