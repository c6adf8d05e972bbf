"""The Dask path: the same chunk kernels, one task per stored chunk, on a ``distributed`` cluster.

Each task opens the store by its URL on the worker (once per worker process), decodes one chunk of
one layer (references to deduplicated rows and k-bit tables included) and returns only its result:
squared norms, or inner products with a few gathered rows. The client adds the pieces up, so neither
the client nor any worker holds more than a chunk of factors at a time. Workers must reach the store:
a shared file system, or an object store (``s3://...`` with its ``storage_options``). Pass the
client to an operator: ``store.norms(3, client=distributed.Client("scheduler:8786"))``.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mstore_lightning.store.reader import GradientStore


def sqnorms(store: GradientStore, epoch: int, layers: list[str], split: str, client: Any) -> np.ndarray:
    """Squared per-sample gradient norms over ``layers``, aligned with ``sample_ids(epoch, split)``."""
    total = np.zeros(len(store.sample_ids(epoch, split)), dtype=np.float64)
    for first, values in _run(store, epoch, layers, split, client, _block_sqnorm, None):
        total[first : first + len(values)] += values
    return total


def dots(
    store: GradientStore,
    epoch: int,
    rows_a: np.ndarray,
    layers: list[str],
    split_a: str,
    split_b: str,
    client: Any,
) -> np.ndarray:
    """Inner products of the rows ``rows_a`` (of ``split_a``) with every row of ``split_b``."""
    out = np.zeros((len(rows_a), len(store.sample_ids(epoch, split_b))), dtype=np.float64)
    for layer in layers:
        xa = _scattered(store, epoch, store._layer(layer), rows_a, split_a, client)
        for first, values in _run(store, epoch, [layer], split_b, client, _block_gram, xa):
            out[:, first : first + values.shape[1]] += values
    return out


def topk(
    store: GradientStore,
    epoch: int,
    rows_q: np.ndarray,
    layers: list[str],
    split_q: str,
    k: int,
    client: Any,
    q_norms: np.ndarray | None = None,
    norms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best training rows of ``epoch``: ``(scores, rows)``, both ``(queries, k)``.

    One task per window of training rows (the longest chunk of ``layers``) scores it against the
    queries over every layer and returns only its ``k`` best per query; the client merges them as
    they finish. With ``norms`` and ``q_norms`` the scores are cosines.
    """
    from distributed import as_completed

    from mstore_lightning.analytics.ranking import merge_best

    source = _source(store)
    lays = [_stored(store, epoch, name) for name in layers]
    xa = {lay.name: _scattered(store, epoch, lay, rows_q, split_q, client) for lay in lays}
    n = len(store.sample_ids(epoch))
    window = max([hi - lo for lay in lays for _, lo, hi, _ in store._chunks(epoch, lay)] or [1])
    futures = [
        client.submit(
            _window_topk,
            source,
            epoch,
            layers,
            lo,
            min(lo + window, n),
            xa,
            k,
            q_norms,
            None if norms is None else norms[lo : lo + window],
            pure=False,
        )
        for lo in range(0, n, window)
    ]
    scores = np.zeros((len(rows_q), 0), dtype=np.float64)
    rows = np.zeros((len(rows_q), 0), dtype=np.int64)
    for future in as_completed(futures):
        scores, rows = merge_best(scores, rows, *future.result(), k)
        future.release()
    return scores, rows


def _run(store: GradientStore, epoch: int, layers: list[str], split: str, client: Any, fn: Any, extra: Any):
    source = _source(store)
    futures, firsts = [], []
    for layer in layers:
        lay = _stored(store, epoch, layer)
        for r, lo, hi, first in store._chunks(epoch, lay, split):
            futures.append(client.submit(fn, source, epoch, layer, split, r, lo, hi, extra, pure=False))
            firsts.append(first)
    for first, values in zip(firsts, client.gather(futures)):
        yield first, values


def _source(store: GradientStore) -> tuple[str, str]:
    """What a task opens the store from on its worker: the URL and its storage options, as JSON."""
    return store.uri, json.dumps(store.storage_options or {}, sort_keys=True)


def _stored(store: GradientStore, epoch: int, layer: str) -> Any:
    """``layer``, which ``epoch`` must have stored: workers have no model to recompute it with."""
    lay = store._layer(layer)
    if store._is_recomputed(epoch, lay):
        raise ValueError(f"Layer {layer!r} is recomputed in epoch {epoch}; run it without a Dask client.")
    return lay


def _scattered(store: GradientStore, epoch: int, lay: Any, rows: np.ndarray, split: str, client: Any) -> dict:
    """The query rows of one layer, sent once to every worker."""
    return {k: client.scatter(v, broadcast=True) for k, v in store._gather(epoch, lay, rows, split).items()}


@functools.lru_cache(maxsize=8)
def _open(uri: str, options: str) -> GradientStore:
    from mstore_lightning.store.reader import open_store

    return open_store(uri, storage_options=json.loads(options) or None)


def _block_sqnorm(
    source: tuple[str, str], epoch: int, layer: str, split: str, r: int, lo: int, hi: int, _: Any
):
    from mstore_lightning.store.reader import _sqnorm

    store = _open(*source)
    lay = store._layer(layer)
    return _sqnorm(lay, store._chunk(epoch, lay, split, r, lo, hi)).double().numpy()


def _block_gram(
    source: tuple[str, str], epoch: int, layer: str, split: str, r: int, lo: int, hi: int, xa: dict[str, Any]
):
    from mstore_lightning.store.reader import _gram

    store = _open(*source)
    lay = store._layer(layer)
    xa = {k: torch.as_tensor(v) for k, v in xa.items()}
    return _gram(lay, xa, store._chunk(epoch, lay, split, r, lo, hi)).double().numpy()


def _window_topk(
    source: tuple[str, str],
    epoch: int,
    layers: list[str],
    lo: int,
    hi: int,
    xa: dict[str, dict[str, Any]],
    k: int,
    q_norms: np.ndarray | None,
    norms: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    from mstore_lightning.analytics.ranking import cosines, merge_best

    store = _open(*source)
    block = None
    for _, scores in store._dot_windows(epoch, None, layers, "train", hi - lo, start=lo, stop=hi, xa=xa):
        block = scores
    if norms is not None:
        block = cosines(block, q_norms, norms)
    empty = np.zeros((block.shape[0], 0))
    return merge_best(empty, empty.astype(np.int64), block, np.arange(lo, hi), k)
