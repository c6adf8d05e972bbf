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
from mstore_lightning.core.errors import IncompatibleStoreError, StoreExistsError
from mstore_lightning.core.quant import TABLE
from mstore_lightning.store import layout
from mstore_lightning.store.buffers import PARTS_ATTR, Coder, PartSpec
from mstore_lightning.store.manifest import FORMAT, MANIFEST, ManifestStore
from mstore_lightning.store.weights import WEIGHTS, save_weights
from mstore_lightning.store.writer import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_BYTES, BackgroundWriter

MODES = ("error", "overwrite", "append")
# Policy fields that decide what a stored row is: a store holds one value of each.
STORAGE_POLICY = (
    "precision",
    "layer_precision",
    "dedup",
    "representation",
    "budget",
    "projection_dim",
    "projection_seed",
    "pool",
    "loss_reduction",
)
# Fields of a layer spec known when the store is opened, and those fixed at the layer's first batch.
LAYER_FIELDS_AT_OPEN = ("module_type", "param_shapes")
LAYER_STORAGE_FIELDS = ("representation", "arrays", "projection", "summary")


class RunWriter:
    """Creates or reopens a store and writes one process's epochs into it.

    Args:
        uri: local path or fsspec URL of the store.
        mode: ``"error"`` refuses an existing store, ``"overwrite"`` replaces it, ``"append"`` adds
            epochs after its committed ones (it never replaces or deletes a committed epoch; only an
            uncommitted one, left by a crash, restarts clean).
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
        self._written: ManifestStore | None = None
        self._resumed: set[str] = set()  # groups holding chunks an earlier process wrote
        self._epoch_groups: dict[int, zarr.Group] = {}
        self._rank_groups: dict[tuple[int, str], zarr.Group] = {}

    # ---------------------------------------------------------------- run metadata
    def open(
        self,
        meta: dict[str, Any],
        resume: bool,
        layers: dict[str, dict[str, Any]] | None = None,
        captures: Callable[[int], bool] | None = None,
    ) -> bool:
        """Opens the store for writing; ``resume`` continues a run from a checkpoint of this store.

        Args:
            meta: this run's metadata.
            resume: whether the run continues from a checkpoint of this store.
            layers: the layers this run captures, each with the spec fields known before its first
                batch (``module_type``, ``param_shapes``), checked against the store's.
            captures: ``captures(epoch)``: whether this run (when not resumed) would capture ``epoch``.
                With ``mode="append"``, such an epoch the store holds committed refuses the run.

        Returns:
            Whether a new store was created (rather than an existing one opened).

        Raises:
            StoreExistsError: the store exists and the mode does not allow touching it.
            IncompatibleStoreError: the store holds another schema, other layers or another storage
                policy, or (appending, not resumed) committed epochs this run would capture again.
        """
        existing = _existing_meta(self.uri, self.storage_options)
        if existing is not None and not resume and self.mode == "error":
            raise StoreExistsError(
                f"{self.uri} already holds a gradient store. Pass GradientCapture(mode='overwrite') to "
                "replace it, mode='append' to add epochs to it, or choose another path."
            )
        if existing is not None and (resume or self.mode == "append"):
            # Every check reads only: a refused run leaves the store as it was.
            _check_compatible(self.uri, existing, meta, layers or {})
            if not resume and captures is not None:
                _check_no_recapture(self.uri, self.storage_options, existing, captures)
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
                _check_not_committed(self.uri, self.meta(), epochs[layout.epoch_key(epoch)], epoch)
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
        """Rank 0 deletes every epoch group not in ``keep`` (work a resumed run will redo).

        Only for a run resumed from a checkpoint of this store: ``keep`` holds the checkpoint's
        committed epochs and its open one, so an epoch both the store and the checkpoint list as
        committed is never touched; epochs committed after the checkpoint are redone.
        """
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
        """Writes every buffered row of ``epoch``, trims its arrays and writes this process's
        manifests of them; returns rows per training array."""
        if (epoch, "query") in self._rank_groups:
            query = self._rank_groups[(epoch, "query")]
            self.writer.finish_arrays(query)
            self._seal(query)
        rows = self.writer.finish_arrays(self.rank_group(epoch))
        self._seal(self.rank_group(epoch))
        return rows

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
        weights = self._epoch_groups[epoch].require_group(WEIGHTS)
        save_weights(weights, module)
        self._seal(weights)

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
                layout.with_crc(
                    {**current, **attrs, MANIFEST: FORMAT, "state": layout.COMMITTED, "epoch": epoch}
                )
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
        group = self._epoch_groups.pop(epoch, None)
        if group is not None:
            self._written.forget(group.path)
        for split in layout.SPLITS:
            rank_group = self._rank_groups.pop((epoch, split), None)
            if rank_group is not None:
                self.writer.discard_arrays(rank_group)

    def close(self) -> None:
        self.writer.close()

    # ---------------------------------------------------------------- internals
    def _store(self) -> ManifestStore:
        if self._written is None:
            self._written = ManifestStore(layout.zarr_store(self.uri, self.storage_options))
        return self._written

    def _seal(self, group: zarr.Group) -> None:
        """Writes the manifest of the chunks below ``group``, once the writer has stored them all."""
        listed = zarr_sync(self._written.manifest(group.path, complete=group.path in self._resumed))
        self._resumed.discard(group.path)
        group.update_attributes({MANIFEST: listed})

    def _resume_arrays(self, group: zarr.Group, rank_key: str, rows: int) -> None:
        """Trims this rank's arrays to the ``rows`` a checkpoint recorded and refills the last chunk."""
        query_key = layout.rank_key(self.rank, "query")
        if query_key in group:  # queries are captured at the epoch's end: a partial pass restarts
            del group[query_key]
        if rank_key not in group:
            return
        rank_group = group[rank_key]
        self._rank_groups[(group.attrs["epoch"], "train")] = rank_group
        self._resumed.add(rank_group.path)
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


