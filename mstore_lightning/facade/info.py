"""``StoreInfo``: what a store holds, read from its metadata and row records alone.

No row is read and torch is never imported, so describing a store (``mstore inspect``) starts in
a fraction of a second. :class:`~mstore_lightning.facade.gradient_store.GradientStore` adds the
queries that read rows.

Example::

    info = StoreInfo.open("runs/demo.zarr")
    print(info.describe())
    ids = info.sample_ids(info.epochs[-1])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mstore_lightning.core import notes
from mstore_lightning.facade.describe import describe
from mstore_lightning.store.catalog import Catalog
from mstore_lightning.store.layout import MARGINS


class StoreInfo:
    """What a store holds: epochs, layers and their specs, row records, bytes.

    Attributes:
        catalog: the store's metadata side (``store.catalog``).
        uri: where the store is.
        storage_options: fsspec options of a URL store.
        meta: the run's root metadata.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.uri, self.storage_options = catalog.uri, catalog.storage_options
        self.meta: dict[str, Any] = catalog.meta

    @classmethod
    def open(cls, uri: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> StoreInfo:
        """Opens the store at a local path or fsspec URL, read-only, for its metadata."""
        return cls(Catalog.open(uri, storage_options))

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
        return dict(self.catalog.spec(layer))

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
        return notes.approximate(self.catalog.spec(layer))

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
