"""The write side of a gradient store for one training process (one rank)."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from mstore_lightning.core.checks import choice
from mstore_lightning.core.quant import TABLE
from mstore_lightning.store import layout
from mstore_lightning.store.weights import WEIGHTS, save_weights
from mstore_lightning.store.writer import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_QUEUE_BYTES,
    PARTS_ATTR,
    BackgroundWriter,
    Coder,
    PartSpec,
)

MODES = ("error", "overwrite", "append")


class StoreExistsError(FileExistsError):
    """The store path already holds a store and the mode does not allow touching it."""


class IncompatibleStoreError(ValueError):
    """An existing store cannot take this run's data (another schema or another set of layers)."""


class RunWriter:
    """Creates or reopens a store and writes one process's epochs into it.

    Args:
        uri: local path or fsspec URL of the store.
        mode: ``"error"`` refuses an existing store, ``"overwrite"`` replaces it, ``"append"`` adds
            epochs to it (an epoch already present is replaced).
        rank: this process's rank; each rank writes its own arrays.
        queue_bytes: bound on bytes waiting for the writer thread.
        chunk_bytes: target uncompressed chunk size.
        storage_options: fsspec options of a remote store.
        low_priority: write at the lowest CPU priority (see :class:`BackgroundWriter`).
    """

    def __init__(
        self,
        uri: str,
        mode: str = "error",
        rank: int = 0,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        storage_options: dict[str, Any] | None = None,
        low_priority: bool = True,
    ) -> None:
        choice("mode", mode, MODES)
        self.uri, self.mode, self.rank = str(uri), mode, rank
        self.storage_options = storage_options
        self.writer = BackgroundWriter(
            queue_bytes=queue_bytes, chunk_bytes=chunk_bytes, low_priority=low_priority
        )
        self.root: zarr.Group | None = None
        self._epoch_groups: dict[int, zarr.Group] = {}
        self._rank_groups: dict[tuple[int, str], zarr.Group] = {}

    # ---------------------------------------------------------------- run metadata
    def open(self, meta: dict[str, Any], resume: bool) -> bool:
        """Opens the store for writing; ``resume`` continues a run from a checkpoint.

        Returns:
            Whether a new store was created (rather than an existing one opened).
        """
        existing = _existing_meta(self.uri, self.storage_options)
        if existing is not None and not resume and self.mode == "error":
            raise StoreExistsError(
                f"{self.uri} already holds a gradient store. Pass GradientCapture(mode='overwrite') to "
                "replace it, mode='append' to add epochs to it, or choose another path."
            )
        if existing is not None and (resume or self.mode == "append"):
            _check_compatible(self.uri, existing, meta)
            self.root = zarr.open_group(self._store(), mode="r+")
            return False
        if self.rank == 0:
            meta = dict(meta, created=_dt.datetime.now(_dt.timezone.utc).isoformat())
            # The root and its metadata in one write: a reader never finds a root without metadata.
            self.root = zarr.create_group(
                self._store(), overwrite=True, attributes=layout.with_crc({layout.META_KEY: meta})
            )
            self.root.create_group(layout.EPOCHS)
            return True
        self.root = zarr.open_group(self._store(), mode="r+")
        return False

    def update_meta(self, **fields: Any) -> None:
        """Rank 0 records fields in the run metadata (layer specs once known, uncovered layers)."""
        if self.rank != 0:
            return
        meta = dict(self.root.attrs[layout.META_KEY])
        meta.update(layout.to_json(fields))
        # update_attributes writes zarr.json once; attrs.update writes it once per key, and a reader
        # between those writes finds the new metadata beside the old checksum.
        self.root.update_attributes(layout.with_crc({layout.META_KEY: meta}))

    # ---------------------------------------------------------------- epochs
    def begin_epoch(self, epoch: int, resume_rows: int | None = None) -> None:
        """Prepares ``epoch``: a fresh, uncommitted group, or the rows kept by a checkpoint."""
        path = f"{layout.EPOCHS}/{layout.epoch_key(epoch)}"
        rank_key = layout.rank_key(self.rank)
        epochs = self.root[layout.EPOCHS]
        if resume_rows is not None and layout.epoch_key(epoch) in epochs:
            group = self.root[path]
            self._epoch_groups[epoch] = group
            self._resume_arrays(group, rank_key, resume_rows)
            return
        if self.rank == 0:
            if layout.epoch_key(epoch) in epochs:
                _check_unreferenced(self.uri, epochs, epoch)
                self._record_committed(drop={epoch})  # first the record, then the data it vouches for
                del epochs[layout.epoch_key(epoch)]  # an uncommitted or replaced epoch restarts clean
            group = epochs.create_group(
                layout.epoch_key(epoch), attributes={"state": layout.OPEN, "epoch": epoch}
            )
        else:
            group = self.root[path]
        self._epoch_groups[epoch] = group

    def rank_group(self, epoch: int, split: str = "train") -> zarr.Group:
        """This rank's group of ``split`` rows in ``epoch``, created at its first use."""
        if (epoch, split) not in self._rank_groups:
            group, key = self._epoch_groups[epoch], layout.rank_key(self.rank, split)
            self._rank_groups[(epoch, split)] = group[key] if key in group else group.create_group(key)
        return self._rank_groups[(epoch, split)]

    def append(
        self,
        epoch: int,
        name: str,
        values: torch.Tensor | np.ndarray,
        dtype: Any,
        chunk_rows: int | None = None,
        coding: Callable[[], tuple[list[PartSpec], Coder]] | None = None,
        split: str = "train",
    ) -> None:
        """Appends rows to array ``name`` (a path under this rank's group of ``split`` rows).

        ``coding`` builds the array's stored parts and its coder when the array is opened (see
        :meth:`BackgroundWriter.open_array`); without it the rows are stored as given.
        """
        group = self.rank_group(epoch, split)
        if not self.writer.is_open(group, name):
            parts, coder = coding() if coding is not None else (None, None)
            self.writer.open_array(group, name, tuple(values.shape[1:]), dtype, chunk_rows, parts, coder)
        self.writer.append(group, name, values)

    def prune_epochs(self, keep: set[int]) -> None:
        """Rank 0 deletes every epoch group not in ``keep`` (work a resumed run will redo)."""
        if self.rank != 0:
            return
        epochs = self.root[layout.EPOCHS]
        found = {int(g.attrs.get("epoch", int(k))): k for k, g in list(epochs.groups())}
        doomed = {e: k for e, k in found.items() if e not in keep}
        self._record_committed(drop=set(doomed))
        for key in doomed.values():
            del epochs[key]

    def rows_written(self, epoch: int, split: str = "train") -> int:
        """Rows appended to this rank's row records of ``split`` in ``epoch``."""
        group = self.rank_group(epoch, split)
        name = f"{layout.ROWS}/ids"
        return self.writer.rows(group, name) if self.writer.has_array(group, name) else 0

    def flush(self) -> None:
        self.writer.flush()

    def finish_epoch(self, epoch: int) -> dict[str, int]:
        """Writes every buffered row of ``epoch`` and trims its arrays; returns rows per training array."""
        if (epoch, "query") in self._rank_groups:
            self.writer.finish_arrays(self._rank_groups[(epoch, "query")])
        return self.writer.finish_arrays(self.rank_group(epoch))

    def meta(self) -> dict[str, Any]:
        """The run metadata as stored."""
        return dict(self.root.attrs[layout.META_KEY])

    def layer_group(self, epoch: int, layer: str) -> zarr.Group:
        """This rank's group of ``layer`` in ``epoch`` (after :meth:`finish_epoch`)."""
        return self.rank_group(epoch)[f"{layout.LAYERS}/{layer}"]

    def rows_in_epoch(self, epoch: int) -> int:
        """Rows of this rank's finished ``epoch``."""
        return int(self.rank_group(epoch)[f"{layout.ROWS}/ids"].shape[0])

    def save_weights(self, epoch: int, module: Any) -> None:
        """Rank 0 stores ``module``'s state in ``epoch``, for the layers recomputed from it."""
        group = self._epoch_groups[epoch]
        save_weights(group.require_group(WEIGHTS), module)

    def set_rank_attrs(self, epoch: int, **attrs: Any) -> None:
        """Records JSON attributes on this rank's group of ``epoch`` (per-rank statistics)."""
        self.rank_group(epoch).update_attributes(layout.to_json(attrs))

    def commit_epoch(self, epoch: int, attrs: dict[str, Any]) -> None:
        """Rank 0 marks ``epoch`` committed; call only after every rank finished it."""
        group = self._epoch_groups.pop(epoch)
        for split in layout.SPLITS:
            self._rank_groups.pop((epoch, split), None)
        if self.rank == 0:
            # One write: the commit marker and the checksum of everything the epoch's attributes say.
            current = {k: v for k, v in group.attrs.items() if k != layout.CRC_KEY}
            group.update_attributes(
                layout.with_crc({**current, **attrs, "state": layout.COMMITTED, "epoch": epoch})
            )
            self._record_committed(add={epoch})

    def _record_committed(self, add: set[int] = frozenset(), drop: set[int] = frozenset()) -> None:
        """Keeps the run metadata's list of committed epochs, which readers check against the epoch
        groups they find: a committed epoch whose group went missing is damage, not absence."""
        if self.rank != 0:
            return
        listed = set(self.meta().get("committed", []))
        updated = (listed | set(add)) - set(drop)
        if updated != listed:
            self.update_meta(committed=sorted(updated))

    def abandon_epoch(self, epoch: int) -> None:
        """Stops writing ``epoch`` without committing it."""
        self._epoch_groups.pop(epoch, None)
        for split in layout.SPLITS:
            rank_group = self._rank_groups.pop((epoch, split), None)
            if rank_group is not None:
                self.writer.discard_arrays(rank_group)

    def close(self) -> None:
        self.writer.close()

    # ---------------------------------------------------------------- internals
    def _store(self) -> Any:
        return layout.zarr_store(self.uri, self.storage_options)

    def _resume_arrays(self, group: zarr.Group, rank_key: str, rows: int) -> None:
        """Trims this rank's arrays to the ``rows`` a checkpoint recorded and refills the last chunk."""
        query_key = layout.rank_key(self.rank, "query")
        if query_key in group:  # queries are captured at the epoch's end: a partial pass restarts
            del group[query_key]
        if rank_key not in group:
            return
        rank_group = group[rank_key]
        self._rank_groups[(group.attrs["epoch"], "train")] = rank_group
        arrays = dict(_arrays_under(rank_group))
        # An array's other parts, and a codec's tables, follow the array's first part.
        followers = {
            info["name"]
            for arr in arrays.values()
            for info in arr.attrs.get(PARTS_ATTR, {}).get("parts", [])[1:]
        }
        for path, arr in arrays.items():
            owner = arrays.get(path[: -len(TABLE)]) if path.endswith(TABLE) else None
            if path not in followers and (owner is None or "codec" not in owner.attrs):
                self.writer.adopt_array(rank_group, path, arr, rows)