def _referencing(epochs: zarr.Group, epoch: int) -> list[int]:
    """Epochs whose deduplicated rows point to rows of ``epoch``."""
    users = []
    for _, group in epochs.groups():
        other = int(group.attrs.get("epoch", -1))
        if other != epoch and any(
            epoch in dict(rank.attrs.get("dedup", {})).get("sources", []) for _, rank in group.groups()
        ):
            users.append(other)
    return sorted(users)


def _referenced_note(uri: str, epochs: zarr.Group, epoch: int) -> str:
    users = _referencing(epochs, epoch)
    if not users:
        return ""
    return (
        f"Epoch {epoch} of {uri} holds input rows that epochs {users} reference "
        "(deduplication), so replacing it would corrupt them."
    )


def _check_unreferenced(uri: str, epochs: zarr.Group, epoch: int) -> None:
    """Refuses to replace an epoch whose rows other epochs' deduplicated rows point to."""
    note = _referenced_note(uri, epochs, epoch)
    if note:
        raise IncompatibleStoreError(
            f"{note} Append other epochs, write to a new path, or pass mode='overwrite'."
        )


def _committed_epochs(meta: dict[str, Any], epochs: zarr.Group) -> set[int]:
    """Epochs the run metadata lists as committed, and those whose group says so."""
    found = {int(e) for e in meta.get("committed", [])}
    for key, group in epochs.groups():
        if group.attrs.get("state") == layout.COMMITTED:
            found.add(int(group.attrs.get("epoch", int(key))))
    return found


def _recapture_message(uri: str, committed: list[int], again: list[int], notes: str = "") -> str:
    return (
        f"{uri} holds committed epochs {committed}, and this fit, which does not resume from a "
        f"checkpoint of this store, would capture epochs {again} again; mode='append' never replaces "
        "or deletes a committed epoch. To continue that run, resume it from its Lightning checkpoint "
        "(trainer.fit(..., ckpt_path=...)) so its epochs continue after the last committed one; to "
        "add other epochs, choose a policy `epochs` (and max_epochs) that leave out the committed "
        "ones; or pass mode='overwrite' to replace the store, or write to another store path."
        + (f" {notes}" if notes else "")
    )


