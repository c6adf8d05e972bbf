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
        lay = store._layer(layer)
        xa = {
            k: client.scatter(v, broadcast=True)
            for k, v in store._gather(epoch, lay, rows_a, split_a).items()
        }
        for first, values in _run(store, epoch, [layer], split_b, client, _block_gram, xa):
            out[:, first : first + values.shape[1]] += values
    return out


def _run(store: GradientStore, epoch: int, layers: list[str], split: str, client: Any, fn: Any, extra: Any):
    source = (store.uri, json.dumps(store.storage_options or {}, sort_keys=True))
    futures, firsts = [], []
    for layer in layers:
        lay = store._layer(layer)
        if store._is_recomputed(epoch, lay):
            raise ValueError(f"Layer {layer!r} is recomputed in epoch {epoch}; run it without a Dask client.")
        for r, lo, hi, first in store._chunks(epoch, lay, split):
            futures.append(client.submit(fn, source, epoch, layer, split, r, lo, hi, extra, pure=False))
            firsts.append(first)
    for first, values in zip(firsts, client.gather(futures)):
        yield first, values


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
