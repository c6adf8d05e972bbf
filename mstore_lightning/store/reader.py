"""Reading a gradient store: rows, restored gradients, and norms and inner products on the factors.

Everything streams: norms read one chunk of one layer at a time, and inner products read the rows of
``ids_a`` once and stream ``ids_b`` in blocks. Nothing is unpickled, and the model is never needed.

Example::

    store = open_store("runs/demo.zarr")
    ids = store.sample_ids(store.epochs[-1])
    norms = store.norms(store.epochs[-1])
    worst = ids[np.argsort(norms)[::-1][:20]]
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
import zarr.storage
from typing_extensions import Self
from zarr.core.sync import sync as zarr_sync

from mstore_lightning.core import pooling
from mstore_lightning.core.families.kron import kron_gram, kron_sqnorm
from mstore_lightning.core.families.registry import Extractor, extractor_for_kind, flat_gram
from mstore_lightning.core import quant
from mstore_lightning.store import layout
from mstore_lightning.store.dedup import NO_REF
from mstore_lightning.store.lanes import Lanes
from mstore_lightning.store.zarr_io import (
    DAMAGE,
    ReadStore,
    StoreReadError,
    anode,
    check_crc,
    check_rows,
    node,
    object_sizes,
    open_many,
    require_chunks,
    take_many,
)

_BLOCK_ROWS = 1024  # rows of ``ids_b`` per block in ``dot``
_STAGE_BYTES = 64 << 20  # decoded bytes that _in_batches reads ahead in one batch


@dataclass(frozen=True)
class _Layer:
    spec: dict[str, Any]
    extractor: type[Extractor]

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def params(self) -> list[str]:
        return self.spec["params"]

    @property
    def factored(self) -> bool:
        return self.spec["representation"] == "factors"

    @property
    def approximate(self) -> str | None:
        """Why results from this layer are estimates, or ``None`` when they are exact up to precision."""
        if self.spec["representation"] == "projection":
            p = self.spec["projection"]
            return (
                f"Kronecker projection {p['k_out']}x{p['k_in']} (seed {p['seed']}): unbiased, relative "
                f"error std <= {p['predicted_error']:.3g}"
            )
        if self.spec.get("summary", {}).get("pool"):
            return f"pooled {self.spec['summary']['pool']}x: block means of the convolution maps"
        return None

    def unpacked(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows as the extractor reads them: pooled maps repeated over their blocks."""
        summary = self.spec.get("summary")
        if not summary:
            return rows
        return {
            "a": pooling.unpool(rows["a"], summary["a_shape"], summary["pool"]),
            "d": pooling.unpool(rows["d"], summary["d_shape"], summary["pool"]),
        }