def _check_no_recapture(
    uri: str, storage_options: dict[str, Any] | None, meta: dict[str, Any], captures: Callable[[int], bool]
) -> None:
    """Refuses an appending run that would capture an epoch the store holds committed."""
    root = zarr.open_group(layout.zarr_store(uri, storage_options, read_only=True), mode="r")
    if layout.EPOCHS not in root:
        committed, again = sorted(int(e) for e in meta.get("committed", [])), []
    else:
        epochs = root[layout.EPOCHS]
        committed = sorted(_committed_epochs(meta, epochs))
        again = [e for e in committed if captures(e)]
    if again:
        notes = " ".join(n for n in (_referenced_note(uri, epochs, e) for e in again) if n)
        raise IncompatibleStoreError(_recapture_message(uri, committed, again, notes))


def _check_not_committed(uri: str, meta: dict[str, Any], group: zarr.Group, epoch: int) -> None:
    """Refuses to restart an epoch the store holds committed (only a resume redoes, after pruning)."""
    if epoch in {int(e) for e in meta.get("committed", [])} or group.attrs.get("state") == layout.COMMITTED:
        committed = sorted(int(e) for e in meta.get("committed", []))
        raise IncompatibleStoreError(_recapture_message(uri, committed, [epoch]))


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


def _check_compatible(
    uri: str, existing: dict[str, Any], meta: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    """Refuses a store whose schema, layers or storage policy differ from this run's, naming the
    first differing field with both values. ``layers`` holds this run's spec fields known at open."""
    if existing.get("schema_version") != layout.SCHEMA_VERSION:
        raise IncompatibleStoreError(
            f"{uri} has store schema version {existing.get('schema_version')}, this library writes "
            f"{layout.SCHEMA_VERSION}; write to a new path."
        )
    old, new = existing.get("model_layers"), meta.get("model_layers")
    if old is not None and new is not None and old != new:
        name = next(n for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n))
        raise IncompatibleStoreError(
            f"{uri} was captured from a model with other layers ({sorted(old)[:8]}...): layer {name!r} "
            f"is {old.get(name)!r} in the store, {new.get(name)!r} in this run (None: no such layer); "
            "write this run to a new path or pass mode='overwrite'."
        )
    stored_specs = existing.get("layers") or {}
    for name in sorted(set(stored_specs) & set(layers)):
        for key in LAYER_FIELDS_AT_OPEN:
            old_value, new_value = stored_specs[name].get(key), layers[name].get(key)
            _refuse_if_differs(uri, f"layer {name!r} {key}", old_value, new_value)
    old_policy, new_policy = existing.get("policy"), meta.get("policy")
    if isinstance(old_policy, dict) and isinstance(new_policy, dict):
        for key in STORAGE_POLICY:
            _refuse_if_differs(uri, f"policy {key!r}", old_policy.get(key), new_policy.get(key))


def check_layer_storage(uri: str, name: str, stored: dict[str, Any], spec: dict[str, Any]) -> None:
    """Refuses a layer whose storage, chosen at its first batch, differs from the store's spec."""
    for key in LAYER_STORAGE_FIELDS:
        old, new = stored.get(key), spec.get(key)
        if key == "projection":  # the predicted error is a float of the choice, not a storage field
            old, new = (_without(v, "predicted_error") for v in (old, new))
        if key == "summary":
            old, new = old or None, new or None
        _refuse_if_differs(uri, f"layer {name!r} {key}", old, new)


def _without(value: Any, key: str) -> Any:
    return {k: v for k, v in value.items() if k != key} if isinstance(value, dict) else value


def _refuse_if_differs(uri: str, field: str, stored: Any, ours: Any) -> None:
    stored, ours = layout.to_json(stored), layout.to_json(ours)
    if stored != ours:
        raise IncompatibleStoreError(
            f"{uri} cannot take this run's data: {field} is {stored!r} in the store, {ours!r} in this "
            "run. A store holds one model's layers with one storage policy; write this run to a new "
            "path or pass mode='overwrite' to replace the store."
        )
