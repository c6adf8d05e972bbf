"""Chunk-aligned, bounded-memory background writing of per-sample rows into Zarr arrays.

The training thread only copies: each array fills a preallocated chunk-sized buffer with the rows as
handed over (int8 codes and scales packed as bytes, say). Rows on CUDA are copied without a wait, on
a side stream into pinned buffers, and the writer waits for each chunk's copies before it reads
them (:mod:`mstore_lightning.core.transfer`). Whole chunks, and the last partial one at a
flush, go to one writer thread, which splits them into their stored parts (with k-bit codes fitted
per chunk, and deduplication references), compresses where it pays and writes them; all the chunks
waiting go to zarr in one call.

Buffers are recycled, so a step writes into memory already touched (fresh pages are several times
slower to fill than reused ones). The bytes waiting in the queue are bounded: when the writer falls
behind, ``append`` blocks until a chunk is written, so memory stays bounded and no row is dropped.

A chunk written partially (at a flush, or before a resume) keeps its coded rows in memory, and when
the chunk is rewritten whole only its new rows are coded: every row is coded, and deduplicated, once.

On Linux the writer runs at the lowest CPU priority (nice 19), and so does the compression of chunks
bound for a local or in-memory store, which runs on the writer's own event loop and thread pool
rather than on zarr's shared ones. On cores that training keeps busy, a writer at normal priority
preempts one of torch's threads mid-operator while the other spins at the operator's barrier; at
nice 19 it takes the cores training leaves, and when it falls a queue behind, training waits for it.
Remote stores (fsspec) are written through zarr's own event loop, to which their clients are bound.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr
import zarr.storage
from zarr.core.sync import sync as zarr_sync

from mstore_lightning.core.quant import TABLE, ChunkCodec
from mstore_lightning.core.transfer import DeviceCopies
from mstore_lightning.store import codecs
from mstore_lightning.store.buffers import (
    PARTS_ATTR,
    Chunk,
    Coder,
    Part,
    PartSpec,
    RowArray,
    buffer_bytes,
    create_part,
    resize_part,
    row_bytes,
)

DEFAULT_QUEUE_BYTES = 64 << 20  # small enough that recycled buffers stay warm
MAX_BATCH = 32  # chunks handed to zarr at once
DEFAULT_CHUNK_BYTES = 4 << 20  # zarr costs ~1.5 ms a chunk beyond compression; big chunks amortise it
# Handed-over bytes a second the writer stores before it has measured its own rate.
DEFAULT_WRITE_RATE = 200e6
RATE_AFTER_BYTES = 16 << 20  # bytes written before the measured rate replaces the default
BUFFER_FACTOR = 4  # a buffer holds up to this many times a chunk's stored bytes (float32 for k-bit)
LOW_PRIORITY = 19  # the writer's nice value, where the platform lets a thread set its own
CODEC_THREADS = min(8, os.cpu_count() or 1)  # more threads than cores only add switching


class WriterError(RuntimeError):
    """The background writer failed; the epoch being written is not committed."""


class BackgroundWriter:
    """Appends rows to Zarr arrays through one writer thread with a byte-bounded queue.

    Args:
        queue_bytes: most bytes of filled chunks waiting to be written. ``append`` blocks beyond it.
        chunk_bytes: target uncompressed size of one stored chunk.
        low_priority: run the writer and its compression at nice 19 (Linux), so that they take the
            cores training leaves. Turn it off where rows are dropped rather than waited for
            (``on_pressure="drop"``): a writer that yields to training falls behind sooner.

    Example::

        w = BackgroundWriter(queue_bytes=64 << 20)
        w.open_array(group, "ids", (), np.int64)
        w.append(group, "ids", torch.arange(10))
        w.flush()
    """

    def __init__(
        self,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        low_priority: bool = True,
    ) -> None:
        self.queue_bytes = int(queue_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.low_priority = low_priority
        self._loop: asyncio.AbstractEventLoop | None = None  # the writer thread's own, for local stores
        self._arrays: dict[tuple[int, str], RowArray] = {}
        self._adopted: set[tuple[int, str]] = set()  # resumed arrays still waiting for their coder
        self._compression: dict[str, codecs.Choice] = {}  # measured per part path, kept across epochs
        self._largest_buffer = 0
        self._queue: queue.Queue[Chunk | Callable[[], None] | None] = queue.Queue()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.bytes_written = 0
        self.busy_seconds = 0.0  # the writer thread's time in writes
        self.wait_seconds = 0.0
        self.copies = DeviceCopies()
        # False: ``append`` never waits; the caller drops rows instead (it checks ``behind``).
        self.block = True
        self._thread = threading.Thread(target=self._run, name="mstore-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- training side
    def chunk_rows_for(self, row_bytes: int, buffered_bytes: int = 0) -> int:
        """Rows per chunk for rows of ``row_bytes`` stored bytes, buffered as ``buffered_bytes``
        (rows buffered wider than they are stored, float32 values of k-bit codes say, get chunks whose
        buffers hold at most :data:`BUFFER_FACTOR` times a chunk)."""
        width = max(1, row_bytes, -(-buffered_bytes // BUFFER_FACTOR))
        return int(min(max(1, self.chunk_bytes // width), 1 << 16))

    def open_array(
        self,
        group: zarr.Group,
        name: str,
        row_shape: tuple[int, ...],
        dtype: Any,
        chunk_rows: int | None = None,
        parts: list[PartSpec] | None = None,
        coder: Coder | None = None,
    ) -> None:
        """Declares an array of rows under ``group``; its parts are created at its first chunk.

        Args:
            group: the group the parts are created under.
            name: the array's name (its first part's, by default its only part's).
            row_shape: shape of one buffered row.
            dtype: dtype of the buffered rows.
            chunk_rows: rows per chunk; arrays read together (a layer's factors) should share it so
                reads stay aligned.
            parts: the stored arrays; by default one, ``name``, holding the rows as buffered.
            coder: runs on the writer thread: ``(rows, first row number) -> {part name: rows}``.
        """
        dtype = np.dtype(dtype)
        if parts is None:
            parts = [PartSpec(name, tuple(row_shape), dtype)]
        key = (id(group), name)
        if key in self._adopted:  # resumed from a checkpoint: it takes the coder and goes on
            arr = self._arrays[key]
            if [p.spec.name for p in arr.parts] != [p.name for p in parts]:
                raise ValueError(
                    f"The resumed store holds {name!r} as parts {[p.spec.name for p in arr.parts]}, but "
                    f"this run writes it as {[p.name for p in parts]}; resume with the version that "
                    "started the run, or start a new store."
                )
            if (arr.row_shape, arr.dtype) != (tuple(row_shape), dtype):
                raise ValueError(
                    f"The resumed store's {name!r} was handed over as rows of shape {arr.row_shape} "
                    f"and dtype {arr.dtype}, but this run hands over {tuple(row_shape)} {dtype}; resume "
                    "with the version that started the run, or start a new store."
                )
            for part, spec in zip(arr.parts, parts):
                part.spec = spec
            arr.coder = coder
            self._adopted.discard(key)
            return
        if chunk_rows is None:
            chunk_rows = self.chunk_rows_for(row_bytes(parts), int(np.prod(row_shape)) * dtype.itemsize)
        arr = RowArray(group, name, tuple(row_shape), dtype, chunk_rows, [Part(p) for p in parts], coder)
        self._arrays[key] = arr
        self._largest_buffer = max(self._largest_buffer, buffer_bytes(arr))

    def adopt_array(self, group: zarr.Group, name: str, array: zarr.Array, rows: int) -> None:
        """Continues writing an existing array (all its parts) from row ``rows``; later rows are
        dropped. The array takes its coder when it is next opened."""
        layout = array.attrs.get(PARTS_ATTR)
        if layout is None:  # one part holding the rows as buffered
            layout = {"parts": [{"name": name, "skip_empty": False}], "buffer": None}
        specs = []
        for info in layout["parts"]:
            stored = group[info["name"]]
            codec = ChunkCodec.from_json(stored.attrs["codec"]) if "codec" in stored.attrs else None
            shape = codec.row_shape if codec else tuple(stored.shape[1:])
            dtype = np.dtype(np.float32) if codec else np.dtype(stored.dtype)
            specs.append(PartSpec(info["name"], shape, dtype, bool(info["skip_empty"]), codec))
        buffer = layout["buffer"] or {"row_shape": specs[0].row_shape, "dtype": str(specs[0].dtype)}
        chunk_rows = int(array.chunks[0])
        arr = RowArray(
            group,
            name,
            tuple(buffer["row_shape"]),
            np.dtype(buffer["dtype"]),
            chunk_rows,
            [Part(s, array=group[s.name], table=group[s.name + TABLE] if s.codec else None) for s in specs],
        )
        arr.rows = rows
        for part in arr.parts:
            resize_part(part, rows, chunk_rows)
        start = rows - rows % chunk_rows
        if rows > start:  # the last chunk is partial: its stored rows are kept, and rewritten whole
            coded = {}
            for part in arr.parts:
                stored = part.array[start:rows]
                if part.spec.codec is not None:  # its codes are refitted with the new rows
                    levels = part.spec.codec.levels
                    table = np.broadcast_to(part.table[start // chunk_rows], (rows - start, levels))
                    stored = part.spec.codec.decode(stored, table)
                coded[part.spec.name] = stored
            arr.coded = (start, coded)
            arr.current = arr.take_buffer()  # its first rows stand for the kept ones
            arr.fill = rows - start
        self._arrays[(id(group), name)] = arr
        self._adopted.add((id(group), name))
        self._largest_buffer = max(self._largest_buffer, buffer_bytes(arr))

    def has_array(self, group: zarr.Group, name: str) -> bool:
        """Whether ``name`` has rows here: opened, or resumed from a checkpoint."""
        return (id(group), name) in self._arrays

    def is_open(self, group: zarr.Group, name: str) -> bool:
        """Whether ``name`` was opened (a resumed array is not, until it is opened again)."""
        key = (id(group), name)
        return key in self._arrays and key not in self._adopted

    def rows(self, group: zarr.Group, name: str) -> int:
        return self._arrays[(id(group), name)].rows

    def append(self, group: zarr.Group, name: str, values: torch.Tensor | np.ndarray) -> None:
        """Copies ``values`` (rows along dim 0) into the array's chunk buffers."""
        self._raise_if_failed()
        arr = self._arrays[(id(group), name)]
        values = torch.as_tensor(values)
        n = values.shape[0]
        if tuple(values.shape[1:]) != arr.row_shape:
            raise ValueError(
                f"Rows for {name!r} have shape {tuple(values.shape[1:])}, but the array holds rows of "
                f"shape {arr.row_shape}."
            )
        if values.is_cuda and arr.device is None:
            if arr.rows:  # its buffers so far are not pinned
                arr.free.clear()
            arr.device = values.device
        done = 0
        while done < n:
            if arr.current is None:
                arr.current = arr.take_buffer()
                arr.fill = 0
            take = min(n - done, arr.chunk_rows - arr.fill)
            self.copies.copy(arr.current[arr.fill : arr.fill + take], values[done : done + take])
            arr.fill += take
            arr.rows += take
            done += take
            if arr.fill == arr.chunk_rows:
                self._submit_current(arr)

    def flush(self) -> None:
        """Writes every partial chunk and waits until the queue is empty."""
        for arr in self._arrays.values():
            if arr.current is not None and arr.fill:
                self._submit_current(arr, keep=True)
        self.wait()

    def run_on_writer(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on the writer thread after everything queued before it, and waits."""
        done = threading.Event()

        def task() -> None:
            try:
                fn()
            finally:
                done.set()

        self._queue.put(task)
        while not done.wait(0.1):
            self._raise_if_failed()
        self._raise_if_failed()

    def wait(self) -> None:
        """Blocks until every queued chunk is written."""
        self.run_on_writer(lambda: None)

    def finish_arrays(self, group: zarr.Group) -> dict[str, int]:
        """Writes the rows buffered for the arrays under ``group``, trims the arrays to their exact
        row count, and forgets them. Other groups' partial chunks stay buffered: flushed now, they
        would be written twice."""
        mine = {k: a for k, a in self._arrays.items() if a.group is group}
        for arr in mine.values():
            if arr.current is not None and arr.fill:
                # Created at its final size when this is its first chunk, as in a short epoch, so
                # the trim below costs no second metadata write.
                self._submit_current(arr, last=True)

        def trim() -> None:
            for arr in mine.values():
                for part in arr.parts:
                    if part.array is None:
                        create_part(arr, part, max(arr.rows, 0))
                    resize_part(part, arr.rows, arr.chunk_rows)

        self.run_on_writer(trim)
        for key in mine:
            del self._arrays[key]
            self._adopted.discard(key)
        return {a.name: a.rows for a in mine.values()}

    def discard_arrays(self, group: zarr.Group) -> None:
        """Forgets the arrays under ``group`` without writing their buffered rows."""
        for key in [k for k, a in self._arrays.items() if a.group is group]:
            del self._arrays[key]
            self._adopted.discard(key)

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread after the queued work; safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    @property
    def write_rate(self) -> float:
        """Handed-over bytes stored per second of the writer's time: measured once it has written
        :data:`RATE_AFTER_BYTES`, :data:`DEFAULT_WRITE_RATE` before."""
        if self.bytes_written < RATE_AFTER_BYTES or self.busy_seconds <= 0:
            return DEFAULT_WRITE_RATE
        return self.bytes_written / self.busy_seconds

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def behind(self) -> bool:
        """Whether one more chunk would take the bytes waiting for the writer past ``queue_bytes``
        (where a blocking ``append`` would wait)."""
        chunk = self._largest_buffer or self.chunk_bytes
        return self._pending_bytes > 0 and self._pending_bytes + chunk > self.queue_bytes

    # ---------------------------------------------------------------- internals
    def _submit_current(self, arr: RowArray, keep: bool = False, last: bool = False) -> None:
        start = arr.rows - arr.fill
        buffer = arr.current
        ready = self.copies.record(arr.device)
        if keep:
            # A partial chunk at a flush: the buffer goes to the writer, a copy keeps filling here,
            # and the chunk is rewritten whole when it fills.
            if ready is not None:
                ready.synchronize()  # a flush waits for the device anyway
            arr.current = arr.take_buffer()
            arr.current[: arr.fill] = buffer[: arr.fill]
        else:
            arr.current = None
        chunk = Chunk(arr, start, buffer, arr.fill, last, ready)
        self._reserve(chunk.nbytes)
        self._queue.put(chunk)
        if not keep:
            arr.fill = 0

    def _reserve(self, nbytes: int) -> None:
        with self._cond:
            if self.block and self._pending_bytes and self._pending_bytes + nbytes > self.queue_bytes:
                t0 = time.perf_counter()
                while self._pending_bytes and self._pending_bytes + nbytes > self.queue_bytes:
                    if self._error is not None:
                        break
                    self._cond.wait(0.1)
                self.wait_seconds += time.perf_counter() - t0
            self._pending_bytes += nbytes
        self._raise_if_failed()

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._pending_bytes -= nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        if self.low_priority:
            lower_thread_priority()
        try:
            self._serve()
        finally:
            if self._loop is not None:
                self._loop.run_until_complete(self._loop.shutdown_default_executor())
                self._loop.close()

    def _serve(self) -> None:
        carried = None  # an item taken while gathering a batch that could not join it
        while True:
            item, carried = (carried, None) if carried is not None else (self._queue.get(), None)
            if item is None:
                return
            if callable(item):
                try:
                    if self._error is None:
                        item()
                except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                    self._error = exc
                continue
            batch = [item]
            # Chunks already waiting go to zarr together: one trip through its event loop for all of
            # them rather than one each. A chunk written twice (partial, then whole) waits its turn.
            while len(batch) < MAX_BATCH and carried is None:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, Chunk) and not any(_same_chunk(nxt, c) for c in batch):
                    batch.append(nxt)
                else:
                    carried = nxt
            try:
                if self._error is None:
                    self._write(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc
            finally:
                for chunk in batch:
                    self._release(chunk.nbytes)
                    chunk.array.give_back(chunk.buffer)

    def _write(self, chunks: list[Chunk]) -> None:
        t0 = time.perf_counter()
        try:
            self._write_batch(chunks)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def _write_batch(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            chunk.wait_ready()
        writes = [w for c in chunks for w in self._prepare(c)]

        async def write_all() -> None:
            await asyncio.gather(*(array.setitem(rows, block) for array, rows, block in writes))

        if all(_loop_free(array.store_path.store) for array, _, _ in writes):
            loop = self._own_loop()
            try:
                loop.run_until_complete(write_all())
            finally:
                # A failed write leaves zarr's sibling writes pending: end them here, so that none
                # is left to be destroyed, with a warning, when the process exits.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        else:
            zarr_sync(write_all())
        self.bytes_written += sum(c.nbytes for c in chunks)

    def _prepare(self, chunk: Chunk) -> list[tuple[Any, slice, np.ndarray]]:
        """Codes the chunk's new rows, sizes its parts' arrays, and returns what to write to each."""
        arr = chunk.array
        start, stop = chunk.start, chunk.start + chunk.rows
        kept: dict[str, np.ndarray] = {}
        if arr.coded is not None and arr.coded[0] == start:
            kept = arr.coded[1]
        skip = len(next(iter(kept.values()))) if kept else 0
        new = chunk.buffer[skip : chunk.rows]
        coded = kept
        if len(new):
            coded = arr.coder(new, start + skip) if arr.coder else {arr.parts[0].spec.name: new}
            if kept:
                coded = {k: np.concatenate([kept[k], v]) for k, v in coded.items()}
        # A partial chunk keeps its coded rows (copied: the buffer is recycled) for its rewrite.
        arr.coded = (start, {k: v.copy() for k, v in coded.items()}) if chunk.rows < arr.chunk_rows else None
        writes = []
        for part in arr.parts:
            block, table = coded[part.spec.name], None
            if part.spec.codec is not None:
                block, table = part.spec.codec.encode(block)
            if part.array is None:
                create_part(
                    arr,
                    part,
                    stop if chunk.last else max(stop, 4 * arr.chunk_rows),
                    self._compressor(part, block),
                )
            if stop > part.capacity:
                resize_part(part, max(stop, 2 * part.capacity), arr.chunk_rows)
            if table is not None:
                part.table[start // arr.chunk_rows] = table
            writes.append((part.array.async_array, slice(start, stop), block))
        return writes

    def _compressor(self, part: Part, block: np.ndarray) -> codecs.Choice:
        """The compressor of a part created now: measured on ``block``, its first chunk, unless a
        chunk of the same array in an earlier epoch was measured already."""
        name = part.spec.name
        if name not in self._compression:
            choice = codecs.choose(block)
            if not choice.measured:  # too small to judge: the next epoch's first chunk may say more
                return choice
            self._compression[name] = choice
        return self._compression[name]

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        """The writer thread's event loop; zarr compresses on its default pool, at this priority."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            initializer = lower_thread_priority if self.low_priority else None
            loop.set_default_executor(
                ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="mstore-codec", initializer=initializer)
            )
            self._loop = loop
        return self._loop

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriterError(f"The gradient store writer failed: {self._error!r}") from self._error


def lower_thread_priority() -> None:
    """Sets the calling thread's nice value to :data:`LOW_PRIORITY` (Linux, where a thread id is a
    ``setpriority`` target; elsewhere nothing is changed)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
        except OSError:
            pass


def _loop_free(store: Any) -> bool:
    """Whether ``store`` can be written from any event loop: a local or in-memory store holds no
    client bound to zarr's loop."""
    while isinstance(store, zarr.storage.WrapperStore):
        store = store._store
    return isinstance(store, (zarr.storage.LocalStore, zarr.storage.MemoryStore))


def _same_chunk(a: Chunk, b: Chunk) -> bool:
    return a.array is b.array and a.start == b.start
