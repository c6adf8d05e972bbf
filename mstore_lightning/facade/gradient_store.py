"""``open_store`` and ``GradientStore``: a read-only store, each method a few lines over the parts.

The catalog says what is stored, the scan streams a layer's rows (stored or recomputed), the
representations hold the kernels, and ``analytics`` composes them. Nothing is unpickled, and the
model is never needed (except to recompute layers an epoch did not store).

Example::

    store = open_store("runs/demo.zarr")
    ids = store.sample_ids(store.epochs[-1])
    norms = store.norms(store.epochs[-1])
    worst = ids[np.argsort(norms)[::-1][:20]]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from typing_extensions import Self

from mstore_lightning import analytics
from mstore_lightning.analytics import kernels
from mstore_lightning.capture.recompute import Recompute
from mstore_lightning.facade.info import StoreInfo
from mstore_lightning.store.scan import Scan

Ids = Sequence[int] | np.ndarray


class QueryResult(np.ndarray):
    """A float array of query results that says which layers made it an estimate.

    Attributes:
        approximate: ``{layer: why}`` for each layer stored pooled, projected or recomputed, or whose
            rows BatchNorm in training mode coupled (``batch-coupled``); empty
            when every value is exact up to the storage precision.
    """

    approximate: dict[str, str]

    def __new__(cls, values: np.ndarray, approximate: dict[str, str]) -> Self:
        out = np.asarray(values).view(cls)
        out.approximate = dict(approximate)
        return out

    def __array_finalize__(self, obj: Any) -> None:
        self.approximate = dict(getattr(obj, "approximate", {}) or {})


def open_store(
    uri: str | os.PathLike, storage_options: dict[str, Any] | None = None, *, cache_bytes: int = 0
) -> GradientStore:
    """Opens a gradient store read-only.

    Args:
        uri: local path or fsspec URL (``s3://...``) of the store.
        storage_options: passed to fsspec for URLs.
        cache_bytes: keep up to this many bytes of decoded chunks, least recently used first out,
            so that several queries on the same epochs read each chunk once. ``0`` (the default)
            keeps none: memory then follows one chunk, whatever the queries. Chunks that top-k
            scored on their int8 codes (Linear and GPT-2 ``Conv1D`` factors) are kept as codes, a
            quarter of their float size.
    """
    return GradientStore(Scan.open(uri, storage_options, cache_bytes))


class GradientStore(StoreInfo):
    """A read-only view of a gradient store. Use :func:`open_store` to get one.

    What is stored (epochs, layers, row records, bytes, ``describe()``) is :class:`StoreInfo`'s;
    the queries here read the rows.

    Attributes:
        scan: the public scan under every query (``scan.catalog`` for what is stored,
            ``scan.source(epoch, layer)`` for a layer's rows), for operators of your own.
    """

    def __init__(self, scan: Scan) -> None:
        super().__init__(scan.catalog)
        self.scan = scan

    # ---------------------------------------------------------------- gradients
    def restore(self, epoch: int, layer: str, ids: Ids, split: str = "train") -> dict[str, torch.Tensor]:
        """Per-sample gradients of ``layer``'s captured parameters for samples ``ids``.

        Returns:
            ``{param name: tensor of shape (len(ids), *param.shape)}``.
        """
        src = self.scan.source(epoch, layer, split)
        src.rep.check_restore()  # a projection refuses before anything is read
        return src.rep.restore(src.gather(self.catalog.rows_of(epoch, ids, split)))

    def factors(self, epoch: int, layer: str, ids: Ids, split: str = "train") -> dict[str, torch.Tensor]:
        """The stored arrays of ``layer`` for samples ``ids``, decoded: ``{"a": ..., "d": ...}`` for a
        factored layer (rows ``(len(ids), uses, ...)``), per-parameter gradients for a full one."""
        return self.scan.source(epoch, layer, split).gather(self.catalog.rows_of(epoch, ids, split))

    def blocks(self, epoch: int, layer: str) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Streams ``layer``'s decoded rows of ``epoch`` one chunk at a time.

        Yields:
            ``(first, rows)``: the position of the block's first row in :meth:`sample_ids`, and the
            stored arrays as the layer's family reads them (pooled maps repeated over their blocks).
        """
        src = self.scan.source(epoch, layer)
        for block in src.blocks():
            yield block.first, src.rep.unpacked(block.load())

    def norms(
        self,
        epoch: int,
        layers: Sequence[str] | None = None,
        *,
        split: str = "train",
        client: Any = None,
        kept: bool = True,
    ) -> np.ndarray:
        """Per-sample gradient L2 norm over ``layers``, aligned with :meth:`sample_ids`.

        Where the capture kept every asked-for layer's squared norms (full gradients, and linear
        layers with one position per sample), they are read: exact, before any quantization.
        Otherwise, or with ``kept=False``, they are computed on the stored factors, chunk by chunk,
        without restoring gradients (what ``dot`` and the other operators see); with a
        ``distributed.Client``, one Dask task per chunk on its workers.
        """
        total = kernels.sqnorms(self.scan, epoch, layers, split, client, kept)
        return QueryResult(np.sqrt(total), self.scan.approximate(epoch, layers))

    def dot(
        self,
        epoch: int,
        ids_a: Ids,
        ids_b: Ids,
        layers: Sequence[str] | None = None,
        *,
        split_a: str = "train",
        split_b: str = "train",
        client: Any = None,
    ) -> np.ndarray:
        """``(len(ids_a), len(ids_b))`` per-sample gradient inner products over ``layers``.

        Computed on the factors as ``Σ_{t,s} (a_t·a'_s)(d_t·d'_s)``; ``ids_b`` streams in blocks.
        ``split_a="query"`` takes the first ids among the epoch's query rows.
        """
        out = kernels.dot(self.scan, epoch, ids_a, ids_b, layers, split_a, split_b, client)
        return QueryResult(out, self.scan.approximate(epoch, layers))

    # ---------------------------------------------------------------- analytics
    def cosine(self, epoch: int, ids_a: Ids, ids_b: Ids, layers: Sequence[str] | None = None) -> np.ndarray:
        """``(len(ids_a), len(ids_b))`` cosines between per-sample gradients."""
        out = analytics.cosine(self.scan, epoch, ids_a, ids_b, layers)
        return QueryResult(out, self.scan.approximate(epoch, layers))

    def class_gradients(self, epoch: int, layers: Sequence[str] | None = None) -> analytics.ClassGradients:
        """Per-class sums of per-sample gradients; see :func:`mstore_lightning.analytics.class_gradients`."""
        return analytics.class_gradients(self.scan, epoch, layers)

    def class_conflicts(self, epoch: int, layers: Sequence[str] | None = None) -> analytics.ClassConflicts:
        """Cosines between class gradients and the samples opposing their class's; see
        :func:`mstore_lightning.analytics.class_conflicts`."""
        out = analytics.class_conflicts(self.scan, epoch, layers)
        out.ids = out.ids.copy()
        return out

    def outliers(
        self, epoch: int, threshold: float = 3.5, layers: Sequence[str] | None = None
    ) -> analytics.Outliers:
        """Samples with unusually large gradients; see :func:`mstore_lightning.analytics.outliers`."""
        out = analytics.outliers(self.scan, epoch, threshold, layers)
        return dataclasses.replace(out, scores=self._flagged(out.scores, [epoch], layers))

    def cluster(
        self, epoch: int, k: int, dim: int = 16, layers: Sequence[str] | None = None, seed: int = 0
    ) -> analytics.Clusters:
        """k-means on seeded gradient sketches; see :func:`mstore_lightning.analytics.cluster`."""
        return analytics.cluster(self.scan, epoch, k, dim, layers, seed)

    def self_influence(
        self, epochs: Sequence[int] | None = None, layers: Sequence[str] | None = None, client: Any = None
    ) -> analytics.Influence:
        """``(ids, scores)``: ``Σ_e lr_e ‖g_i(e)‖²`` per sample; see :mod:`mstore_lightning.analytics`."""
        out = analytics.self_influence(self.scan, epochs, layers, client)
        return analytics.Influence(out.ids, self._flagged(out.scores, epochs, layers))

    def tracin(
        self,
        query_ids: Ids,
        epochs: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        client: Any = None,
    ) -> analytics.Influence:
        """``(ids, scores)`` with scores ``(len(query_ids), len(ids))``: ``Σ_e lr_e ⟨g_train, g_query⟩``."""
        out = analytics.tracin(self.scan, query_ids, epochs, layers, client)
        return analytics.Influence(out.ids, self._flagged(out.scores, epochs, layers))

    def suspects(
        self, epochs: Sequence[int] | None = None, k: int | None = None, layers: Sequence[str] | None = None
    ) -> analytics.Suspects:
        """Every training id ranked most suspicious first, with the signals behind each score and
        the flags ``conflicting`` and ``duplicate_conflict`` (see ``analytics.suspects``).

        Example:
            >>> top = store.suspects(k=20)                                   # doctest: +SKIP
            >>> top.to_pandas()[["id", "score", "loss", "margin", "conflicting"]]  # doctest: +SKIP
        """
        return analytics.suspects(self.scan, epochs, k, layers)

    def topk(
        self,
        query_ids: Ids,
        k: int,
        epoch: int | None = None,
        metric: str = "cosine",
        layers: Sequence[str] | None = None,
        client: Any = None,
    ) -> analytics.Neighbours:
        """Per query, ``k`` training ids and scores, best first (``metric`` ``"cosine"`` or ``"dot"``)."""
        out = analytics.topk(self.scan, query_ids, k, epoch, metric, layers, client)
        epochs = [epoch] if epoch is not None else None
        return analytics.Neighbours(out.ids, self._flagged(out.scores, epochs, layers))

    def _flagged(
        self, scores: np.ndarray, epochs: Sequence[int] | None, layers: Sequence[str] | None
    ) -> QueryResult:
        """``scores`` as a :class:`QueryResult` naming the layers that made them estimates."""
        why: dict[str, str] = {}
        for epoch in self.epochs if epochs is None else epochs:
            why.update(self.scan.approximate(epoch, layers))
        return QueryResult(scores, why)

    # ---------------------------------------------------------------- recompute
    def attach_recompute(
        self,
        model: torch.nn.Module,
        dataset: Any,
        *,
        collate_fn: Any = None,
        loss_fn: Any = None,
        batch_size: int = 64,
    ) -> None:
        """Gives the store what it needs to recompute layers that an epoch did not store.

        Args:
            model: a model of the trained architecture; it is copied, and the copy gets each epoch's
                stored weights, so ``model`` itself is never changed.
            dataset: the training data, indexable by sample id.
            collate_fn: builds a batch from items (``default_collate`` by default).
            loss_fn: ``callable(model, batch) -> loss``; by default ``training_step(batch, 0)``.
            batch_size: samples per recompute pass.
        """
        self.scan.recompute = Recompute(model, dataset, collate_fn, loss_fn, batch_size)
