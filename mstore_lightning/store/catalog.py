"""What a store holds, read from its metadata and row records: epochs, layers, ranks and sample ids.

A committed epoch never changes, so everything read here is read once and kept. Reads of many epochs
overlap in one round trip to zarr's event loop: on a store of small epochs those trips, not the
bytes, are what a query costs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from mstore_lightning.core.checks import choice
from mstore_lightning.store import layout
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

if TYPE_CHECKING:
    from mstore_lightning.core.representation import Representation

ArrayKey = tuple[str, str, str]  # (rank group path, layer name or "", array name)


class Catalog:
    """The metadata side of an opened store: layers, committed epochs, rank groups and row records.

    Attributes:
        uri: where the store is.
        meta: the run's root metadata (schema version, policy, layer specs, ...).
        specs: each captured layer's JSON spec.
        reps: each captured layer's :class:`~mstore_lightning.core.representation.Representation`,
            made on first use (the kernels need torch; what is stored does not).
        opened: arrays opened so far, by ``(rank group path, layer or "", name)``; shared with the
            chunk reader so that each array's metadata is read once.
    """

    def __init__(
        self, root: zarr.Group, uri: str = "", storage_options: dict[str, Any] | None = None
    ) -> None:
        self.uri, self.storage_options, self.root = uri, storage_options, root
        if layout.META_KEY not in root.attrs:
            raise StoreReadError(f"{uri!r} is a Zarr group without gradient-store metadata.")
        check_crc(dict(root.attrs), f"{uri!r} root metadata")
        self.meta: dict[str, Any] = dict(root.attrs[layout.META_KEY])
        version = self.meta.get("schema_version")
        if version != layout.SCHEMA_VERSION:
            raise StoreReadError(
                f"{uri!r} has store schema version {version}; this library reads version {layout.SCHEMA_VERSION}."
            )
        self.specs: dict[str, dict[str, Any]] = {
            name: spec for name, spec in self.meta.get("layers", {}).items() if spec.get("representation")
        }
        self.opened: dict[ArrayKey, zarr.Array] = {}
        self._epochs: dict[tuple[int, str], dict[str, Any]] = {}
        self._fields: dict[tuple[int, str, str], np.ndarray] = {}
        self._records: dict[tuple[int, str, str], list[np.ndarray]] = {}  # per-rank rows/<name>
        self._committed: dict[int, zarr.Group] = {}  # seen committed by `epochs`
        self._sizes: dict[int, dict[str, int]] = {}  # file sizes of committed epochs

    @classmethod
    def open(cls, uri: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Catalog:
        """The catalog of the store at a local path or fsspec URL, opened read-only."""
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
        return cls(root, uri, storage_options)

    # ---------------------------------------------------------------- layers
    @property
    def layers(self) -> list[str]:
        return list(self.specs)

    @functools.cached_property
    def reps(self) -> dict[str, Representation]:
        from mstore_lightning.core.representation import Representation  # torch, once rows are read

        return {name: Representation.from_spec(spec) for name, spec in self.specs.items()}

    def spec(self, layer: str) -> dict[str, Any]:
        """The JSON spec of ``layer``, or a clear error naming the store's layers."""
        try:
            return self.specs[layer]
        except KeyError:
            raise StoreReadError(
                f"Layer {layer!r} is not in this store; its layers are {self.layers}."
            ) from None

    def rep(self, layer: str) -> Representation:
        """The representation of ``layer``, or a clear error naming the store's layers."""
        self.spec(layer)
        return self.reps[layer]

    def select(self, layers: Sequence[str] | str | None) -> list[Representation]:
        """The representations of ``layers`` (one name, several, or ``None`` for all)."""
        if isinstance(layers, str):
            layers = [layers]
        return [self.rep(n) for n in (layers if layers is not None else self.layers)]

    # ---------------------------------------------------------------- epochs
    @property
    def epochs(self) -> list[int]:
        """Committed epochs, ascending. An epoch still being written is not listed."""
        with warnings.catch_warnings():
            # A capture still running replaces metadata through temporary files; listing the folder
            # meanwhile shows them, and zarr warns about each.
            warnings.filterwarnings("ignore", "Object at .* is not recognized", category=UserWarning)
            zarr_sync(self._find_committed())
        out = sorted(self._committed)
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
        root = self.root._async_group
        folder = f"{root.path}/{layout.EPOCHS}".strip("/")
        try:
            names = [k async for k in root.store_path.store.list_dir(folder)]
        except FileNotFoundError:
            names = []
        for e in [e for e in self._committed if layout.epoch_key(e) not in names]:
            del self._committed[e]  # its group is gone
        known = {layout.epoch_key(e) for e in self._committed}
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
            self._committed[epoch] = zarr.Group(group)  # committed: it will not change

    def epoch_attrs(self, epoch: int) -> dict[str, Any]:
        """The committed epoch group's attributes (``lr``, ``rows``, ``recomputed``, ...)."""
        return self._epoch(epoch)["attrs"]

    def rank_groups(self, epoch: int, split: str = "train") -> list[zarr.Group]:
        """The rank groups of ``epoch`` that hold ``split`` rows, in rank order."""
        return self._epoch(epoch, split)["ranks"]

    def offsets(self, epoch: int, split: str = "train") -> np.ndarray:
        """``offsets[r]``: the global position of rank group ``r``'s first row; the last is the total."""
        return self._epoch(epoch, split)["offsets"]

    def rank_group(self, epoch: int, rank: int) -> zarr.Group:
        """Training rank group ``r<rank>`` of ``epoch``, where deduplicated rows point."""
        ep = self._epoch(epoch)
        if rank not in ep["by_rank"]:
            raise StoreReadError(
                f"Deduplicated rows refer to rank {rank} of epoch {epoch}, which is missing."
            )
        return ep["by_rank"][rank]

    def recomputed(self, epoch: int) -> list[str]:
        """Layers of ``epoch`` stored as weights to recompute from, not as rows."""
        return [str(x) for x in self.epoch_attrs(epoch).get("recomputed", [])]

    def lr(self, epoch: int) -> float:
        return float(self.epoch_attrs(epoch)["lr"])

    def row_count(self, epoch: int, split: str = "train") -> int:
        return int(self.offsets(epoch, split)[-1])

    def has_queries(self, epoch: int) -> bool:
        return bool(self.rank_groups(epoch, "query"))

    def rank_attrs(self, epoch: int, key: str) -> list[dict[str, Any]]:
        """Attribute ``key`` of each training rank group of ``epoch`` (``{}`` where absent)."""
        return [dict(dict(g.attrs).get(key, {}) or {}) for g in self.rank_groups(epoch)]

    def load(self, epochs: Sequence[int], split: str = "train") -> None:
        """Reads what is kept of each of ``epochs`` not yet cached (attributes, rank groups and row
        counts), every epoch's reads overlapping in one round trip to zarr."""
        choice("split", split, tuple(layout.SPLITS), StoreReadError)
        todo = [e for e in dict.fromkeys(epochs) if (e, split) not in self._epochs]
        if not todo:
            return

        async def all_of() -> list[dict[str, Any] | None]:
            known = self._committed
            return list(await asyncio.gather(*(_epoch_meta(self.root, e, split, known.get(e)) for e in todo)))

        for epoch, meta in zip(todo, zarr_sync(all_of())):
            if meta is None:
                raise StoreReadError(
                    f"Epoch {epoch} is not committed in this store; committed: {self.epochs}."
                )
            for g, ids in zip(meta["ranks"], meta.pop("ids")):
                self.opened[(g.path, "", "ids")] = ids  # opened for the row counts; read by row_field
            self._epochs[(epoch, split)] = meta

    def _epoch(self, epoch: int, split: str = "train") -> dict[str, Any]:
        self.load([epoch], split)
        return self._epochs[(epoch, split)]

    # ---------------------------------------------------------------- row records
    def row_field(self, epoch: int, field: str, split: str = "train") -> np.ndarray:
        """One per-row record of ``epoch``: ``ids``, ``step``, ``loss``, ``label`` or ``lr``."""
        key = (epoch, field, split)
        if key not in self._fields:  # committed epochs never change: read each field once
            parts = self.rank_records(epoch, field, split)
            self._records.pop(key, None)  # kept whole below
            empty = np.zeros(0, dtype=np.float64 if field in ("loss", "lr") else np.int64)
            self._fields[key] = np.concatenate(parts) if parts else empty
            self._fields[key].flags.writeable = False
        return self._fields[key]

    def preload(self, epochs: Sequence[int], records: Sequence[str] = (), split: str = "train") -> None:
        """Reads the metadata of ``epochs`` and their row ``records`` (``rows/<name>``, where stored)
        in three round trips to zarr's event loop, however many epochs."""
        self.load(epochs, split)
        wanted = [(e, n) for n in records for e in epochs if (e, n, split) not in self._fields]
        self._read_records(wanted, split, required=False)

    def optional_records(self, epoch: int, name: str, split: str = "train") -> list[np.ndarray] | None:
        """``rows/<name>`` of each rank of ``epoch``, or ``None`` when the epoch does not store it."""
        self._read_records([(epoch, name)], split, required=False)
        return self._records.get((epoch, name, split))

    def rank_records(self, epoch: int, name: str, split: str = "train") -> list[np.ndarray]:
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
        self.load([e for e, _ in todo], split)
        where = [(e, n, r, g) for e, n in todo for r, g in enumerate(self.rank_groups(e, split))]
        closed = [(g, n) for _, n, _, g in where if (g.path, "", n) not in self.opened]
        for (g, n), arr in zip(closed, open_many([(g, f"{layout.ROWS}/{n}") for g, n in closed])):
            if arr is not None:
                self.opened[(g.path, "", n)] = arr
        lacking = set()
        for e, n, _, g in where:
            if (g.path, "", n) not in self.opened:
                if required:
                    raise StoreReadError(f"{g.path}/{layout.ROWS}/{n} is missing from the store.")
                lacking.add((e, n))
        jobs = [(e, n, r, self.opened[(g.path, "", n)]) for e, n, r, g in where if (e, n) not in lacking]
        for e, _, r, arr in jobs:
            offsets = self.offsets(e, split)
            check_rows(arr, int(offsets[r + 1] - offsets[r]))
        values = take_many([(arr, slice(None)) for *_, arr in jobs]) if jobs else []
        for e, n in todo:
            if (e, n) not in lacking:
                self._records[(e, n, split)] = []
        for (e, n, _, arr), got in zip(jobs, values):
            require_chunks(arr)
            self._records[(e, n, split)].append(got)

    def captured_sqnorms(self, epoch: int, names: list[str], split: str = "train") -> np.ndarray | None:
        """Summed squared norms of layers ``names`` as captured (exact, before any quantization),
        when the capture kept them for all those layers on every rank; else ``None``."""
        if split != "train" or not names:
            return None
        columns = []
        for g in self.rank_groups(epoch, split):
            kept = g.attrs.get("sqnorms")  # which layers rows/sqnorm covers, written at the epoch's end
            if not kept or not set(names) <= set(kept["layers"]):
                return None
            columns.append([kept["columns"].index(n) for n in names])
        records = self.rank_records(epoch, layout.SQNORMS, split)
        parts = [rows[:, cols].astype(np.float64).sum(1) for rows, cols in zip(records, columns)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def rows_of(self, epoch: int, ids: Sequence[int] | np.ndarray, split: str = "train") -> np.ndarray:
        """Row positions of sample ``ids`` in ``epoch``, or a clear error for ids not captured there."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        key = (epoch, "sorted ids", split)
        if key not in self._fields:  # each query resolves ids; sort the epoch's ids once
            have = self.row_field(epoch, "ids", split)
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

    def rank_rows(self, rank_group: zarr.Group) -> int:
        """Rows of a rank group: the length of its ``ids``, which every per-row array must share."""
        key = (rank_group.path, "", "ids")
        if key not in self.opened:
            self.opened[key] = node(rank_group, f"{layout.ROWS}/ids")
        return int(self.opened[key].shape[0])

    # ---------------------------------------------------------------- bytes
    def nbytes_stored(self, epoch: int | None = None, layer: str | None = None) -> int:
        """Bytes stored for the whole store, one committed epoch, or one layer (in one epoch or all)."""
        if epoch is None and layer is None:
            # Each committed epoch listed on its own and kept, for later per-epoch or per-layer sizes.
            known = {f"{layout.EPOCHS}/{layout.epoch_key(e)}": self._epoch_sizes(e) for e in self.epochs}
            rest = object_sizes(self.root.store, "", skip=set(known))
            return sum(rest.values()) + sum(sum(s.values()) for s in known.values())
        if layer is not None:
            self.spec(layer)
        total = 0
        for ep in [epoch] if epoch is not None else self.epochs:
            self._epoch(ep)  # raises for an epoch that is not committed
            for key, size in self._epoch_sizes(ep).items():  # <rank group>/layers/<layer>/...
                parts = key.split("/", 2)
                mine = len(parts) == 3 and parts[1] == layout.LAYERS and parts[2].startswith(f"{layer}/")
                total += size if layer is None or mine else 0
        return total

    def array_bytes(self, epoch: int, layer: str, array: str) -> int:
        """Bytes of the chunks of logical array ``array`` of ``layer`` in ``epoch`` (its parts, such as
        codes and scales, not its dedup references ``<array>_ref``, nor metadata)."""
        total = 0
        for key, size in self._epoch_sizes(epoch).items():  # <rank group>/layers/<layer>/<part>/...
            parts = key.split("/")
            if len(parts) < 5 or parts[1] != layout.LAYERS or parts[2] != layer or parts[-1] == "zarr.json":
                continue
            part = parts[3]
            if part == array or (part.startswith(f"{array}_") and part != f"{array}_ref"):
                total += size
        return total

    def _epoch_sizes(self, epoch: int) -> dict[str, int]:
        if epoch not in self._sizes:  # a committed epoch's files never change: list them once
            self._sizes[epoch] = object_sizes(self.root.store, f"{layout.EPOCHS}/{layout.epoch_key(epoch)}")
        return self._sizes[epoch]


async def _epoch_meta(
    root: zarr.Group, epoch: int, split: str, listed: zarr.Group | None = None
) -> dict[str, Any] | None:
    """What is kept of committed ``epoch``'s ``split`` rows; ``None`` when not committed.

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
    store = group.store_path.store
    if isinstance(store, ReadStore):  # the manifests ride along with the metadata read here
        for g in found[: len(keys)]:
            store.expect(dict(group.attrs), g.path, dict(g.attrs))
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
