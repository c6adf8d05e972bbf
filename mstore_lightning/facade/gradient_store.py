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
from mstore_lightning.facade.describe import describe
from mstore_lightning.store.layout import MARGINS
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
            keeps none: memory then follows one chunk, whatever the queries.
    """
    return GradientStore(Scan.open(uri, storage_options, cache_bytes))


class GradientStore:
    """A read-only view of a gradient store. Use :func:`open_store` to get one.

    Attributes:
        scan: the public scan under every query (``scan.catalog`` for what is stored,
            ``scan.source(epoch, layer)`` for a layer's rows), for operators of your own.
    """

    def __init__(self, scan: Scan) -> None:
        self.scan = scan
        self.catalog = scan.catalog
        self.uri, self.storage_options = scan.catalog.uri, scan.catalog.storage_options
        self.meta: dict[str, Any] = scan.catalog.meta

    # ---------------------------------------------------------------- what is there
    @property
    def epochs(self) -> list[int]:
        """Committed epochs, ascending. An epoch still being written is not listed."""
        return self.catalog.epochs

    @property
    def layers(self) -> list[str]:
        """Captured module names."""
        return self.catalog.layers

    @property
    def uncovered(self) -> list[dict[str, Any]]:
        """Selected parameters that are not captured, with the reason for each."""
        return list(self.meta.get("uncovered", []))

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.meta.get("policy", {}))

    def layer_spec(self, layer: str) -> dict[str, Any]:
        self.catalog.rep(layer)
        return dict(self.meta["layers"][layer])

    def parameters(self, layer: str) -> dict[str, str]:
        """The model parameter that each key of :meth:`restore` for ``layer`` is.

        A module's own parameters are ``"<layer>.<key>"``. The layers of an ``nn.MultiheadAttention``
        (its in-projection ``<name>.in_proj``, or ``q_proj``/``k_proj``/``v_proj``, and ``bias_k``/
        ``bias_v``) name the attention module's parameter, with the rows of a slice.

        Example:
            ``store.parameters("enc.self_attn.in_proj")`` is
            ``{"weight": "enc.self_attn.in_proj_weight", "bias": "enc.self_attn.in_proj_bias"}``.
        """
        spec = self.layer_spec(layer)
        of, owner = spec["hyper"].get("params_of", {}), spec.get("fed_by", {}).get("module")
        return {p: f"{owner}.{of[p]}" if p in of else f"{layer}.{p}" for p in spec["params"]}

    def approximate(self, layer: str) -> str | None:
        """Why ``layer``'s results are estimates (pooled or projected), or ``None`` when exact."""
        return self.catalog.rep(layer).approximate

    def recomputed(self, epoch: int) -> list[str]:
        """Layers of ``epoch`` stored as weights to recompute from, not as rows."""
        return self.catalog.recomputed(epoch)

    def lr(self, epoch: int) -> float:
        """The learning rate in force at the start of ``epoch`` (first optimizer, first group)."""
        return self.catalog.lr(epoch)

    def sample_ids(self, epoch: int, split: str = "train") -> np.ndarray:
        """Global dataset index of each captured row of ``epoch``: training rows, or with
        ``split="query"`` the query samples captured at the epoch's end (``GradientCapture(query=)``).

        A fresh array the caller may write to (``torch.as_tensor`` takes it without a warning); the
        store keeps its own read-only copy for its queries."""
        return self.catalog.row_field(epoch, "ids", split).copy()

    def row_count(self, epoch: int, split: str = "train") -> int:
        """Rows of ``epoch``'s ``split``, read from its arrays' metadata alone."""
        return self.catalog.row_count(epoch, split)

    def has_queries(self, epoch: int) -> bool:
        """Whether ``epoch`` holds query rows."""
        return self.catalog.has_queries(epoch)

    def row_field(self, epoch: int, field: str, split: str = "train") -> np.ndarray:
        """One per-row record of ``epoch``: ``ids``, ``step``, ``loss``, ``label``, ``lr``, or
        ``margin`` (NaN where the capture saw no logits); a fresh, writable array."""
        if field == MARGINS:
            parts = self.catalog.optional_records(epoch, MARGINS, split)
            if parts is None:
                return np.full(self.row_count(epoch, split), np.nan, dtype=np.float32)
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return self.catalog.row_field(epoch, field, split).copy()

    def preload(self, epochs: Sequence[int], records: Sequence[str] = (), split: str = "train") -> None:
        """Reads the metadata of ``epochs`` and their row ``records`` in a few round trips, however
        many epochs: on a store of small epochs those trips, not the bytes, are what a query costs."""
        self.catalog.preload(epochs, records, split)

    def nonfinite(self, epoch: int) -> np.ndarray:
        """Ids of ``epoch``'s training samples whose captured gradients hold NaN or Inf (the first
        1,000 of each process)."""
        ids = [i for attrs in self.catalog.rank_attrs(epoch, "nonfinite") for i in attrs.get("ids", [])]
        return np.asarray(sorted(ids), dtype=np.int64)

    def dropped(self, epoch: int) -> int:
        """Rows of ``epoch`` not stored because the writer was behind (``on_pressure="drop"``)."""
        return sum(int(attrs.get("rows", 0)) for attrs in self.catalog.rank_attrs(epoch, "dropped"))

    def dedup_stats(self, epoch: int | None = None) -> dict[str, dict[str, int]]:
        """What deduplication saved, by ``"<layer>/<array>"``, summed over ranks (and epochs).

        Each entry holds ``rows`` looked at, ``duplicates`` stored as references, ``bytes_saved``
        (uncompressed bytes of those rows) and hash ``collisions`` caught by the byte check.
        """
        total: dict[str, dict[str, int]] = {}
        for ep in [epoch] if epoch is not None else self.epochs:
            for attrs in self.catalog.rank_attrs(ep, "dedup"):
                for key, stats in dict(attrs.get("arrays", {})).items():
                    into = total.setdefault(key, {})
                    for k, v in stats.items():
                        into[k] = into.get(k, 0) + int(v)
        return total

    def dedup_saved(self, epoch: int | None = None) -> dict[str, dict[str, int]]:
        """What deduplication saved, by ``"<layer>/<array>"``, in the units a disk shows.

        Each entry holds ``rows_as_references`` (rows stored as references), ``uncompressed_bytes``
        (what those rows would take before compression) and ``disk_bytes``: an estimate of the bytes
        on disk saved, the rows times the array's on-disk bytes per row where it stored rows in place
        (over every committed epoch), less the references' own bytes. ``disk_bytes`` is ``-1``
        where no epoch stored the array's rows in place, so there is nothing to estimate from.
        """
        epochs = [epoch] if epoch is not None else self.epochs
        every = {ep: self.dedup_stats(ep) for ep in self.epochs}  # the rows stored in place, by epoch
        out: dict[str, dict[str, int]] = {}
        for key, stats in self.dedup_stats(epoch).items():
            layer, _, array = key.rpartition("/")
            in_place, disk = 0, 0
            for ep, by_key in every.items():
                s = by_key.get(key, {})
                in_place += s.get("rows", 0) - s.get("duplicates", 0)
                disk += self.catalog.array_bytes(ep, layer, array)
            refs = sum(self.catalog.array_bytes(ep, layer, f"{array}_ref") for ep in epochs)
            per_row = disk / in_place if in_place else None
            out[key] = {
                "rows_as_references": stats.get("duplicates", 0),
                "uncompressed_bytes": stats.get("bytes_saved", 0),
                "disk_bytes": -1
                if per_row is None
                else max(0, round(stats.get("duplicates", 0) * per_row) - refs),
            }
        return out

    def nbytes_stored(self, epoch: int | None = None, layer: str | None = None) -> int:
        """Bytes stored for the whole store, one committed epoch, or one layer (in one epoch or all).

        Sums the sizes of the store's files, or of its objects for a URL store (one listing each).
        """
        return self.catalog.nbytes_stored(epoch, layer)

    def describe(self) -> str:
        """A human-readable summary: epochs, layers, representation, bytes, and what is not captured."""
        return describe(self)

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
