"""Checking a gradient store for damage: every chunk decoded, every commit and reference accounted for.

What is checked (see :mod:`mstore_lightning.store.layout` for the layout):

- every node's ``zarr.json`` is there and readable, and no chunk file is left without its array;
- every array the run metadata promises to each rank of a committed epoch is there, with its layer
  spec's dtype and row shape and as many rows as its siblings and the epoch's commit (``rows``);
- every chunk of every committed epoch decodes. Each chunk carries a crc32c checksum, so a flipped
  byte or a truncated file fails. A missing chunk file is damage, except in arrays that leave all-zero
  chunks unwritten: deduplicated inputs (whose duplicate rows are zeros) and stored weights;
- every chunk is the one its group's manifest lists at its place (see :mod:`.manifest`): a chunk
  copied from another epoch or array, one added after the commit, or one the manifest lists that is
  gone, is damage. Epochs committed before manifests existed are named in a note;
- the squared norms kept at capture (``rows/sqnorm``) are there wherever a rank group says readers
  take norms from them, and every dedup reference chunk is there: reads need both;
- epochs are committed in order: an uncommitted epoch followed by a committed one lost its commit,
  while an uncommitted *last* epoch is a capture still running (or stopped mid-epoch) and only noted;
- every deduplication reference ``(epoch, rank, row)`` points back at a row that exists and is stored
  in place, rows stored as references hold no data of their own, and an unwritten chunk of a
  deduplicated array holds references only.

Example::

    report = verify("runs/demo.zarr")
    if not report.ok:
        print(report.summary())
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import collect_aiterator

from mstore_lightning.core.quant import REF, stored_arrays
from mstore_lightning.store import layout
from mstore_lightning.store.dedup import NO_REF, ZERO_ROW
from mstore_lightning.store.manifest import ManifestError
from mstore_lightning.store.verify_report import Problem, VerifyReport
from mstore_lightning.store.zarr_io import ReadStore, StoreReadError

META = "zarr.json"
_UNKNOWN = -2  # a reference whose chunk could not be decoded: not checked further
_SHOWN = 5  # rows named in one problem; the rest are counted


def verify(
    uri: str | os.PathLike,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Reads and checks every chunk and every piece of metadata of the store at ``uri``.

    Args:
        uri: local path or fsspec URL of the store.
        storage_options: passed to fsspec for URLs.
        progress: called as ``progress(chunks_done, chunks_total)`` as chunks are decoded.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is false when anything is damaged.

    Raises:
        StoreReadError: ``uri`` holds no gradient store at all (no directory, no Zarr group, no
            gradient-store metadata, or another schema version).
    """
    return _Check(os.fspath(uri), storage_options).run(progress)


@dataclass
class _Planned:
    """An array to decode and what the layout says of it."""

    path: str
    array: Any
    omit_zero: bool  # all-zero chunks may be left unwritten
    dedup: str | None = None  # "<layer>/<array>" whose rows this array stores or references
    chunks: list[tuple[tuple[int, ...], str]] = field(default_factory=list)  # (grid coords, key)

    @property
    def is_ref(self) -> bool:
        return self.path.endswith(REF) and self.dedup is not None


@dataclass(frozen=True)
class _Want:
    """What the layout expects of one array of a rank group."""

    per: str = "row"  # "row": one row per sample; "chunk": one row per chunk of ``owner``
    dtype: str | None = None
    row_shape: tuple[int, ...] | None = ()
    omit_zero: bool = False
    dedup: str | None = None
    owner: str | None = None