class QueryResult(np.ndarray):
    """A float array of query results that says which layers made it an estimate.

    Attributes:
        approximate: ``{layer: why}`` for each layer stored pooled or projected; empty when every
            value is exact up to the storage precision.
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
    uri = os.fspath(uri)
    if not layout.is_url(uri) and not os.path.isdir(uri):
        raise StoreReadError(f"No gradient store at {uri!r}: the directory does not exist.")
    store = ReadStore(layout.zarr_store(uri, storage_options, read_only=True))
    try:
        root = zarr.open_group(store, mode="r", zarr_format=layout.ZARR_FORMAT)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreReadError(f"{uri!r} is not a Zarr group, so not a gradient store.") from exc
    except DAMAGE as exc:
        raise StoreReadError(f"{uri!r}: the store's root metadata (zarr.json) is damaged: {exc}") from exc
    return GradientStore(root, uri, storage_options, cache_bytes=cache_bytes)


class GradientStore:
    """A read-only view of a gradient store. Use :func:`open_store` to get one."""

    def __init__(
        self,
        root: zarr.Group,
        uri: str = "",
        storage_options: dict[str, Any] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"`cache_bytes` must be a number of bytes >= 0, got {cache_bytes!r}.")
        self.uri = uri
        self._cache = _ChunkCache(cache_bytes)
        self.storage_options = storage_options
        self._root = root
        if layout.META_KEY not in root.attrs:
            raise StoreReadError(f"{uri!r} is a Zarr group without gradient-store metadata.")
        check_crc(dict(root.attrs), f"{uri!r} root metadata")
        self.meta: dict[str, Any] = dict(root.attrs[layout.META_KEY])
        version = self.meta.get("schema_version")
        if version != layout.SCHEMA_VERSION:
            raise StoreReadError(
                f"{uri!r} has store schema version {version}; this library reads version {layout.SCHEMA_VERSION}."
            )
        self._layers = {
            name: _Layer(spec, extractor_for_kind(spec["kind"]))
            for name, spec in self.meta.get("layers", {}).items()
            if spec.get("representation")
        }
        self._epoch_cache: dict[tuple[int, str], dict[str, Any]] = {}
        self._arrays: dict[tuple[str, str, str], zarr.Array] = {}
        self._fields: dict[tuple[int, str, str], np.ndarray] = {}
        self._records: dict[tuple[int, str, str], list[np.ndarray]] = {}  # per-rank rows/<name>
        self._committed_groups: dict[int, zarr.Group] = {}  # seen committed by `epochs`
        self._checked: set[tuple[str, str, str]] = set()  # arrays whose metadata matched their layer
        self._sizes: dict[int, dict[str, int]] = {}  # file sizes of committed epochs
        self._staged: dict[tuple, dict[str, torch.Tensor]] = {}  # chunks read ahead by _in_batches
        self._staged_at: set[tuple[int, str]] = set()  # their (epoch, split)s

    # ---------------------------------------------------------------- what is there
    @property
    def epochs(self) -> list[int]:
        """Committed epochs, ascending. An epoch still being written is not listed."""
        with warnings.catch_warnings():
            # A capture still running replaces metadata through temporary files; listing the folder
            # meanwhile shows them, and zarr warns about each.
            warnings.filterwarnings("ignore", "Object at .* is not recognized", category=UserWarning)
            zarr_sync(self._find_committed())
        out = sorted(self._committed_groups)
        lost = sorted(set(self.meta.get("committed", [])) - set(out))
        if lost:  # the run's metadata vouches for them; their groups are gone or no longer say committed
            raise StoreReadError(
                f"{self.uri!r}: epoch(s) {lost} were committed but their groups are missing or damaged; "
                "run `mstore verify` on the store."
            )
        return out

    async def _find_committed(self) -> None:
        """Lists the epoch groups and opens, together, those not yet known to be committed: a
        committed epoch never changes, so a report's many listings cost one store listing each."""
        root = self._root._async_group
        folder = f"{root.path}/{layout.EPOCHS}".strip("/")
        try:
            names = [k async for k in root.store_path.store.list_dir(folder)]
        except FileNotFoundError:
            names = []
        for e in [e for e in self._committed_groups if layout.epoch_key(e) not in names]:
            del self._committed_groups[e]  # its group is gone
        known = {layout.epoch_key(e) for e in self._committed_groups}
        new = sorted(k for k in names if k.isdigit() and k not in known)
        groups = await asyncio.gather(*(anode(root, f"{layout.EPOCHS}/{k}", missing_ok=True) for k in new))
        for group in groups:
            if not isinstance(group, zarr.AsyncGroup) or group.attrs.get("state") != layout.COMMITTED:
                continue
            try:
                epoch = int(group.attrs["epoch"])
            except DAMAGE as exc:
                raise StoreReadError(
                    f"The attributes of epoch group {group.path} are damaged ({exc})."
                ) from exc
            self._committed_groups[epoch] = zarr.Group(group)  # committed: it will not change

    @property
    def layers(self) -> list[str]:
        """Captured module names."""
        return list(self._layers)

    @property
    def uncovered(self) -> list[dict[str, Any]]:
        """Selected parameters that are not captured, with the reason for each."""
        return list(self.meta.get("uncovered", []))

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.meta.get("policy", {}))

    def layer_spec(self, layer: str) -> dict[str, Any]:
        return dict(self._layer(layer).spec)

    def approximate(self, layer: str) -> str | None:
        """Why ``layer``'s results are estimates (pooled or projected), or ``None`` when exact."""
        return self._layer(layer).approximate

    def recomputed(self, epoch: int) -> list[str]:
        """Layers of ``epoch`` stored as weights to recompute from, not as rows."""
        return [str(x) for x in self._epoch(epoch)["attrs"].get("recomputed", [])]

    def lr(self, epoch: int) -> float:
        """The learning rate in force at the start of ``epoch`` (first optimizer, first group)."""
        return float(self._epoch(epoch)["attrs"]["lr"])

    def sample_ids(self, epoch: int, split: str = "train") -> np.ndarray:
        """Global dataset index of each captured row of ``epoch``: training rows, or with
        ``split="query"`` the query samples captured at the epoch's end (``GradientCapture(query=)``)."""
        return self.row_field(epoch, "ids", split)

    def row_count(self, epoch: int, split: str = "train") -> int:
        """Rows of ``epoch``'s ``split``, read from its arrays' metadata alone."""
        return int(self._epoch(epoch, split)["offsets"][-1])

    def has_queries(self, epoch: int) -> bool:
        """Whether ``epoch`` holds query rows."""
        return bool(self._epoch(epoch, "query")["ranks"])

    def row_field(self, epoch: int, field: str, split: str = "train") -> np.ndarray:
        """One per-row record of ``epoch``: ``ids``, ``step``, ``loss``, ``label`` or ``lr``."""
        key = (epoch, field, split)
        if key not in self._fields:  # committed epochs never change: read each field once
            parts = self._rank_records(epoch, field, split)
            self._records.pop(key, None)  # kept whole below
            empty = np.zeros(0, dtype=np.float64 if field in ("loss", "lr") else np.int64)
            self._fields[key] = np.concatenate(parts) if parts else empty
            self._fields[key].flags.writeable = False
        return self._fields[key]

    def preload(self, epochs: Sequence[int], records: Sequence[str] = (), split: str = "train") -> None:
        """Reads the metadata of ``epochs`` and their row ``records`` (``rows/<name>``, where stored)
        in three round trips to zarr's event loop, however many epochs: on a store of small epochs
        those trips, not the bytes, are what a query costs."""
        self._load_epochs(epochs, split)
        wanted = [(e, n) for n in records for e in epochs if (e, n, split) not in self._fields]
        self._read_records(wanted, split, required=False)

    def _rank_records(self, epoch: int, name: str, split: str = "train") -> list[np.ndarray]:
        """``rows/<name>`` of each rank of ``epoch``, read once and kept."""
        self._read_records([(epoch, name)], split)
        return self._records[(epoch, name, split)]

    def _read_records(self, wanted: list[tuple[int, str]], split: str, required: bool = True) -> None:
        """Reads the per-rank ``rows/<name>`` of each ``(epoch, name)`` not yet kept, all together.

        With ``required=False`` a record that is not stored is left out rather than reported.
        """
        todo = [w for w in dict.fromkeys(wanted) if (*w, split) not in self._records]
        if not todo:
            return
        self._load_epochs([e for e, _ in todo], split)
        where = [(e, n, r, g) for e, n in todo for r, g in enumerate(self._epoch(e, split)["ranks"])]
        closed = [(g, n) for _, n, _, g in where if (g.path, "", n) not in self._arrays]
        for (g, n), arr in zip(closed, open_many([(g, f"{layout.ROWS}/{n}") for g, n in closed])):
            if arr is not None:
                self._arrays[(g.path, "", n)] = arr
        lacking = set()
        for e, n, _, g in where:
            if (g.path, "", n) not in self._arrays:
                if required:
                    raise StoreReadError(f"{g.path}/{layout.ROWS}/{n} is missing from the store.")
                lacking.add((e, n))
        jobs = [(e, n, r, self._arrays[(g.path, "", n)]) for e, n, r, g in where if (e, n) not in lacking]
        for e, _, r, arr in jobs:
            offsets = self._epoch(e, split)["offsets"]
            check_rows(arr, int(offsets[r + 1] - offsets[r]))
        values = take_many([(arr, slice(None)) for *_, arr in jobs]) if jobs else []
        for e, n in todo:
            if (e, n) not in lacking:
                self._records[(e, n, split)] = []
        for (e, n, _, arr), got in zip(jobs, values):
            require_chunks(arr)
            self._records[(e, n, split)].append(got)

    # ---------------------------------------------------------------- gradients
    def restore(
        self, epoch: int, layer: str, ids: Sequence[int] | np.ndarray, split: str = "train"
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients of ``layer``'s captured parameters for samples ``ids``.

        Returns:
            ``{param name: tensor of shape (len(ids), *param.shape)}``.
        """
        lay = self._layer(layer)
        if lay.spec["representation"] == "projection":
            raise StoreReadError(
                f"Layer {layer!r} is stored as a {lay.approximate}; its gradients cannot be restored. "
                "norms, dot and the analytics work on it; capture it with representation='factors' or a "
                "larger budget to restore it."
            )
        rows = self._gather(epoch, lay, self._rows_of(epoch, ids, split), split)
        if not lay.factored:
            return rows
        return lay.extractor.restore(lay.spec["hyper"], lay.params, lay.unpacked(rows))

    def factors(
        self, epoch: int, layer: str, ids: Sequence[int] | np.ndarray, split: str = "train"
    ) -> dict[str, torch.Tensor]:
        """The stored arrays of ``layer`` for samples ``ids``, decoded: ``{"a": ..., "d": ...}`` for a
        factored layer (rows ``(len(ids), uses, ...)``), per-parameter gradients for a full one."""
        return self._gather(epoch, self._layer(layer), self._rows_of(epoch, ids, split), split)

    def nonfinite(self, epoch: int) -> np.ndarray:
        """Ids of ``epoch``'s training samples whose captured gradients hold NaN or Inf (the first
        1,000 of each process)."""
        ids = [
            i for g in self._epoch(epoch)["ranks"] for i in dict(g.attrs).get("nonfinite", {}).get("ids", [])
        ]
        return np.asarray(sorted(ids), dtype=np.int64)

    def dropped(self, epoch: int) -> int:
        """Rows of ``epoch`` not stored because the writer was behind (``on_pressure="drop"``)."""
        return sum(int(dict(g.attrs).get("dropped", {}).get("rows", 0)) for g in self._epoch(epoch)["ranks"])

    def dedup_stats(self, epoch: int | None = None) -> dict[str, dict[str, int]]:
        """What deduplication saved, by ``"<layer>/<array>"``, summed over ranks (and epochs).

        Each entry holds ``rows`` looked at, ``duplicates`` stored as references, ``bytes_saved``
        (uncompressed bytes of those rows) and hash ``collisions`` caught by the byte check.
        """
        total: dict[str, dict[str, int]] = {}
        for ep in [epoch] if epoch is not None else self.epochs:
            for g in self._epoch(ep)["ranks"]:
                for key, stats in dict(g.attrs.get("dedup", {}).get("arrays", {})).items():
                    into = total.setdefault(key, {})
                    for k, v in stats.items():
                        into[k] = into.get(k, 0) + int(v)
        return total

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
        selected = self._select(layers)
        total = self._captured_sqnorms(epoch, [lay.name for lay in selected], split) if kept else None
        if total is not None:
            return QueryResult(np.sqrt(total), self._approximate(layers, epoch))
        if client is not None:
            from mstore_lightning.analytics import dask_engine

            total = dask_engine.sqnorms(self, epoch, [lay.name for lay in selected], split, client)
            return QueryResult(np.sqrt(total), self._approximate(layers, epoch))
        total = np.zeros(len(self.sample_ids(epoch, split)), dtype=np.float64)
        for lay in selected:
            for lo, rows in self._stream(epoch, lay, split):
                total[lo : lo + _nrows(rows)] += _sqnorm(lay, rows).double().numpy()
        return QueryResult(np.sqrt(total), self._approximate(layers, epoch))

    def _captured_sqnorms(self, epoch: int, names: list[str], split: str) -> np.ndarray | None:
        """Summed squared norms of ``names`` as captured (exact, from the factors before any
        quantization), when the capture kept them for all those layers on every rank; else ``None``."""
        if split != "train" or not names:
            return None
        ep = self._epoch(epoch, split)
        columns = []
        for g in ep["ranks"]:
            kept = g.attrs.get("sqnorms")
            if not kept or not set(names) <= set(kept["layers"]):
                return None
            columns.append([kept["columns"].index(n) for n in names])
        records = self._rank_records(epoch, "sqnorm", split)
        parts = [rows[:, cols].astype(np.float64).sum(1) for rows, cols in zip(records, columns)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def dot(
        self,
        epoch: int,
        ids_a: Sequence[int] | np.ndarray,
        ids_b: Sequence[int] | np.ndarray,
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
        rows_a, rows_b = self._rows_of(epoch, ids_a, split_a), self._rows_of(epoch, ids_b, split_b)
        if client is not None:
            from mstore_lightning.analytics import dask_engine

            names = [lay.name for lay in self._select(layers)]
            full = dask_engine.dots(self, epoch, rows_a, names, split_a, split_b, client)
            return QueryResult(full[:, rows_b], self._approximate(layers, epoch))
        self._open_layers([epoch], self._select(layers), list(dict.fromkeys([split_a, split_b])))
        out = np.zeros((len(rows_a), len(rows_b)), dtype=np.float64)
        # Many ids: stream whole chunks (memory of one chunk); few: gather just their rows.
        by_chunk = len(rows_b) > _BLOCK_ROWS
        if by_chunk:
            order = np.argsort(rows_b, kind="stable")
            sorted_rows = rows_b[order]
            in_order = bool(np.all(order[1:] > order[:-1]))
        with Lanes.for_queries(len(rows_a)) as lanes:
            for lay in self._select(layers):
                xa = self._gather(epoch, lay, rows_a, split_a)
                if not by_chunk:
                    for lo in range(0, len(rows_b), _BLOCK_ROWS):
                        xb = self._gather(epoch, lay, rows_b[lo : lo + _BLOCK_ROWS], split_b)
                        out[:, lo : lo + _BLOCK_ROWS] += _gram(lay, xa, xb).numpy()
                    continue
                for first, n, rows in self._stream_deferred(epoch, lay, split_b):
                    a, b = np.searchsorted(sorted_rows, [first, first + n])
                    if a == b:
                        continue
                    local = sorted_rows[a:b] - first
                    whole = b - a == n and np.array_equal(local, np.arange(n))  # every row once, in order
                    # Summed in row order, where a chunk is a plain slice; put in ids_b's order once.
                    lanes.submit(_add_gram, out[:, a:b], lay, xa, rows, None if whole else local)
                lanes.wait()  # the next layer adds into the same slices
        if by_chunk and not in_order:
            out[:, order] = out.copy()
        return QueryResult(out, self._approximate(layers, epoch))

    def _dot_windows(
        self,
        epoch: int,
        ids_a: Sequence[int] | np.ndarray | None,
        layers: Sequence[str] | None,
        split_a: str,
        window: int,
        *,
        start: int = 0,
        stop: int | None = None,
        xa: dict[str, dict[str, Any]] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(first, block)``: the inner products of ``ids_a`` with the training rows
        ``first:first + window``, window after window from ``start`` to ``stop``, summed over
        ``layers``. ``xa`` gives the query rows per layer instead, already gathered.

        Only one block of scores and the chunks it reads are held at once, however many rows the
        epoch has; a chunk across two windows is read for each.
        """
        lays = self._select(layers)
        self._open_layers([epoch], lays, list(dict.fromkeys([split_a, "train"])))
        if xa is None:
            rows_a = self._rows_of(epoch, ids_a, split_a)
            xa = {lay.name: self._gather(epoch, lay, rows_a, split_a) for lay in lays}
        xa = {name: {k: torch.as_tensor(v) for k, v in x.items()} for name, x in xa.items()}
        queries = next((len(v) for x in xa.values() for v in x.values()), 0)
        stop = len(self.sample_ids(epoch)) if stop is None else stop
        with Lanes.for_queries(queries) as lanes:
            for lo in range(start, stop, window):
                hi = min(lo + window, stop)
                out = np.zeros((queries, hi - lo), dtype=np.float64)
                for lay in lays:
                    for first, m, rows in self._stream_deferred(epoch, lay, "train", lo, hi):
                        a, b = max(first, lo), min(first + m, hi)
                        local = None if (a, b) == (first, first + m) else np.arange(a - first, b - first)
                        lanes.submit(_add_gram, out[:, a - lo : b - lo], lay, xa[lay.name], rows, local)
                    lanes.wait()  # the next layer adds into the same slices
                yield lo, out

    def blocks(self, epoch: int, layer: str) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Streams ``layer``'s decoded rows of ``epoch`` one chunk at a time, for operators on factors.

        Yields:
            ``(first, rows)``: the position of the block's first row in :meth:`sample_ids`, and the
            arrays as the layer's extractor reads them (``{"a", "d"}`` or per-parameter gradients).
        """
        lay = self._layer(layer)
        for lo, rows in self._stream(epoch, lay):
            yield lo, lay.unpacked(rows) if lay.factored else rows

    def class_gradients(self, epoch: int, layers: Sequence[str] | None = None) -> Any:
        """Per-class sums of per-sample gradients; see :func:`mstore_lightning.analytics.class_gradients`."""
        from mstore_lightning.analytics import class_gradients

        return class_gradients(self, epoch, layers)

    def class_conflicts(self, epoch: int, layers: Sequence[str] | None = None) -> Any:
        """Cosines between class gradients and the samples opposing their class's; see
        :func:`mstore_lightning.analytics.class_conflicts`."""
        from mstore_lightning.analytics import class_conflicts

        return class_conflicts(self, epoch, layers)

    def cosine(
        self,
        epoch: int,
        ids_a: Sequence[int] | np.ndarray,
        ids_b: Sequence[int] | np.ndarray,
        layers: Sequence[str] | None = None,
    ) -> np.ndarray:
        """``(len(ids_a), len(ids_b))`` cosines between per-sample gradients."""
        from mstore_lightning.analytics import cosine

        return cosine(self, epoch, ids_a, ids_b, layers)

    def outliers(self, epoch: int, threshold: float = 3.5, layers: Sequence[str] | None = None) -> Any:
        """Samples with unusually large gradients; see :func:`mstore_lightning.analytics.outliers`."""
        from mstore_lightning.analytics import outliers

        return outliers(self, epoch, threshold, layers)

    def cluster(
        self, epoch: int, k: int, dim: int = 16, layers: Sequence[str] | None = None, seed: int = 0
    ) -> Any:
        """k-means on seeded gradient sketches; see :func:`mstore_lightning.analytics.cluster`."""
        from mstore_lightning.analytics import cluster

        return cluster(self, epoch, k, dim, layers, seed)

    def self_influence(
        self, epochs: Sequence[int] | None = None, layers: Sequence[str] | None = None, client: Any = None
    ) -> Any:
        """``(ids, scores)``: ``Σ_e lr_e ‖g_i(e)‖²`` per sample; see :mod:`mstore_lightning.analytics`."""
        from mstore_lightning.analytics import self_influence

        return self_influence(self, epochs, layers, client)

    def tracin(
        self,
        query_ids: Sequence[int] | np.ndarray,
        epochs: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        client: Any = None,
    ) -> Any:
        """``(ids, scores)`` with scores ``(len(query_ids), len(ids))``: ``Σ_e lr_e ⟨g_train, g_query⟩``."""
        from mstore_lightning.analytics import tracin

        return tracin(self, query_ids, epochs, layers, client)

    def topk(
        self,
        query_ids: Sequence[int] | np.ndarray,
        k: int,
        epoch: int | None = None,
        metric: str = "cosine",
        layers: Sequence[str] | None = None,
        client: Any = None,
    ) -> Any:
        """Per query, ``k`` training ids and scores, best first (``metric`` ``"cosine"`` or ``"dot"``)."""
        from mstore_lightning.analytics import topk

        return topk(self, query_ids, k, epoch, metric, layers, client)

    def describe(self) -> str:
        """A human-readable summary: epochs, layers, representation, bytes, and what is not captured."""
        lines = [f"gradient store {self.uri}", f"  epochs committed: {self.epochs}"]
        pol = self.policy
        lines.append(
            f"  precision {pol.get('precision')}, loss reduction {pol.get('loss_reduction')}, "
            f"layers {pol.get('layers')}"
        )
        for ep in self.epochs:
            line = f"  epoch {ep}: {self.row_count(ep)} rows, lr {self.lr(ep):.4g}"
            dedup = self.dedup_stats(ep).values()
            if any(d.get("duplicates") for d in dedup):
                dups, saved = sum(d["duplicates"] for d in dedup), sum(d["bytes_saved"] for d in dedup)
                line += f", dedup stored {dups:,} input rows as references ({saved:,} B uncompressed saved)"
            lines.append(line)
        lines.append("  layers:")
        for lay in self._layers.values():
            s = lay.spec
            choice = s.get("choice", {})
            encodings = sorted({a["encoding"] for a in s["arrays"].values()})
            head = f"    {lay.name} ({s['module_type']}): {choice.get('kept', s['representation'])}"
            lines.append(
                f"{head}, params {s['params']}, {choice.get('bytes_per_sample', 0):,} B/sample raw "
                f"({'/'.join(encodings)})"
            )
            if choice.get("reason"):
                lines.append(f"      why: {choice['reason']}")
            if lay.approximate:
                lines.append(f"      approximate: {lay.approximate}")
            decision = self.meta.get("recompute", {}).get(lay.name)
            if decision:
                lines.append(f"      store or recompute: {explain_decision(decision)}")
        if self.uncovered:
            lines.append("  not captured:")
            for u in self.uncovered:
                lines.append(
                    f"    {u['module']}.{{{','.join(u['params'])}}} ({u['numel']} numbers): {u['reason']}"
                )
        lines.append(f"  bytes on disk: {self.nbytes_stored():,}")
        return "\n".join(lines)

    def nbytes_stored(self, epoch: int | None = None, layer: str | None = None) -> int:
        """Bytes stored for the whole store, one committed epoch, or one layer (in one epoch or all).

        Sums the sizes of the store's files, or of its objects for a URL store (one listing each).
        """
        if epoch is None and layer is None:
            # Each committed epoch listed on its own and kept, for later per-epoch or per-layer sizes.
            known = {f"{layout.EPOCHS}/{layout.epoch_key(e)}": self._epoch_sizes(e) for e in self.epochs}
            rest = object_sizes(self._root.store, "", skip=set(known))
            return sum(rest.values()) + sum(sum(s.values()) for s in known.values())
        epochs = [epoch] if epoch is not None else self.epochs
        if layer is not None:
            self._layer(layer)
        total = 0
        for ep in epochs:
            self._epoch(ep)  # raises for an epoch that is not committed
            sizes = self._epoch_sizes(ep)
            if layer is None:
                total += sum(sizes.values())
                continue
            for key, size in sizes.items():  # <rank group>/layers/<layer>/...
                parts = key.split("/", 2)
                if len(parts) == 3 and parts[1] == layout.LAYERS and parts[2].startswith(f"{layer}/"):
                    total += size
        return total

    # ---------------------------------------------------------------- internals
    def _epoch_sizes(self, epoch: int) -> dict[str, int]:
        if epoch not in self._sizes:  # a committed epoch's files never change: list them once
            self._sizes[epoch] = object_sizes(self._root.store, f"{layout.EPOCHS}/{layout.epoch_key(epoch)}")
        return self._sizes[epoch]

    def _layer(self, layer: str) -> _Layer:
        try:
            return self._layers[layer]
        except KeyError:
            raise StoreReadError(
                f"Layer {layer!r} is not in this store; its layers are {self.layers}."
            ) from None

    def _approximate(self, layers: Sequence[str] | None, epoch: int) -> dict[str, str]:
        out = {lay.name: lay.approximate for lay in self._select(layers) if lay.approximate}
        for lay in self._select(layers):
            if self._is_recomputed(epoch, lay):
                why = "recomputed from the end-of-epoch weights in eval mode (captured rows use their step's)"
                out[lay.name] = f"{out[lay.name]}; {why}" if lay.name in out else why
        return out

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
        import copy

        self._recompute_with = {
            "model": copy.deepcopy(model),
            "dataset": dataset,
            "collate_fn": collate_fn,
            "loss_fn": loss_fn,
            "batch_size": batch_size,
            "loaded": None,
        }

    @staticmethod
    def _train_only(split: str, lay: _Layer) -> None:
        if split != "train":
            raise StoreReadError(
                f"Layer {lay.name!r} is recomputed, which covers training rows only, not queries."
            )

    def _is_recomputed(self, epoch: int, lay: _Layer) -> bool:
        return lay.name in self._epoch(epoch)["attrs"].get("recomputed", [])

    def _recompute_rows(self, epoch: int, lay: _Layer, ids: np.ndarray) -> dict[str, torch.Tensor]:
        from mstore_lightning.capture.layers import LayerPlan
        from mstore_lightning.capture.recompute import Recomputer
        from mstore_lightning.store.weights import WEIGHTS, load_weights

        ctx = getattr(self, "_recompute_with", None)
        if ctx is None:
            why = self.meta.get("recompute", {}).get(lay.name, {})
            raise StoreReadError(
                f"Epoch {epoch} did not store layer {lay.name!r} (store-or-recompute: {why or 'recompute'}); "
                "call store.attach_recompute(model, dataset) to recompute it from the epoch's weights."
            )
        model = ctx["model"]
        if ctx["loaded"] != epoch:
            load_weights(self._root[f"{layout.EPOCHS}/{layout.epoch_key(epoch)}/{WEIGHTS}"], model)
            ctx["loaded"] = epoch
        modules = dict(model.named_modules())
        if lay.name not in modules:
            raise StoreReadError(
                f"The attached model has no module {lay.name!r}; attach the trained architecture."
            )
        plan = LayerPlan.from_spec(lay.spec, modules[lay.name], lay.extractor)
        recomputer = Recomputer(
            model,
            ctx["dataset"],
            {lay.name: plan},
            self.meta.get("loss_reduction", "mean"),
            collate_fn=ctx["collate_fn"],
            loss_fn=ctx["loss_fn"],
            batch_size=ctx["batch_size"],
        )
        return recomputer.rows(ids)[lay.name]

    def _select(self, layers: Sequence[str] | None) -> list[_Layer]:
        if isinstance(layers, str):
            layers = [layers]
        return [self._layer(n) for n in (layers if layers is not None else self.layers)]

    def _epoch(self, epoch: int, split: str = "train") -> dict[str, Any]:
        self._load_epochs([epoch], split)
        return self._epoch_cache[(epoch, split)]

    def _load_epochs(self, epochs: Sequence[int], split: str = "train") -> None:
        """Reads what the reader keeps of each of ``epochs`` not yet cached (its attributes, rank
        groups and row counts), every epoch's reads overlapping in one round trip to zarr."""
        if split not in layout.SPLITS:
            raise StoreReadError(f"`split` can be {', '.join(map(repr, layout.SPLITS))}; got {split!r}.")
        todo = [e for e in dict.fromkeys(epochs) if (e, split) not in self._epoch_cache]
        if not todo:
            return

        async def all_of() -> list[dict[str, Any] | None]:
            listed = self._committed_groups
            return list(
                await asyncio.gather(*(_epoch_meta(self._root, e, split, listed.get(e)) for e in todo))
            )

        for epoch, meta in zip(todo, zarr_sync(all_of())):
            if meta is None:
                raise StoreReadError(
                    f"Epoch {epoch} is not committed in this store; committed: {self.epochs}."
                )
            for g, ids in zip(meta["ranks"], meta.pop("ids")):
                self._arrays[(g.path, "", "ids")] = ids  # opened for the row counts; read by row_field
            self._epoch_cache[(epoch, split)] = meta

    def _rows_of(self, epoch: int, ids: Sequence[int] | np.ndarray, split: str = "train") -> np.ndarray:
        """Row positions of sample ``ids`` in ``epoch``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        key = (epoch, "sorted ids", split)
        if key not in self._fields:  # each query resolves ids; sort the epoch's ids once
            have = self.sample_ids(epoch, split)
            order = np.argsort(have, kind="stable")
            self._fields[key] = np.stack([order, have[order]])
        order, sorted_ids = self._fields[key]
        pos = np.searchsorted(sorted_ids, ids)
        found = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == ids)
        if not found.all():
            missing = ids[~found][:10].tolist()
            what = "as queries in" if split == "query" else "in"
            raise StoreReadError(f"Sample id(s) {missing} were not captured {what} epoch {epoch}.")
        dup = (pos + 1 < len(sorted_ids)) & (sorted_ids[np.minimum(pos + 1, len(sorted_ids) - 1)] == ids)
        if dup.any():
            raise StoreReadError(
                f"Sample id {int(ids[dup][0])} has several rows in epoch {epoch} (a sampler with "
                "replacement?); address those rows by position with row_field(epoch, 'ids')."
            )
        return order[pos]

    def _array(self, rank_group: zarr.Group, lay: _Layer, name: str) -> zarr.Array:
        # Opening an array reads its metadata; committed epochs never change, so each is opened once.
        key = (rank_group.path, lay.name, name)
        if key not in self._arrays:  # open every array of the layer at once: one trip to zarr's loop
            self._open_arrays([(rank_group, lay, n) for n in dict.fromkeys([*_stored_names(lay), name])])
            if key not in self._arrays:
                raise StoreReadError(
                    f"Array {rank_group.path}/{layout.LAYERS}/{lay.name}/{name} is missing from the store."
                )
        if key not in self._checked:
            _check_part(self._arrays[key], lay, name, self._rank_rows(rank_group))
            self._checked.add(key)
        return self._arrays[key]

    def _open_layers(self, epochs: Sequence[int], lays: Sequence[_Layer], splits: Sequence[str]) -> None:
        """Opens every stored array of ``lays`` in ``epochs`` in one trip to zarr's event loop (by
        layer and rank group, opening costs a trip each: more than reading a small epoch)."""
        self._open_arrays(
            [
                (g, lay, n)
                for e in epochs
                for split in splits
                for g in self._epoch(e, split)["ranks"]
                for lay in lays
                if not self._is_recomputed(e, lay)
                for n in _stored_names(lay)
            ]
        )

    def _open_arrays(self, want: list[tuple[zarr.Group, _Layer, str]]) -> None:
        """Opens those of the ``(rank group, layer, array name)`` arrays not yet open, together;
        one that is not stored stays unopened."""
        want = [(g, lay, n) for g, lay, n in want if (g.path, lay.name, n) not in self._arrays]
        paths = [(g, f"{layout.LAYERS}/{lay.name}/{n}") for g, lay, n in want]
        for (g, lay, n), arr in zip(want, open_many(paths) if paths else []):
            if arr is not None:
                self._arrays[(g.path, lay.name, n)] = arr

    def _rank_rows(self, rank_group: zarr.Group) -> int:
        """Rows of a rank group: the length of its ``ids``, which every per-row array must share."""
        key = (rank_group.path, "", "ids")
        if key not in self._arrays:
            self._arrays[key] = node(rank_group, f"{layout.ROWS}/ids")
        return int(self._arrays[key].shape[0])

    def _array_names(self, lay: _Layer) -> list[str]:
        return list(lay.spec["arrays"])

    def _read(self, group: zarr.Group, lay: _Layer, name: str, where: slice | np.ndarray) -> np.ndarray:
        """Stored parts of array ``name`` at local rows ``where`` (a slice or sorted positions),
        with deduplicated rows filled in from where they are stored."""
        return self._read_arrays(group, lay, [name], where)[name]

    def _read_arrays(
        self, group: zarr.Group, lay: _Layer, names: list[str], where: slice | np.ndarray
    ) -> dict[str, dict[str, np.ndarray]]:
        """:meth:`_read` of several arrays, their parts, references and code tables fetched together."""
        return self._read_batch([(group, lay, names, where)])[0]

    def _read_batch(
        self, requests: list[tuple[zarr.Group, _Layer, list[str], slice | np.ndarray]]
    ) -> list[dict[str, dict[str, np.ndarray]]]:
        """:meth:`_read_arrays` of each ``(group, layer, names, where)`` request, all in one batch.

        Each zarr read is a round trip to zarr's event loop thread; on small chunks that trip, not
        the bytes, is the cost, so every part of every array of every request goes in one batch, and
        the rows deduplicated rows refer to in a second.
        """
        if not requests:
            return []
        jobs: list[tuple[tuple[int, str, str], zarr.Array, slice | np.ndarray]] = []
        for i, (group, lay, names, where) in enumerate(requests):
            for name in names:
                spec = lay.spec["arrays"][name]
                for p in _row_parts(spec):
                    jobs.append(((i, name, p), self._array(group, lay, p), where))
                    if quant.chunk_codec(spec, name, p) is not None:
                        table = self._array(group, lay, p + quant.TABLE)
                        jobs.append(((i, name, p + quant.TABLE), table, slice(None)))
                if spec.get("dedup"):
                    jobs.append(((i, name, "ref"), self._array(group, lay, f"{name}_ref"), where))
        got = dict(zip([key for key, _, _ in jobs], take_many([(a, w) for _, a, w in jobs])))
        for (i, name, p), arr, w in jobs:
            if not requests[i][1].spec["arrays"][name].get("dedup") or p.endswith(quant.TABLE):
                require_chunks(arr)
            elif p != "ref":  # chunks may be absent where every row is a reference or all zeros
                rows = np.arange(arr.shape[0])[w] if isinstance(w, slice) else w
                in_place = rows[got[(i, name, "ref")][:, 2] == NO_REF]
                require_chunks(arr, in_place // int(arr.chunks[0]))
            else:  # rows without a reference hold -1, so a reference chunk is only absent when lost
                require_chunks(arr)
        out: list[dict[str, dict[str, np.ndarray]]] = []
        for i, (group, lay, names, where) in enumerate(requests):
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for name in names:
                spec, parts = lay.spec["arrays"][name], {}
                for p in _row_parts(spec):
                    codec = quant.chunk_codec(spec, name, p)
                    if codec is None:
                        parts[p] = got[(i, name, p)]
                    else:
                        arr = self._array(group, lay, p)
                        rows = np.arange(arr.shape[0])[where] if isinstance(where, slice) else where
                        table = got[(i, name, p + quant.TABLE)]
                        parts[p] = codec.decode(got[(i, name, p)], table[rows // int(arr.chunks[0])])
                arrays[name] = parts
            out.append(arrays)
        refs = [(out[i][n], requests[i][1], n, got[(i, n, "ref")]) for (i, n, p), _, _ in jobs if p == "ref"]
        self._fill_references(refs)
        return out

    def _fill_references(self, targets: list[tuple[dict[str, np.ndarray], _Layer, str, np.ndarray]]) -> None:
        """Replaces the deduplicated rows of each ``(parts, layer, name, references)`` by the rows
        their references point at, read in one batch."""
        sources, fills = [], []
        for parts, lay, name, refs in targets:
            dup = np.nonzero(refs[:, 2] >= 0)[0]
            if not dup.size:
                continue
            pointed = refs[dup]
            for e, r in {(int(e), int(r)) for e, r in pointed[:, :2]}:
                sel = np.nonzero((pointed[:, 0] == e) & (pointed[:, 1] == r))[0]
                rows = pointed[sel, 2].astype(np.int64)
                order = np.argsort(rows, kind="stable")
                sources.append((self._rank_group(e, r), _without_dedup(lay, name), [name], rows[order]))
                fills.append((parts, name, dup[sel[order]]))
        for (parts, name, at), source in zip(fills, self._read_batch(sources)):
            for p, values in source[name].items():
                parts[p][at] = values

    def _rank_group(self, epoch: int, rank: int) -> zarr.Group:
        ep = self._epoch(epoch)
        if rank not in ep["by_rank"]:
            raise StoreReadError(
                f"Deduplicated rows refer to rank {rank} of epoch {epoch}, which is missing."
            )
        return ep["by_rank"][rank]

    def _gather(
        self, epoch: int, lay: _Layer, rows: np.ndarray, split: str = "train"
    ) -> dict[str, torch.Tensor]:
        """Decoded arrays of ``lay`` at global row positions ``rows`` (in the given order)."""
        if self._is_recomputed(epoch, lay):
            self._train_only(split, lay)
            return self._recompute_rows(epoch, lay, self.sample_ids(epoch)[rows])
        through_cache = self._gather_by_chunk(epoch, lay, rows, split)
        if through_cache is not None:
            return through_cache
        ep = self._epoch(epoch, split)
        offsets = ep["offsets"]
        which = np.searchsorted(offsets, rows, side="right") - 1
        names = self._array_names(lay)
        parts = {n: _empty_parts(lay.spec["arrays"][n], n, len(rows)) for n in names}
        for r, g in enumerate(ep["ranks"]):
            sel = np.nonzero(which == r)[0]
            if sel.size:
                local = rows[sel] - offsets[r]
                order = np.argsort(local)
                for name, got in self._read_arrays(g, lay, names, local[order]).items():
                    for p, values in got.items():
                        parts[name][p][sel[order]] = values
        return {n: quant.decode(lay.spec["arrays"][n], n, parts[n]) for n in names}

    def _gather_by_chunk(
        self, epoch: int, lay: _Layer, rows: np.ndarray, split: str
    ) -> dict[str, torch.Tensor] | None:
        """:meth:`_gather` through whole decoded chunks, kept in the cache when the store has one
        (``None`` when it has not): a chunk read for a few rows then serves every later query."""
        if not len(rows) or not (self._cache.limit or (epoch, split) in self._staged_at):
            return None
        chunks = self._chunks(epoch, lay, split)
        which = np.searchsorted([c[3] for c in chunks], rows, side="right") - 1
        picked, where = [], []
        for i in np.unique(which):
            r, lo, hi, first = chunks[i]
            got = self._chunk(epoch, lay, split, r, lo, hi)
            sel = np.nonzero(which == i)[0]
            index = torch.from_numpy(rows[sel] - first)
            picked.append({n: t.index_select(0, index) for n, t in got.items()})
            where.append(sel)
        back = torch.from_numpy(np.argsort(np.concatenate(where)))  # back to the order asked for
        return {n: torch.cat([p[n] for p in picked])[back] for n in picked[0]}

    def _stream(
        self, epoch: int, lay: _Layer, split: str = "train"
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yields ``(first global row, decoded rows)`` one chunk of the layer at a time."""
        if self._is_recomputed(epoch, lay):
            self._train_only(split, lay)
            ids = self.sample_ids(epoch)
            for lo in range(0, len(ids), _BLOCK_ROWS):
                yield lo, self._recompute_rows(epoch, lay, ids[lo : lo + _BLOCK_ROWS])
            return
        for r, lo, hi, first in self._chunks(epoch, lay, split):
            yield first, self._chunk(epoch, lay, split, r, lo, hi)

    def _stream_deferred(
        self, epoch: int, lay: _Layer, split: str = "train", start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, int, Callable[[], dict[str, torch.Tensor]]]]:
        """Yields ``(first global row, rows, decoded rows when called)`` for each chunk holding any
        of the rows ``start:stop``.

        A chunk not already decoded is read here, and decoded by whoever calls: a scan hands that
        to its worker threads, and reads the next chunk meanwhile.
        """
        stop = len(self.sample_ids(epoch, split)) if stop is None else stop
        if self._is_recomputed(epoch, lay):
            self._train_only(split, lay)
            ids = self.sample_ids(epoch)
            for first in range(start - start % _BLOCK_ROWS, stop, _BLOCK_ROWS):
                block = ids[first : first + _BLOCK_ROWS]
                yield first, len(block), functools.partial(dict, self._recompute_rows(epoch, lay, block))
            return
        for r, lo, hi, first in self._chunks(epoch, lay, split):
            if first + hi - lo <= start or first >= stop:
                continue
            key = (epoch, split, r, lo, hi, lay.name)
            rows = self._staged.get(key)
            if rows is None:
                rows = self._cache.get(key)
            if rows is not None:
                yield first, hi - lo, functools.partial(dict, rows)
            else:
                yield first, hi - lo, functools.partial(self._decode_chunk, key, self._read_raw([key])[0])

    def _chunks(self, epoch: int, lay: _Layer, split: str = "train") -> list[tuple[int, int, int, int]]:
        """``(rank index, lo, hi, first global row)`` of every stored chunk of ``lay``."""
        ep = self._epoch(epoch, split)
        out = []
        for r, g in enumerate(ep["ranks"]):
            first = self._array(g, lay, self._array_names(lay)[0])
            step = int(first.chunks[0])  # a layer's arrays share their chunk rows
            for lo in range(0, first.shape[0], step):
                out.append((r, lo, min(lo + step, first.shape[0]), int(ep["offsets"][r]) + lo))
        return out

    def _chunk(
        self, epoch: int, lay: _Layer, split: str, r: int, lo: int, hi: int
    ) -> dict[str, torch.Tensor]:
        """Decoded rows ``lo:hi`` of rank index ``r``'s arrays of ``lay``."""
        key = (epoch, split, r, lo, hi, lay.name)
        rows = self._staged.get(key)
        if rows is None:
            rows = self._cache.get(key)
        return rows if rows is not None else self._read_chunks([key])[0]

    def _read_chunks(self, keys: list[tuple[int, str, int, int, int, str]]) -> list[dict[str, torch.Tensor]]:
        """Decoded chunks ``(epoch, split, rank index, lo, hi, layer name)``, read in one batch and
        offered to the cache."""
        return [self._decode_chunk(key, parts) for key, parts in zip(keys, self._read_raw(keys))]

    def _read_raw(
        self, keys: list[tuple[int, str, int, int, int, str]]
    ) -> list[dict[str, dict[str, np.ndarray]]]:
        """The stored parts of chunks ``(epoch, split, rank index, lo, hi, layer name)``, read in one
        batch, not yet decoded."""
        requests = []
        for epoch, split, r, lo, hi, name in keys:
            lay = self._layers[name]
            group = self._epoch(epoch, split)["ranks"][r]
            requests.append((group, lay, self._array_names(lay), slice(lo, hi)))
        return list(self._read_batch(requests))

    def _decode_chunk(
        self, key: tuple[int, str, int, int, int, str], parts: dict[str, dict[str, np.ndarray]]
    ) -> dict[str, torch.Tensor]:
        """A chunk's stored parts decoded, and offered to the cache (safe from any thread)."""
        lay = self._layers[key[-1]]
        rows = {n: quant.decode(lay.spec["arrays"][n], n, parts[n]) for n in parts}
        self._cache.put(key, rows)
        return rows

    def _in_batches(
        self, epochs: Sequence[int], lays: Sequence[_Layer], splits: Sequence[str]
    ) -> Iterator[list[int]]:
        """Yields ``epochs`` in runs, each run's chunks of ``lays`` in ``splits`` read beforehand in
        one batch and held (up to ``_STAGE_BYTES`` decoded) until the next.

        An operator that reads epoch after epoch pays zarr's round trip per run, not per chunk: on a
        store of small epochs that trip is most of the cost. An epoch larger than the bound is
        yielded alone and read chunk by chunk, so memory stays bounded whatever the epoch's size.
        """
        epochs, splits = list(epochs), list(dict.fromkeys(splits))
        for split in splits:
            self._load_epochs(epochs, split)
        self._open_layers(epochs, lays, splits)
        run: list[int] = []
        keys: list[tuple[int, str, int, int, int, str]] = []
        size = 0
        for e in epochs:
            mine = [
                (e, split, r, lo, hi, lay.name)
                for split in splits
                for lay in lays
                if not self._is_recomputed(e, lay)
                for r, lo, hi, _ in self._chunks(e, lay, split)
            ]
            nbytes = sum(self._decoded_bytes(key) for key in mine)
            if run and size + nbytes > _STAGE_BYTES:
                yield from self._staging(run, keys)
                run, keys, size = [], [], 0
            if nbytes > _STAGE_BYTES:
                yield [e]  # too large to hold: streamed chunk by chunk by whoever reads it
                continue
            run.append(e)
            keys.extend(mine)
            size += nbytes
        if run:
            yield from self._staging(run, keys)

    def _staging(self, run: list[int], keys: list[tuple]) -> Iterator[list[int]]:
        todo = [k for k in keys if self._cache.get(k) is None]
        self._staged.update(zip(todo, self._read_chunks(todo)))
        self._staged_at.update((k[0], k[1]) for k in keys)
        try:
            yield run
        finally:
            self._staged.clear()
            self._staged_at.clear()

    def _decoded_bytes(self, key: tuple[int, str, int, int, int, str]) -> int:
        """An upper bound on a chunk's decoded size: its stored elements as float32."""
        epoch, split, r, lo, hi, name = key
        lay, group = self._layers[name], self._epoch(epoch, split)["ranks"][r]
        total = 0
        for n in _stored_names(lay):
            arr = self._arrays.get((group.path, lay.name, n))
            if arr is not None and arr.ndim and arr.shape[0] == self._rank_rows(group):
                total += (hi - lo) * int(np.prod(arr.shape[1:], dtype=np.int64)) * 4
        return total