def _arrays_under(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    out = []
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            out.append((path, member))
        else:
            out.extend(_arrays_under(member, path + "/"))
    return out


def _check_unreferenced(uri: str, epochs: zarr.Group, epoch: int) -> None:
    """Refuses to replace an epoch whose rows other epochs' deduplicated rows point to."""
    users = []
    for _, group in epochs.groups():
        other = int(group.attrs.get("epoch", -1))
        if other != epoch and any(
            epoch in dict(rank.attrs.get("dedup", {})).get("sources", []) for _, rank in group.groups()
        ):
            users.append(other)
    if users:
        raise IncompatibleStoreError(
            f"Epoch {epoch} of {uri} holds input rows that epochs {sorted(users)} reference "
            "(deduplication), so replacing it would corrupt them. Append other epochs, write to a new "
            "path, or pass mode='overwrite'."
        )


def _existing_meta(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    store = layout.zarr_store(uri, storage_options, read_only=True)
    try:
        root = zarr.open_group(store, mode="r", zarr_format=layout.ZARR_FORMAT)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        # Creating the store clears its path first, so anything already there would be lost.
        if _holds_data(uri, store):
            raise StoreExistsError(
                f"{uri} exists and is not a gradient store; choose another path."
            ) from None
        return None
    if layout.META_KEY not in root.attrs:
        raise StoreExistsError(f"{uri} holds a Zarr group that is not a gradient store; choose another path.")
    return dict(root.attrs[layout.META_KEY])


def _holds_data(uri: str, store: Any) -> bool:
    """Whether anything (a file, an object) is stored under ``uri``."""
    if not layout.is_url(uri):
        return os.path.exists(uri) and bool(os.listdir(uri))
    try:
        return not zarr_sync(store.is_empty(""))
    except FileNotFoundError:  # no bucket: nothing to lose, and creating the store says why it fails
        return False


def _check_compatible(uri: str, existing: dict[str, Any], meta: dict[str, Any]) -> None:
    if existing.get("schema_version") != layout.SCHEMA_VERSION:
        raise IncompatibleStoreError(
            f"{uri} has store schema version {existing.get('schema_version')}, this library writes "
            f"{layout.SCHEMA_VERSION}; write to a new path."
        )
    old, new = existing.get("model_layers"), meta.get("model_layers")
    if old is not None and new is not None and old != new:
        raise IncompatibleStoreError(
            f"{uri} was captured from a model with other layers ({sorted(old)[:8]}...); "
            "write this run to a new path or pass mode='overwrite'."
        )
