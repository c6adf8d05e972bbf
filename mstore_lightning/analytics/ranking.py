"""Scores by sample id: running sums over epochs, and the ``k`` best per query.

Every operator that sums over epochs (self-influence, TracIn, the reports, the CLI) sums through
:class:`RunningSum`, and every top-``k`` goes through :func:`merge_best`, so ties and repeated ids are
treated one way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_TINY = np.finfo(np.float64).tiny


class RunningSum:
    """``Σ`` of arrays whose last axis is indexed by sample id, over a growing set of ids.

    An id named several times in one ``add`` (a sampler with replacement) adds every value.

    Example:
        >>> run = RunningSum()
        >>> run.add(np.array([3, 1]), np.array([1.0, 2.0]), epochs=[0])
        >>> run.add(np.array([1, 5]), np.array([10.0, 20.0]), epochs=[1])
        >>> run.ids.tolist(), run.values.tolist(), sorted(run.epochs)
        ([1, 3, 5], [12.0, 1.0, 20.0], [0, 1])
    """

    def __init__(self) -> None:
        self.ids = np.zeros(0, dtype=np.int64)
        self.values: np.ndarray | None = None
        self.epochs: set[int] = set()

    def add(self, ids: np.ndarray, values: np.ndarray, epochs: Iterable[int] = ()) -> None:
        """Adds ``values``, whose last axis follows ``ids``; ``epochs`` records what they sum over."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if self.values is None:
            self.ids = np.unique(ids)
            self.values = np.zeros((*values.shape[:-1], len(self.ids)), dtype=np.float64)
        at = np.searchsorted(self.ids, ids)
        known = at < len(self.ids)
        known[known] = self.ids[at[known]] == ids[known]
        if not known.all():  # new ids: grow, keeping the sums so far
            union = np.union1d(self.ids, ids[~known])
            grown = np.zeros((*values.shape[:-1], len(union)), dtype=np.float64)
            grown[..., np.searchsorted(union, self.ids)] = self.values
            self.ids, self.values = union, grown
            at = np.searchsorted(union, ids)
        scatter_add(self.values, at, values)
        self.epochs.update(int(e) for e in epochs)

    def scores(self) -> np.ndarray:
        """The sums, aligned with :attr:`ids` (empty before the first ``add``)."""
        return self.values if self.values is not None else np.zeros(0, dtype=np.float64)


def scatter_add(scores: np.ndarray, columns: np.ndarray, values: np.ndarray) -> None:
    """``scores[..., columns] += values``, a column named twice counted twice."""
    if len(columns) and columns[-1] - columns[0] == len(columns) - 1 and np.all(columns[1:] > columns[:-1]):
        scores[..., columns[0] : columns[-1] + 1] += values  # a run of columns: no gather, no scatter
    elif not len(columns) or np.bincount(columns).max() == 1:
        scores[..., columns] += values  # each column once: np.add.at is an order of magnitude slower
    else:
        np.add.at(np.moveaxis(scores, -1, 0), columns, np.moveaxis(values, -1, 0))


def cosines(dots: np.ndarray, q_norms: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Inner products ``(queries, rows)`` divided by both norms (a zero norm scores 0, not NaN)."""
    return dots / np.maximum(np.outer(q_norms, norms), _TINY)


def merge_best(
    scores: np.ndarray, rows: np.ndarray, new_scores: np.ndarray, new_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best of its best so far (``scores``, ``rows``) and new candidates, all
    ``(queries, n)``: score descending, then row ascending, so the result does not depend on how
    the rows were split or in what order the pieces came. A NaN score ranks last.

    Example:
        >>> none = (np.zeros((1, 0)), np.zeros((1, 0), dtype=int))
        >>> s, r = merge_best(*none, np.array([[1.0, 3.0]]), np.array([[0, 1]]), k=2)
        >>> merge_best(s, r, np.array([[2.0, 3.0]]), np.array([[2, 3]]), k=2)  # a tie: the lower row first
        (array([[3., 3.]]), array([[1, 3]]))
    """
    scores = np.concatenate([scores, new_scores], 1)
    rows = np.concatenate([rows, np.broadcast_to(new_rows, new_scores.shape)], 1)
    nan = np.isnan(scores)  # the first sort key: a NaN ranks below -inf too
    keyed = np.where(nan, -np.inf, scores)
    if scores.shape[1] > k:
        kth = -np.partition(-keyed, k - 1, axis=1)[:, k - 1 : k]
        keep = keyed >= kth  # what beats the k-th score, and every tie with it
        if keep.sum() == keep.shape[0] * k:  # no tie at the cut: k per query
            picked = np.nonzero(keep)[1].reshape(len(keep), k)
        else:
            picked = np.stack([np.lexsort((rows[q], -keyed[q], nan[q]))[:k] for q in range(len(keep))])
        scores, rows, keyed, nan = (np.take_along_axis(a, picked, 1) for a in (scores, rows, keyed, nan))
    if not scores.size:
        return scores, rows
    order = np.lexsort((rows, -keyed, nan), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def best(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores of each row of ``scores`` (1-D or ``(queries, n)``), best
    first, ties to the lower position, NaN last.

    Example:
        >>> best(np.array([0.5, 2.0, np.nan, 2.0]), 3).tolist()
        [1, 3, 0]
    """
    flat = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if k < 1:
        return np.zeros((*np.shape(scores)[:-1], 0), dtype=np.int64)
    empty = np.zeros((flat.shape[0], 0))
    _, rows = merge_best(empty, empty.astype(np.int64), flat, np.arange(flat.shape[1]), max(int(k), 0))
    return rows if np.ndim(scores) > 1 else rows[0]