class _ChunkCache:
    """Decoded chunks, least recently used out first, up to ``limit`` bytes (0: none kept).

    Committed epochs never change, so a cached chunk never goes stale.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self._items: OrderedDict[tuple, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()  # a scan's worker threads offer the chunks they decode

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: tuple, rows: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.element_size() * t.nelement() for t in rows.values())
        if nbytes > self.limit:
            return
        with self._lock:
            if key in self._items:
                self.size -= self._items.pop(key)[1]
            self._items[key] = (rows, nbytes)
            self.size += nbytes
            while self.size > self.limit:
                _, (_, dropped) = self._items.popitem(last=False)
                self.size -= dropped


def explain_decision(d: dict[str, Any]) -> str:
    if "gamma_s_per_gb" not in d:
        return f"{d['decision']} ({d.get('why', '')})"
    return (
        f"{d['decision']} after epoch {d['decided_after_epoch']}: gamma = (t_recompute "
        f"{d['t_recompute_s']:.3g} s - t_read {d['t_read_s']:.3g} s) x {d['expected_queries']} queries / "
        f"{d['bytes_per_sample']:,.0f} B = {d['gamma_s_per_gb']:.4g} s/GB vs threshold "
        f"{d['threshold_s_per_gb']:g} s/GB"
    )


def _empty_parts(spec: dict[str, Any], name: str, n: int) -> dict[str, np.ndarray]:
    out = {}
    for p, info in spec["parts"].items():
        if info.get("per", "row") == "row":
            coded = quant.chunk_codec(spec, name, p) is not None  # read back as float32 values
            shape, dtype = (spec["row_shape"], np.float32) if coded else (info["row_shape"], info["dtype"])
            out[p] = np.empty((n, *shape), dtype=np.dtype(dtype))
    return out


def _row_parts(spec: dict[str, Any]) -> list[str]:
    return [p for p, info in spec["parts"].items() if info.get("per", "row") == "row"]


def _without_dedup(lay: _Layer, name: str) -> _Layer:
    """``lay`` with array ``name`` read as stored: a reference's target is never itself a reference."""
    arrays = dict(lay.spec["arrays"])
    arrays[name] = {**arrays[name], "dedup": False}
    return _Layer({**lay.spec, "arrays": arrays}, lay.extractor)


