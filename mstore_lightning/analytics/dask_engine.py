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
from typing import Any

import numpy as np
import torch

from mstore_lightning.analytics import kernels
from mstore_lightning.analytics.ranking import cosines, merge_best
from mstore_lightning.store.chunks import Chunk
from mstore_lightning.store.scan import Scan


def sqnorms(scan: Scan, epoch: int, layers: list[str], split: str, client: Any) -> np.ndarray:
    """Squared per-sample gradient norms over ``layers``, aligned with ``sample_ids(epoch, split)``."""
    total = np.zeros(scan.catalog.row_count(epoch, split), dtype=np.float64)
    for first, values in _run(scan, epoch, layers, split, client, _block_sqnorm, None):
        total[first : first + len(values)] += values
    return total


def dots(
    scan: Scan, epoch: int, rows_a: np.ndarray, layers: list[str], split_a: str, split_b: str, client: Any
) -> np.ndarray:
    """Inner products of the rows ``rows_a`` (of ``split_a``) with every row of ``split_b``."""
    out = np.zeros((len(rows_a), scan.catalog.row_count(epoch, split_b)), dtype=np.float64)
    for layer in layers:
        xa = _scattered(scan, epoch, layer, rows_a, split_a, client)
        for first, values in _run(scan, epoch, [layer], split_b, client, _block_gram, xa):
            out[:, first : first + values.shape[1]] += values
    return out


def topk(
    scan: Scan,
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

    source = _source(scan)
    xa = {layer: _scattered(scan, epoch, layer, rows_q, split_q, client) for layer in layers}
    n = scan.catalog.row_count(epoch)
    window = max([c.hi - c.lo for layer in layers for c in scan.source(epoch, layer).chunks()] or [1])
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


def _run(scan: Scan, epoch: int, layers: list[str], split: str, client: Any, fn: Any, extra: Any):
    source = _source(scan)
    futures, firsts = [], []
    for layer in layers:
        for c in _stored(scan, epoch, layer, split).chunks():
            futures.append(client.submit(fn, source, epoch, layer, split, c, extra, pure=False))
            firsts.append(c.first)
    for first, values in zip(firsts, client.gather(futures)):
        yield first, values


def _source(scan: Scan) -> tuple[str, str]:
    """What a task opens the store from on its worker: the URL and its storage options, as JSON."""
    cat = scan.catalog
    return cat.uri, json.dumps(cat.storage_options or {}, sort_keys=True)


def _stored(scan: Scan, epoch: int, layer: str, split: str = "train") -> Any:
    """``layer``'s rows, which a worker must be able to read from the store alone."""
    ok, why = scan.portable(epoch, layer)
    if not ok:
        raise ValueError(why)
    return scan.source(epoch, layer, split)


def _scattered(scan: Scan, epoch: int, layer: str, rows: np.ndarray, split: str, client: Any) -> dict:
    """The query rows of one layer, sent once to every worker."""
    got = _stored(scan, epoch, layer, split).gather(rows)
    return {k: client.scatter(v, broadcast=True) for k, v in got.items()}


@functools.lru_cache(maxsize=8)
def _open(uri: str, options: str) -> Scan:
    return Scan.open(uri, storage_options=json.loads(options) or None)


def _block_sqnorm(source: tuple[str, str], epoch: int, layer: str, split: str, chunk: Chunk, _: Any):
    src = _open(*source).source(epoch, layer, split)
    return src.rep.sqnorm(src.read_chunk(chunk)).numpy()


def _block_gram(
    source: tuple[str, str], epoch: int, layer: str, split: str, chunk: Chunk, xa: dict[str, Any]
):
    src = _open(*source).source(epoch, layer, split)
    xa = {k: torch.as_tensor(v) for k, v in xa.items()}
    return src.rep.gram(xa, src.read_chunk(chunk)).double().numpy()


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
    block = None
    for _, scores in kernels.dot_windows(_open(*source), epoch, xa, layers, hi - lo, start=lo, stop=hi):
        block = scores
    if norms is not None:
        block = cosines(block, q_norms, norms)
    empty = np.zeros((block.shape[0], 0))
    return merge_best(empty, empty.astype(np.int64), block, np.arange(lo, hi), k)
