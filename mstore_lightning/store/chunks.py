"""Reading a layer's stored rows: chunks decoded, deduplicated rows filled in, a cache, and staging.

Each zarr read is a round trip to zarr's event loop thread; on small chunks that trip, not the
bytes, is the cost, so reads are batched: every part of every array of a request goes in one batch,
and the rows that deduplicated rows refer to in a second. A scan's chunk reads are issued ahead of
their use on a few reader threads, so that zarr decompresses several chunks at once while the
scan's kernels run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr

from mstore_lightning.core import quant, tensor_codes
from mstore_lightning.core.representation import Representation, Rows
from mstore_lightning.store import layout
from mstore_lightning.store.catalog import Catalog
from mstore_lightning.store.dedup import NO_REF
from mstore_lightning.store.zarr_io import StoreReadError, check_rows, open_many, require_chunks, take_many

STAGE_BYTES = 64 << 20  # decoded bytes that `stage` reads ahead in one batch
# Threads that read chunks issued ahead and decode them; zarr decompresses on a pool of its own, so
# these keep enough reads in flight for it to use every core. One pool serves every store.
READ_THREADS = 4

ChunkKey = tuple[int, str, int, int, int, str]  # (epoch, split, rank index, lo, hi, layer name)
Request = tuple[zarr.Group, Representation, list[str], "slice | np.ndarray"]


class Chunk(NamedTuple):
    """One stored chunk of a layer: rank group ``rank`` (its index in the epoch), local rows
    ``lo:hi``, and ``first``, the global position of its first row."""

    rank: int
    lo: int
    hi: int
    first: int


class ChunkReader:
    """Decoded rows of the layers of one store, through an optional cache of whole chunks.

    Attributes:
        reads: batches of zarr reads made so far (each one round trip to zarr's event loop).
    """

    def __init__(self, catalog: Catalog, cache_bytes: int = 0) -> None:
        self.catalog = catalog
        self.cache = ChunkCache(cache_bytes)
        self.reads = 0
        self._checked: set[tuple[str, str, str]] = set()  # arrays whose metadata matched their layer
        self._staged: dict[ChunkKey, Rows] = {}  # chunks read ahead by `stage`
        self._staged_at: set[tuple[int, str]] = set()  # their (epoch, split)s

    # ---------------------------------------------------------------- chunks
    def chunks(self, epoch: int, rep: Representation, split: str = "train") -> list[Chunk]:
        """Every stored chunk of ``rep``'s layer in ``epoch``, in row order."""
        offsets = self.catalog.offsets(epoch, split)
        out = []
        for r, g in enumerate(self.catalog.rank_groups(epoch, split)):
            first = self._array(g, rep, rep.stored[0].name)
            step = int(first.chunks[0])  # a layer's arrays share their chunk rows
            for lo in range(0, first.shape[0], step):
                out.append(Chunk(r, lo, min(lo + step, first.shape[0]), int(offsets[r]) + lo))
        return out

    def chunk(self, epoch: int, rep: Representation, split: str, c: Chunk) -> Rows:
        """A chunk's decoded rows: staged, cached, or read now."""
        key = (epoch, split, c.rank, c.lo, c.hi, rep.name)
        rows = self._kept(key)
        return rows if rows is not None else self._read_chunks([key])[0]

    def deferred(
        self, epoch: int, rep: Representation, split: str, start: int, stop: int, codes: bool = False
    ) -> Iterator[tuple[Chunk, Callable[[], Rows]]]:
        """Each chunk holding any of the rows ``start:stop``, and its decoded rows when called.

        A chunk not already decoded starts being read and decoded, on a reader thread, when it is
        yielded; calling waits for it. A scan that takes chunks ahead of their use
        (``scan.read_ahead``) has several in flight at once. With ``codes``, ``int8`` arrays may
        come as ``tensor_codes.Coded`` (for kernels that ``takes_codes``).
        """
        for c in self.chunks(epoch, rep, split):
            if c.first + c.hi - c.lo <= start or c.first >= stop:
                continue
            key = (epoch, split, c.rank, c.lo, c.hi, rep.name)
            rows = self._kept(key, codes)
            if rows is not None:
                yield c, functools.partial(dict, rows)
            else:
                yield c, functools.partial(_first_result, self._read_async(key, codes))

    def gather(self, epoch: int, rep: Representation, rows: np.ndarray, split: str = "train") -> Rows:
        """Decoded arrays of ``rep`` at global row positions ``rows`` (in the given order)."""
        through_cache = self._gather_by_chunk(epoch, rep, rows, split)
        if through_cache is not None:
            return through_cache
        offsets = self.catalog.offsets(epoch, split)
        which = np.searchsorted(offsets, rows, side="right") - 1
        names = list(rep.arrays)
        parts = {n: _empty_parts(rep.arrays[n], n, len(rows)) for n in names}
        for r, g in enumerate(self.catalog.rank_groups(epoch, split)):
            sel = np.nonzero(which == r)[0]
            if sel.size:
                local = rows[sel] - offsets[r]
                order = np.argsort(local)
                for name, got in self._read_batch([(g, rep, names, local[order])])[0].items():
                    for p, values in got.items():
                        parts[name][p][sel[order]] = values
        return {n: tensor_codes.decode(rep.arrays[n], n, parts[n]) for n in names}

    def _gather_by_chunk(self, epoch: int, rep: Representation, rows: np.ndarray, split: str) -> Rows | None:
        """:meth:`gather` through whole decoded chunks, kept in the cache when the store has one
        (``None`` when it has not): a chunk read for a few rows then serves every later query."""
        if not len(rows) or not (self.cache.limit or (epoch, split) in self._staged_at):
            return None
        chunks = self.chunks(epoch, rep, split)
        which = np.searchsorted([c.first for c in chunks], rows, side="right") - 1
        picked, where = [], []
        for i in np.unique(which):
            got = self.chunk(epoch, rep, split, chunks[i])
            sel = np.nonzero(which == i)[0]
            index = torch.from_numpy(rows[sel] - chunks[i].first)
            picked.append({n: t.index_select(0, index) for n, t in got.items()})
            where.append(sel)
        back = torch.from_numpy(np.argsort(np.concatenate(where)))  # back to the order asked for
        return {n: torch.cat([p[n] for p in picked])[back] for n in picked[0]}

    # ---------------------------------------------------------------- staging
    def stage(
        self, epochs: Sequence[int], reps: Sequence[Representation], splits: Sequence[str]
    ) -> Iterator[list[int]]:
        """Yields ``epochs`` in runs, each run's chunks of ``reps`` in ``splits`` read beforehand in one
        batch and held (up to ``STAGE_BYTES`` decoded) until the next.

        An operator that reads epoch after epoch pays zarr's round trip per run, not per chunk. An
        epoch larger than the bound is yielded alone and read chunk by chunk, so memory stays bounded
        whatever the epoch's size. Recomputed layers are left to their own source.
        """
        epochs, splits = list(epochs), list(dict.fromkeys(splits))
        for split in splits:
            self.catalog.load(epochs, split)
        self.open_layers(epochs, reps, splits)
        run: list[int] = []
        keys: list[ChunkKey] = []
        size = 0
        for e in epochs:
            recomputed = set(self.catalog.recomputed(e))
            mine = [
                (e, split, c.rank, c.lo, c.hi, rep.name)
                for split in splits
                for rep in reps
                if rep.name not in recomputed
                for c in self.chunks(e, rep, split)
            ]
            nbytes = sum(self._decoded_bytes(key) for key in mine)
            if run and size + nbytes > STAGE_BYTES:
                yield from self.hold(run, keys)
                run, keys, size = [], [], 0
            if nbytes > STAGE_BYTES:
                yield [e]  # too large to hold: streamed chunk by chunk by whoever reads it
                continue
            run.append(e)
            keys.extend(mine)
            size += nbytes
        if run:
            yield from self.hold(run, keys)

    def hold(self, run: list[int], keys: list[ChunkKey]) -> Iterator[list[int]]:
        """Reads chunks ``keys`` in one batch and holds them while ``run`` is yielded."""
        todo = [k for k in keys if self.cache.get(k) is None]
        self._staged.update(zip(todo, self._read_chunks(todo)))
        self._staged_at.update((k[0], k[1]) for k in keys)
        try:
            yield run
        finally:
            self._staged.clear()
            self._staged_at.clear()

    def _decoded_bytes(self, key: ChunkKey) -> int:
        """An upper bound on a chunk's decoded size: its stored elements as float32."""
        epoch, split, r, lo, hi, name = key
        rep, group = self.catalog.reps[name], self.catalog.rank_groups(epoch, split)[r]
        total = 0
        for s in rep.stored:
            arr = self.catalog.opened.get((group.path, rep.name, s.name))
            if arr is not None and arr.ndim and arr.shape[0] == self.catalog.rank_rows(group):
                total += (hi - lo) * int(np.prod(arr.shape[1:], dtype=np.int64)) * 4
        return total

    # ---------------------------------------------------------------- arrays
    def open_layers(
        self, epochs: Sequence[int], reps: Sequence[Representation], splits: Sequence[str]
    ) -> None:
        """Opens every stored array of ``reps`` in ``epochs`` in one trip to zarr's event loop (by
        layer and rank group, opening costs a trip each: more than reading a small epoch)."""
        self._open_arrays(
            [
                (g, rep, s.name)
                for e in epochs
                for split in splits
                for g in self.catalog.rank_groups(e, split)
                for rep in reps
                if rep.name not in self.catalog.recomputed(e)
                for s in rep.stored
            ]
        )

    def _array(self, rank_group: zarr.Group, rep: Representation, name: str) -> zarr.Array:
        # Opening an array reads its metadata; committed epochs never change, so each is opened once.
        key = (rank_group.path, rep.name, name)
        opened = self.catalog.opened
        if key not in opened:  # open every array of the layer at once: one trip to zarr's loop
            self._open_arrays(
                [(rank_group, rep, n) for n in dict.fromkeys([*(s.name for s in rep.stored), name])]
            )
            if key not in opened:
                raise StoreReadError(
                    f"Array {rank_group.path}/{layout.LAYERS}/{rep.name}/{name} is missing from the store."
                )
        if key not in self._checked:
            _check_part(opened[key], rep, name, self.catalog.rank_rows(rank_group))
            self._checked.add(key)
        return opened[key]

    def _open_arrays(self, want: list[tuple[zarr.Group, Representation, str]]) -> None:
        """Opens those of the ``(rank group, layer, array name)`` arrays not yet open, together;
        one that is not stored stays unopened."""
        opened = self.catalog.opened
        want = [(g, rep, n) for g, rep, n in want if (g.path, rep.name, n) not in opened]
        paths = [(g, f"{layout.LAYERS}/{rep.name}/{n}") for g, rep, n in want]
        for (g, rep, n), arr in zip(want, open_many(paths) if paths else []):
            if arr is not None:
                opened[(g.path, rep.name, n)] = arr

    # ---------------------------------------------------------------- reads
    def _kept(self, key: ChunkKey, codes: bool = False) -> Rows | None:
        """A staged or cached chunk's rows; decoded unless ``codes`` (the cache keeps what a scan
        read, ``int8`` codes included)."""
        rows = self._staged.get(key)
        rows = rows if rows is not None else self.cache.get(key)
        return rows if rows is None or codes else tensor_codes.decoded(rows)

    def _read_async(self, key: ChunkKey, codes: bool = False) -> Future:
        """One chunk's decoded rows, read and decoded on a reader thread."""
        return _readers().submit(self._read_chunks, [key], codes)

    def _read_chunks(self, keys: list[ChunkKey], codes: bool = False) -> list[Rows]:
        """Decoded chunks (``int8`` arrays as codes, with ``codes``), read in one batch and offered to
        the cache."""
        return [self._decode_chunk(key, parts, codes) for key, parts in zip(keys, self._read_raw(keys))]

    def _read_raw(self, keys: list[ChunkKey]) -> list[dict[str, dict[str, np.ndarray]]]:
        """The stored parts of chunks, read in one batch, not yet decoded."""
        requests = []
        for epoch, split, r, lo, hi, name in keys:
            rep = self.catalog.reps[name]
            requests.append((self.catalog.rank_groups(epoch, split)[r], rep, list(rep.arrays), slice(lo, hi)))
        return self._read_batch(requests)

    def _decode_chunk(
        self, key: ChunkKey, parts: dict[str, dict[str, np.ndarray]], codes: bool = False
    ) -> Rows:
        """A chunk's stored parts decoded (``int8`` arrays kept as codes, with ``codes``), and offered
        to the cache (safe from any thread)."""
        rep = self.catalog.reps[key[-1]]
        rows = {n: tensor_codes.decode_or_code(rep.arrays[n], n, parts[n], codes) for n in parts}
        self.cache.put(key, rows)
        return rows

    def _read_batch(self, requests: list[Request]) -> list[dict[str, dict[str, np.ndarray]]]:
        """The stored parts of each ``(group, layer, names, where)`` request, all in one batch, with
        deduplicated rows filled in from where they are stored."""
        if not requests:
            return []
        jobs: list[tuple[tuple[int, str, str], zarr.Array, Any]] = []
        for i, (group, rep, names, where) in enumerate(requests):
            for name in names:
                spec = rep.arrays[name]
                for p in _row_parts(spec):
                    jobs.append(((i, name, p), self._array(group, rep, p), where))
                    if quant.chunk_codec(spec, name, p) is not None:
                        jobs.append(
                            (
                                (i, name, p + quant.TABLE),
                                self._array(group, rep, p + quant.TABLE),
                                slice(None),
                            )
                        )
                if spec.get("dedup"):
                    jobs.append(((i, name, "ref"), self._array(group, rep, f"{name}{quant.REF}"), where))
        self.reads += 1
        got = dict(zip([key for key, _, _ in jobs], take_many([(a, w) for _, a, w in jobs])))
        for (i, name, p), arr, w in jobs:
            if not requests[i][1].arrays[name].get("dedup") or p.endswith(quant.TABLE):
                require_chunks(arr)
            elif p != "ref":  # chunks may be absent where every row is a reference or all zeros
                rows = np.arange(arr.shape[0])[w] if isinstance(w, slice) else w
                in_place = rows[got[(i, name, "ref")][:, 2] == NO_REF]
                require_chunks(arr, in_place // int(arr.chunks[0]))
            else:  # rows without a reference hold -1, so a reference chunk is only absent when lost
                require_chunks(arr)
        out: list[dict[str, dict[str, np.ndarray]]] = []
        for i, (group, rep, names, where) in enumerate(requests):
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for name in names:
                spec, parts = rep.arrays[name], {}
                for p in _row_parts(spec):
                    codec = quant.chunk_codec(spec, name, p)
                    if codec is None:
                        parts[p] = got[(i, name, p)]
                    else:
                        arr = self._array(group, rep, p)
                        rows = np.arange(arr.shape[0])[where] if isinstance(where, slice) else where
                        table = got[(i, name, p + quant.TABLE)]
                        parts[p] = codec.decode(got[(i, name, p)], table[rows // int(arr.chunks[0])])
                arrays[name] = parts
            out.append(arrays)
        refs = [(out[i][n], requests[i][1], n, got[(i, n, "ref")]) for (i, n, p), _, _ in jobs if p == "ref"]
        self._fill_references(refs)
        return out

    def _fill_references(
        self, targets: list[tuple[dict[str, np.ndarray], Representation, str, np.ndarray]]
    ) -> None:
        """Replaces the deduplicated rows of each ``(parts, layer, name, references)`` by the rows
        their references point at, read in one batch."""
        sources, fills = [], []
        for parts, rep, name, refs in targets:
            dup = np.nonzero(refs[:, 2] >= 0)[0]
            if not dup.size:
                continue
            pointed = refs[dup]
            # A reference's target is never itself a reference: read it as stored.
            plain = dataclasses.replace(
                rep, arrays={**rep.arrays, name: {**rep.arrays[name], "dedup": False}}
            )
            for e, r in {(int(e), int(r)) for e, r in pointed[:, :2]}:
                sel = np.nonzero((pointed[:, 0] == e) & (pointed[:, 1] == r))[0]
                rows = pointed[sel, 2].astype(np.int64)
                order = np.argsort(rows, kind="stable")
                sources.append((self.catalog.rank_group(e, r), plain, [name], rows[order]))
                fills.append((parts, name, dup[sel[order]]))
        for (parts, name, at), source in zip(fills, self._read_batch(sources)):
            for p, values in source[name].items():
                parts[p][at] = values


def _first_result(read: Future) -> Rows:
    return read.result()[0]


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): one for every store of a process
_POOL_LOCK = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    """The process's reader threads, started on first use (again in a forked child, which has none)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="mstore-read"))
        return _POOL[1]


class ChunkCache:
    """Decoded chunks, least recently used out first, up to ``limit`` bytes (0: none kept); ``int8``
    arrays as their codes where a scan read them so, which readers of floats decode on a hit.

    Committed epochs never change, so a cached chunk never goes stale.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self._items: OrderedDict[tuple, tuple[Rows, int]] = OrderedDict()
        self._lock = threading.Lock()  # a scan's worker threads offer the chunks they decode

    def get(self, key: tuple) -> Rows | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: tuple, rows: Rows) -> None:
        nbytes = sum(t.nbytes for t in rows.values())
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


def _check_part(arr: zarr.Array, rep: Representation, name: str, rows: int) -> None:
    """An array's metadata agrees with the layer spec: dtype, row shape and row count."""
    for s in rep.stored:
        if s.name != name or s.role == "ref":
            continue
        want_shape, want_dtype = s.row_shape, s.dtype
        if tuple(arr.shape[1:]) != want_shape or str(arr.dtype) != str(np.dtype(want_dtype)):
            raise StoreReadError(
                f"Array {arr.path!r} is {arr.dtype} rows of {list(arr.shape[1:])}, but its layer stores "
                f"{want_dtype} rows of {list(want_shape)}: its metadata is damaged."
            )
    if name.endswith(quant.TABLE):
        return
    check_rows(arr, rows)