def _check_part(arr: zarr.Array, lay: _Layer, name: str, rows: int) -> None:
    """An array's metadata agrees with the layer spec: dtype, row shape and row count."""
    for spec in lay.spec["arrays"].values():
        part = spec["parts"].get(name)
        if part is None:
            continue
        want_shape, want_dtype = tuple(part.get("row_shape", arr.shape[1:])), part.get("dtype")
        if tuple(arr.shape[1:]) != want_shape or (want_dtype and str(arr.dtype) != str(np.dtype(want_dtype))):
            raise StoreReadError(
                f"Array {arr.path!r} is {arr.dtype} rows of {list(arr.shape[1:])}, but its layer stores "
                f"{want_dtype} rows of {list(want_shape)}: its metadata is damaged."
            )
    if name.endswith(quant.TABLE):
        return
    check_rows(arr, rows)


def _stored_names(lay: _Layer) -> list[str]:
    """Every array a layer may store: row parts, code tables and dedup references."""
    out = []
    for name, spec in lay.spec["arrays"].items():
        for p in _row_parts(spec):
            out.append(p)
            if quant.chunk_codec(spec, name, p) is not None:
                out.append(p + quant.TABLE)
        if spec.get("dedup"):
            out.append(f"{name}_ref")
    return out


async def _epoch_meta(
    root: zarr.Group, epoch: int, split: str, listed: zarr.Group | None = None
) -> dict[str, Any] | None:
    """What the reader keeps of committed ``epoch``'s ``split`` rows; ``None`` when not committed.

    ``listed`` is the epoch's group if a listing already found it committed."""
    if listed is not None:
        group = listed._async_group
    else:
        try:  # the epoch's own group says whether it is committed: no need to list them all
            key = layout.epoch_key(int(epoch))
        except (ValueError, TypeError):
            return None
        group = await anode(root._async_group, f"{layout.EPOCHS}/{key}", missing_ok=True)
    if group is None or group.attrs.get("state") != layout.COMMITTED:
        return None
    check_crc(dict(group.attrs), f"epoch group {group.path}")
    prefix = layout.SPLITS[split]
    # Listing names and opening only this split's rank groups (not zarr's groups(), which opens
    # every member) keeps the reads per epoch to three: on small epochs they are the cost.
    names = [k async for k in group.store_path.store.list_dir(group.path)]
    keys = sorted((k for k in names if k[:1] == prefix and k[1:].isdigit()), key=lambda k: int(k[1:]))
    found = await asyncio.gather(
        *(anode(group, k) for k in keys),
        *(anode(group, f"{k}/{layout.ROWS}/ids", missing_ok=True) for k in keys),
    )
    ranks, ids = [], []
    for g, arr in zip(found[: len(keys)], found[len(keys) :]):
        if arr is None and await g.contains(layout.ROWS):
            raise StoreReadError(f"{g.path}/{layout.ROWS}/ids is missing from the store.")
        if arr is not None:  # a rank group without row records holds no rows
            ranks.append(g)
            ids.append(zarr.Array(arr))
    sizes = [a.shape[0] for a in ids]
    rows = group.attrs.get("rows")
    if split == "train" and rows is not None and sum(sizes) != rows:
        raise StoreReadError(
            f"{group.path}: the row records hold {sum(sizes)} rows but the epoch was committed with "
            f"{rows}; the store's metadata is damaged."
        )
    ranks = [zarr.Group(g) for g in ranks]
    return {
        "attrs": dict(group.attrs),
        "ranks": ranks,
        "by_rank": {int(g.basename[1:]): g for g in ranks},
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "ids": ids,
    }