class _Check:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None) -> None:
        self.uri = uri
        self.store = ReadStore(_open_raw(uri, storage_options))
        self.report = VerifyReport(uri)
        self.problems: dict[tuple[str, str | None], Problem] = {}
        self.keys: set[str] = set()
        self.nodes: set[str] = set()  # paths with a zarr.json ("" is the root)
        self.chunk_files: dict[str, set[str]] = defaultdict(set)  # array path -> chunk keys present
        self.attrs: dict[int, dict[str, Any]] = {}  # epoch -> its group's attributes
        self.rows: dict[tuple[int, str], int] = {}  # (epoch, rank group) -> rows
        self.opened: dict[str, Any] = {}  # path -> its group or array, None when unreadable
        self.under: dict[str, set[str]] = defaultdict(set)  # "epochs/<e>" and "epochs/<e>/<group>" -> paths

    def run(self, progress: Callable[[int, int], None] | None) -> VerifyReport:
        self.keys = set(collect_aiterator(self.store.list()))
        for key in self.keys:
            if key == META or key.endswith("/" + META):
                self.nodes.add(key[: -len(META)].rstrip("/"))
            elif (owner := _chunk_owner(key)) is not None:
                self.chunk_files[owner[0]].add(owner[1])
        for path in self.nodes | set(self.chunk_files):
            parts = path.split("/")
            if parts[0] == layout.EPOCHS and len(parts) > 2:
                self.under["/".join(parts[:2])].add(path)
                if len(parts) > 3:
                    self.under["/".join(parts[:3])].add(path)
        meta = self._root_meta()
        if meta is not None:
            committed = self._epochs()
            for lost in sorted(set(meta.get("committed", [])) - set(committed)):
                self._flag(
                    f"{layout.EPOCHS}/{layout.epoch_key(lost)}",
                    None,
                    "the run's metadata lists this epoch as committed, but its group is missing or not committed",
                )
            plans = [p for e in committed for p in self._plan_epoch(e, meta)]
            bare = self.report.epochs_without_manifest
            if bare:
                self.report.notes.append(
                    f"epoch(s) {bare} were committed before manifests existed: their chunks are checked "
                    "by their own crc32c, which cannot tell a chunk copied from another epoch or array"
                )
            for path, chunks in self.chunk_files.items():
                if path not in self.nodes and _epoch_of(path) in [*committed, None]:
                    self._flag(
                        path, None, f"array metadata zarr.json is missing ({len(chunks)} chunk files left)"
                    )
            refs, data = self._decode(plans, progress)
            self._check_references(plans, refs, data)
        self.report.problems = list(self.problems.values())
        return self.report

    def _flag(self, path: str, chunk: str | None, what: str) -> None:
        self.problems.setdefault((path, chunk), Problem(path, chunk, what))

    # ---------------------------------------------------------------- metadata
    def _root_meta(self) -> dict[str, Any] | None:
        if "" not in self.nodes:
            if any(k.startswith(layout.EPOCHS + "/") for k in self.keys):
                self._flag("/", None, "the root zarr.json is missing, so the store cannot be opened")
                return None
            raise StoreReadError(f"No gradient store at {self.uri!r}: it holds no Zarr group.")
        root = self._node("")
        if root is None:
            return None
        if layout.META_KEY not in root.attrs:
            raise StoreReadError(f"{self.uri!r} is a Zarr group without gradient-store metadata.")
        meta = dict(root.attrs[layout.META_KEY])
        self._check_crc("", root.attrs.asdict())
        if meta.get("schema_version") != layout.SCHEMA_VERSION:
            raise StoreReadError(
                f"{self.uri!r} has store schema version {meta.get('schema_version')}; this library reads "
                f"version {layout.SCHEMA_VERSION}."
            )
        return meta

    def _check_crc(self, path: str, attrs: dict[str, Any]) -> None:
        if layout.crc_mismatch(attrs):
            self._flag(path or "/", None, "its attributes fail their crc32c checksum: zarr.json was altered")

    def _node(self, path: str) -> Any:
        """The group or array at ``path``, or None (and a problem) when its zarr.json cannot be read."""
        if path not in self.opened:
            try:
                self.opened[path] = zarr.open(
                    store=self.store, path=path, mode="r", zarr_format=layout.ZARR_FORMAT
                )
            except Exception as exc:  # noqa: BLE001 - whatever fails to parse is the damage reported
                self._flag(path or "/", None, f"zarr.json cannot be read ({_reason(exc)})")
                self.opened[path] = None
        return self.opened[path]

    def _epochs(self) -> list[int]:
        """Reads every epoch's state and returns the committed epochs, whose data is checked."""
        prefix = layout.EPOCHS + "/"
        names = sorted({p.split("/")[1] for p in self.under})
        if names and layout.EPOCHS not in self.nodes:
            self._flag(layout.EPOCHS, None, "group metadata zarr.json is missing, so readers see no epochs")
        states: dict[int, str] = {}
        for name in names:
            path = prefix + name
            if not name.isdigit():
                continue
            if path not in self.nodes:
                self._flag(path, None, "epoch group metadata zarr.json is missing; its data is invisible")
                continue
            group = self._node(path)
            if group is None:
                continue
            epoch, attrs = int(name), group.attrs.asdict()
            if attrs.get("epoch", epoch) != epoch:
                self._flag(path, None, f"the group says it is epoch {attrs['epoch']} under the name {name}")
            states[epoch], self.attrs[epoch] = str(attrs.get("state", "none")), attrs
            self._check_crc(path, attrs)
        committed = sorted(e for e, s in states.items() if s == layout.COMMITTED)
        self.report.epochs_committed = committed
        self.report.epochs_open = sorted(set(states) - set(committed))
        for e in self.report.epochs_open:
            later = [c for c in committed if c > e]
            if not later:
                self.report.notes.append(
                    f"epoch {e} is open (state {states[e]!r}): a capture still running or stopped "
                    "mid-epoch; readers skip it, and its data is not checked"
                )
                continue
            state = "has no state" if states[e] == "none" else f"is in state {states[e]!r}"
            sealed = " though it carries the rest of its commit" if "rows" in self.attrs[e] else ""
            self._flag(
                prefix + layout.epoch_key(e),
                None,
                f"missing commit: epoch {e} holds data but {state}{sealed}, while the later epoch "
                f"{later[0]} is committed; readers skip it",
            )
        return committed

    def _plan_epoch(self, epoch: int, meta: dict[str, Any]) -> list[_Planned]:
        """Checks the metadata of every array of a committed epoch; returns the arrays to decode."""
        base = f"{layout.EPOCHS}/{layout.epoch_key(epoch)}"
        under = self.under.get(base, set())
        groups = sorted({p.split("/")[2] for p in under})
        ranks = [g for g in groups if g[:1] in layout.SPLITS.values() and g[1:].isdigit()]
        train = [g for g in ranks if g[:1] == layout.SPLITS["train"]]
        want = _expected(meta, set(self.attrs[epoch].get("recomputed", [])))
        for group in groups:
            self._check_manifest(epoch, f"{base}/{group}")
        plans: list[_Planned] = []
        for group in ranks:
            rows = self._plan_rank(epoch, f"{base}/{group}", want, plans, alone=train == [group])
            if rows is not None:
                self.rows[(epoch, group)] = rows
        for group in sorted(set(groups) - set(ranks)):  # stored weights, or anything else: decode it
            for path in sorted(p for p in under if p.split("/")[2] == group and self._is_array(p)):
                plans.append(self._plan(path, omit_zero=True))
        promised = self.attrs[epoch].get("rows")
        held = sum(self.rows.get((epoch, g), 0) for g in train)
        if promised is not None and train and held != int(promised):
            self._flag(base, None, f"the epoch's commit says {promised} rows but its arrays hold {held}")
        return [p for p in plans if p is not None]

    def _check_manifest(self, epoch: int, path: str) -> None:
        """Hands the group's manifest to the reads that follow, which check each chunk against it,
        and flags the chunks it lists that are gone (reads skip unwritten chunks of some arrays)."""
        group = self._node(path) if path in self.nodes else None
        if not isinstance(group, zarr.Group):
            return  # flagged where the group is needed
        try:
            self.store.expect(self.attrs[epoch], path, group.attrs.asdict())
        except StoreReadError:
            self.store.manifests[path] = None  # flagged once here, not at every chunk
            self._flag(path, None, "has no manifest, though its epoch was committed with one")
            return
        listed = self.store.manifests[path]
        if listed is None:
            if epoch not in self.report.epochs_without_manifest:
                self.report.epochs_without_manifest.append(epoch)
            return
        for key in sorted(listed):
            full = f"{path}/{key}"
            if full not in self.keys:
                array, chunk = _chunk_owner(full) or (full, None)
                self._flag(array, chunk, "chunk file is missing, though its group's manifest lists it")

    def _plan_rank(
        self, epoch: int, path: str, want: dict[str, _Want], plans: list[_Planned], alone: bool
    ) -> int | None:
        """Checks one rank group's arrays; returns its row count (None when nothing tells it)."""
        if not self.under.get(path):
            return None  # a rank that captured nothing this epoch
        want = {**want, **self._kept_norms(path)}
        opened: dict[str, Any] = {}
        for name in want:
            full = f"{path}/{name}"
            if full not in self.nodes:
                left = len(self.chunk_files.get(full, ()))
                what = (
                    f"array metadata zarr.json is missing ({left} chunk files left)"
                    if left
                    else "array is missing"
                )
                self._flag(full, None, what)
                continue
            self._check_parents(full)
            if isinstance(arr := self._node(full), zarr.Group):
                self._flag(full, None, "is a group where the layout has an array")
            elif arr is not None:
                opened[name] = arr
        counts = Counter(int(a.shape[0]) for n, a in opened.items() if want[n].per == "row" and a.ndim)
        if not counts:
            return None
        promised = self.attrs[epoch].get("rows")
        ids = opened.get(f"{layout.ROWS}/ids")
        if alone and promised in counts:
            rows = int(promised)  # the only training rank: the commit settles which arrays lie
        else:
            top = [c for c, k in counts.most_common() if k == counts.most_common(1)[0][1]]
            rows = int(ids.shape[0]) if ids is not None and ids.shape[0] in top else top[0]
        for name, arr in opened.items():
            if self._agrees(f"{path}/{name}", arr, want[name], rows, opened):
                plans.append(self._plan(f"{path}/{name}", want[name].omit_zero, arr, want[name].dedup))
        extra = (self.under[path] & self.nodes) - {f"{path}/{n}" for n in want}
        for other in sorted(p for p in extra if self._is_array(p)):
            plans.append(self._plan(other, omit_zero=True))  # not in the layout: decode it all the same
        return rows

    def _kept_norms(self, path: str) -> dict[str, _Want]:
        """``rows/sqnorm`` of a training rank group whose attributes say readers take norms from it."""
        group = self._node(path) if path.rsplit("/", 1)[-1][:1] == layout.SPLITS["train"] else None
        kept = dict(group.attrs).get("sqnorms") if isinstance(group, zarr.Group) else None
        if not kept or not kept.get("layers"):
            return {}
        return {f"{layout.ROWS}/{layout.SQNORMS}": _Want(dtype="float32", row_shape=(len(kept["columns"]),))}

    def _agrees(self, path: str, arr: Any, want: _Want, rows: int, opened: dict[str, Any]) -> bool:
        """Whether the array's metadata matches the layout; a mismatch is flagged."""
        shape = tuple(int(s) for s in arr.shape)
        if want.dtype is not None and np.dtype(arr.dtype) != np.dtype(want.dtype):
            self._flag(path, None, f"dtype {arr.dtype} disagrees with the layer spec's {want.dtype}")
            return False
        if want.row_shape is not None and shape[1:] != want.row_shape:
            self._flag(
                path, None, f"shape {shape} disagrees with the layer spec's rows of shape {want.row_shape}"
            )
            return False
        expect, why = rows, "the epoch's commit and the sibling arrays hold"
        if want.per == "chunk":  # one row per chunk of the array it belongs to
            if want.owner not in opened:
                return True
            expect, why = math.ceil(rows / opened[want.owner].chunks[0]), "the chunks of its array need"
        if not shape or shape[0] != expect:
            self._flag(path, None, f"shape {shape} says {shape[0] if shape else 0} rows where {why} {expect}")
            return False
        return True

    def _plan(self, path: str, omit_zero: bool, arr: Any = None, dedup: str | None = None) -> _Planned | None:
        arr = arr if arr is not None else self._node(path)
        if arr is None:
            return None
        plan = _Planned(path, arr, omit_zero, dedup)
        plan.chunks = [
            (c, arr.metadata.encode_chunk_key(c)) for c in itertools.product(*map(range, arr.cdata_shape))
        ]
        for key in sorted(self.chunk_files.get(path, set()) - {k for _, k in plan.chunks}):
            self._flag(path, key, f"chunk file lies outside the array's shape {tuple(arr.shape)}")
        return plan

    def _is_array(self, path: str) -> bool:
        return path in self.nodes and isinstance(self._node(path), zarr.Array)

    def _check_parents(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.nodes:
                self._flag(parent, None, "group metadata zarr.json is missing; readers cannot see below it")
            elif not isinstance(node := self._node(parent), zarr.Group) and node is not None:
                self._flag(parent, None, "is an array where the layout has a group")  # unreadable: flagged

    # ---------------------------------------------------------------- chunks
    def _decode(
        self, plans: list[_Planned], progress: Callable[[int, int], None] | None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Decodes every chunk; returns the references of deduplicated arrays as readers see them and,
        for their stored parts, which rows hold data (-1 where the chunk could not be decoded)."""
        total, done = sum(len(p.chunks) for p in plans), 0
        refs: dict[str, np.ndarray] = {}
        data: dict[str, np.ndarray] = {}
        for plan in plans:
            arr = plan.array
            self.report.arrays_checked += 1
            if plan.is_ref:
                refs[plan.path] = np.zeros(arr.shape, dtype=np.int64)  # unwritten chunks read as zeros
            elif plan.dedup is not None:
                data[plan.path] = np.zeros(arr.shape[0], dtype=np.int8)
            step = int(arr.chunks[0]) if arr.ndim else 1
            for coords, key in plan.chunks:
                lo = coords[0] * step if arr.ndim else 0
                if f"{plan.path}/{key}" not in self.keys:
                    if not plan.omit_zero:
                        self._flag(plan.path, key, "chunk file is missing (readers would see zeros)")
                elif (block := self._read(plan.path, arr, coords, key)) is None:
                    if plan.is_ref:
                        refs[plan.path][lo : lo + step] = _UNKNOWN
                    elif plan.path in data:
                        data[plan.path][lo : lo + step] = -1
                elif plan.is_ref:
                    refs[plan.path][lo : lo + len(block)] = block
                elif plan.path in data and block.size:
                    data[plan.path][lo : lo + len(block)] = block.reshape(len(block), -1).any(axis=1)
                done += 1
                self.report.chunks_checked += 1
                if progress is not None:
                    progress(done, total)
        return refs, data

    def _read(self, path: str, arr: Any, coords: tuple[int, ...], key: str) -> np.ndarray | None:
        try:
            return np.asarray(arr.get_block_selection(coords))
        except Exception as exc:  # noqa: BLE001 - every decoding failure is damage to report
            if isinstance(exc, ManifestError):
                what = exc.problem
            elif "checksum" in str(exc).lower():
                what = "crc32c checksum mismatch: the chunk file is corrupt (flipped bytes or truncated)"
            else:
                what = f"chunk cannot be decoded ({_reason(exc)})"
            self._flag(path, key, what)
            return None

    # ---------------------------------------------------------------- deduplication
    def _check_references(
        self, plans: list[_Planned], refs: dict[str, np.ndarray], data: dict[str, np.ndarray]
    ) -> None:
        by_path = {p.path: p for p in plans}
        in_place: dict[tuple[int, str, str], np.ndarray] = {}  # (epoch, rank group, "<layer>/<array>")
        for path, ref in refs.items():
            epoch, group = _epoch_group(path)
            # 1: stored in place (a row of zeros counts), 0: a reference, -1: unknown (chunk undecodable)
            stored = (ref == NO_REF).all(axis=1) | (ref == ZERO_ROW).all(axis=1)
            in_place[(epoch, group, by_path[path].dedup)] = np.where(
                (ref == _UNKNOWN).any(axis=1), -1, stored
            )
        for path, ref in refs.items():
            plan = by_path[path]
            epoch, group = _epoch_group(path)
            parts = [p for p in data if by_path[p].dedup == plan.dedup and _epoch_group(p) == (epoch, group)]
            has_data = np.zeros(len(ref), dtype=bool)
            unknown = (ref == _UNKNOWN).any(axis=1)
            for part in parts:
                has_data |= data[part] == 1
                unknown |= data[part] == -1
                self._check_unwritten(by_path[part], ref)
            bad: dict[str, list[str]] = defaultdict(list)
            for row in np.nonzero(~unknown & (in_place[(epoch, group, plan.dedup)] == 0))[0].tolist():
                target = tuple(int(v) for v in ref[row])
                why = self._bad_reference(epoch, group, plan.dedup, row, target, in_place)
                if why is None and has_data[row]:
                    why = f"is a reference to {_where(target)} but holds data of its own"
                if why is not None:
                    key = plan.array.metadata.encode_chunk_key((row // int(plan.array.chunks[0]), 0))
                    bad[key].append(f"row {row} {why}")
            for key, found in bad.items():
                more = f" (and {len(found) - _SHOWN} more rows)" if len(found) > _SHOWN else ""
                self._flag(path, key, f"broken deduplication reference: {'; '.join(found[:_SHOWN])}{more}")

    def _bad_reference(
        self,
        epoch: int,
        group: str,
        array: str,
        row: int,
        target: tuple[int, int, int],
        in_place: dict[tuple[int, str, str], np.ndarray],
    ) -> str | None:
        e, r, at = target
        if min(target) < 0:
            return f"holds a malformed reference {target}"
        if e not in self.report.epochs_committed:
            return f"refers to {_where(target)}, but epoch {e} {'is not committed' if e in self.attrs else 'does not exist'}"
        source = layout.rank_key(r)
        if (e, source) not in self.rows:
            return f"refers to {_where(target)}, but epoch {e} has no rank {r}"
        if at >= self.rows[(e, source)]:
            return f"refers to {_where(target)}, but that rank holds {self.rows[(e, source)]} rows"
        query = group[:1] == layout.SPLITS["query"]
        if e > epoch or (e == epoch and not query and (source != group or at >= row)):
            return f"refers forward to {_where(target)}; references point at rows stored before them"
        stored = in_place.get((e, source, array))
        if stored is not None and stored[at] == 0:
            return f"refers to {_where(target)}, which is itself a reference, not a stored row"
        return None

    def _check_unwritten(self, plan: _Planned, ref: np.ndarray) -> None:
        """An unwritten chunk of a deduplicated array's stored part must hold references only."""
        step = int(plan.array.chunks[0])
        for coords, key in plan.chunks:
            if f"{plan.path}/{key}" in self.keys:
                continue
            stored = int((ref[coords[0] * step : (coords[0] + 1) * step] == NO_REF).all(axis=1).sum())
            if stored > 1:  # two all-zero rows would have been deduplicated against each other
                self._flag(
                    plan.path, key, f"chunk file is missing, yet {stored} of its rows are stored in place"
                )
            elif stored == 1:
                self.report.notes.append(
                    f"{plan.path}, chunk {key}: unwritten, so its one row stored in place reads as zeros; "
                    "that is damage unless the sample's input is all zeros"
                )


def epoch_states(uri: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> dict[int, str]:
    """The state of every epoch group of the store: ``"committed"``, ``"open"`` or ``"none"``.

    Unlike :attr:`GradientStore.epochs`, this lists the epochs a running (or crashed) capture has not
    committed. It reads the epoch groups' metadata only.
    """
    root = zarr.open_group(
        _open_raw(os.fspath(uri), storage_options), mode="r", zarr_format=layout.ZARR_FORMAT
    )
    if layout.EPOCHS not in root:
        return {}
    groups = root[layout.EPOCHS].groups()
    return {int(k): str(g.attrs.get("state", "none")) for k, g in sorted(groups) if k.isdigit()}


def _expected(meta: dict[str, Any], recomputed: set[str]) -> dict[str, _Want]:
    """The arrays of one rank group of an epoch, by path under the group, and what each must be."""
    out = {f"{layout.ROWS}/{f}": _Want() for f in layout.ROW_FIELDS}
    for name, spec in meta.get("layers", {}).items():
        if not spec.get("representation") or name in recomputed:
            continue
        base = f"{layout.LAYERS}/{name}"
        for s in stored_arrays(spec["arrays"]):
            dedup = (
                f"{name}/{s.owner}" if spec["arrays"][s.owner].get("dedup") and s.role != "table" else None
            )
            out[f"{base}/{s.name}"] = _Want(
                per="chunk" if s.role == "table" else "row",
                dtype=s.dtype,
                row_shape=None if s.role == "table" else s.row_shape,
                # Every reference chunk is written (a reference to row 0 is all zeros): none may be missing.
                omit_zero=s.dedup and s.role != "ref",
                dedup=dedup,
                owner=None if s.role == "ref" else f"{base}/{s.owner}",
            )
    return out


def _epoch_group(path: str) -> tuple[int, str]:
    """``epochs/<epoch>/<rank group>/...`` -> (epoch, rank group)."""
    _, epoch, group = path.split("/", 3)[:3]
    return int(epoch), group


def _epoch_of(path: str) -> int | None:
    """The epoch a path lies in, or None for a path outside the epoch groups."""
    parts = path.split("/")
    return int(parts[1]) if parts[0] == layout.EPOCHS and len(parts) > 1 and parts[1].isdigit() else None


def _where(target: tuple[int, int, int]) -> str:
    return f"(epoch {target[0]}, rank {target[1]}, row {target[2]})"


def _chunk_owner(key: str) -> tuple[str, str] | None:
    """``(array path, chunk key)`` of a chunk file's store key, or None for any other file."""
    parts = key.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if not parts[i + 1].isdigit():
            return None
        if parts[i] == "c":
            return "/".join(parts[:i]), "/".join(parts[i:])
    return None


def _open_raw(uri: str, storage_options: dict[str, Any] | None) -> Any:
    if not layout.is_url(uri) and not os.path.isdir(uri):
        raise StoreReadError(f"No gradient store at {uri!r}: the directory does not exist.")
    return layout.zarr_store(uri, storage_options, read_only=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