def _nrows(rows: dict[str, torch.Tensor]) -> int:
    return next(iter(rows.values())).shape[0]


def _sqnorm(lay: _Layer, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    if lay.factored:
        return lay.extractor.sqnorm(lay.spec["hyper"], lay.params, lay.unpacked(rows))
    if _projected_factors(lay):
        return kron_sqnorm(rows["a"], rows["d"], "weight" in lay.params, "bias" in lay.params)
    return sum(rows[p].reshape(rows[p].shape[0], -1).double().pow(2).sum(1) for p in rows)


def _add_gram(
    out: np.ndarray,
    lay: _Layer,
    x: dict[str, torch.Tensor],
    rows: Callable[[], dict[str, torch.Tensor]],
    local: np.ndarray | None,
) -> None:
    """Adds the gram of ``x`` against a chunk's rows (decoded here), or its ``local`` ones, to ``out``."""
    y = rows()
    if local is not None:
        index = torch.from_numpy(local)
        y = {k: v.index_select(0, index) for k, v in y.items()}
    out += _gram(lay, x, y).numpy()


def _gram(lay: _Layer, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    if lay.factored:
        return lay.extractor.gram(lay.spec["hyper"], lay.params, lay.unpacked(x), lay.unpacked(y))
    if _projected_factors(lay):
        return kron_gram(x["a"], x["d"], y["a"], y["d"], "weight" in lay.params, "bias" in lay.params)
    return sum(flat_gram(x[p], y[p]) for p in x)


def _projected_factors(lay: _Layer) -> bool:
    # Projected factors are A (G, T, k_in) and D (G, T, k_out): a linear layer's kernels apply.
    return lay.spec["representation"] == "projection" and lay.spec["projection"]["form"] == "factors"
