"""Chunk-aligned, bounded-memory background writing of per-sample rows into Zarr arrays.

Training threads append rows; each array fills a preallocated chunk-sized buffer, and only whole
chunks (plus the last, partial one at a flush) are handed to one writer thread, which compresses and
writes them, all the chunks waiting at once in one call to zarr. Buffers are recycled, so a step writes into memory already touched (fresh pages are
several times slower to fill than reused ones). The bytes waiting in the queue are bounded: when the
writer falls behind, ``append`` blocks until a chunk is written, so memory stays bounded and no row is
dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from mstore_lightning.store.layout import create_row_array
from mstore_lightning.store.quant import TABLE, ChunkCodec

DEFAULT_QUEUE_BYTES = 64 << 20  # small enough that recycled buffers stay warm
MAX_BATCH = 32  # chunks handed to zarr at once
DEFAULT_CHUNK_BYTES = 4 << 20  # zarr costs ~1.5 ms a chunk beyond compression; big chunks amortise it


class WriterError(RuntimeError):
    """The background writer failed; the epoch being written is not committed."""


@dataclass
class _Chunk:
    array: _RowArray
    start: int
    buffer: np.ndarray
    rows: int

    @property
    def nbytes(self) -> int:
        return self.buffer[: self.rows].nbytes


@dataclass
class _RowArray:
    """One Zarr array being filled row by row, with its recycled chunk buffers."""

    group: zarr.Group
    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    skip_empty: bool = False  # leave all-zero chunks unwritten (rows that are references)
    codec: ChunkCodec | None = None  # codes fitted per chunk; the buffer holds the values to code
    array: Any = None  # created on the writer thread at the first chunk
    table: Any = None  # the codec's per-chunk tables
    rows: int = 0  # rows appended so far
    fill: int = 0  # rows in the current buffer
    current: np.ndarray | None = None
    free: list[np.ndarray] = field(default_factory=list)
    capacity: int = 0  # rows the Zarr array can hold (written on the writer thread only)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.codec.code_shape if self.codec is not None else self.row_shape

    def take_buffer(self) -> np.ndarray:
        with self.lock:
            if self.free:
                return self.free.pop()
        return np.empty((self.chunk_rows, *self.row_shape), dtype=self.dtype)

    def give_back(self, buffer: np.ndarray) -> None:
        with self.lock:
            self.free.append(buffer)


class BackgroundWriter:
    """Appends rows to Zarr arrays through one writer thread with a byte-bounded queue.

    Args:
        queue_bytes: most bytes of filled chunks waiting to be written. ``append`` blocks beyond it.
        chunk_bytes: target uncompressed size of one chunk.

    Example::

        w = BackgroundWriter(queue_bytes=64 << 20)
        w.open_array(group, "ids", (), np.int64)
        w.append(group, "ids", torch.arange(10))
        w.flush()
    """

    def __init__(
        self, queue_bytes: int = DEFAULT_QUEUE_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.queue_bytes = int(queue_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._arrays: dict[tuple[int, str], _RowArray] = {}
        self._queue: queue.Queue[_Chunk | Callable[[], None] | None] = queue.Queue()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.bytes_written = 0
        self.wait_seconds = 0.0
        # False: ``append`` never waits; the caller drops rows instead (it checks ``behind``).
        self.block = True
        self._thread = threading.Thread(target=self._run, name="mstore-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- training side
    def chunk_rows_for(self, row_bytes: int) -> int:
        """Rows per chunk for rows of ``row_bytes`` bytes."""
        return int(min(max(1, self.chunk_bytes // max(1, row_bytes)), 1 << 16))

    def open_array(
        self,
        group: zarr.Group,
        name: str,
        row_shape: tuple[int, ...],
        dtype: Any,
        chunk_rows: int | None = None,
        skip_empty: bool = False,
        codec: ChunkCodec | None = None,
    ) -> None:
        """Declares an array of rows under ``group``; it is created when its first chunk is written.

        Arrays read together (a layer's factors) should share ``chunk_rows`` so reads stay aligned.
        ``skip_empty`` leaves chunks of nothing but zeros unwritten; they read back as zeros. With a
        ``codec``, rows are the values to code (``dtype`` float32); the array stores the codes and a
        ``<name>_table`` array one table per chunk.
        """
        dtype = np.dtype(dtype)
        if chunk_rows is None:
            chunk_rows = self.chunk_rows_for(int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
        self._arrays[(id(group), name)] = _RowArray(
            group, name, tuple(row_shape), dtype, chunk_rows, skip_empty=skip_empty, codec=codec
        )

    def adopt_array(self, group: zarr.Group, name: str, array: zarr.Array, rows: int) -> None:
        """Continues writing an existing array from row ``rows``; rows after it are dropped."""
        chunk_rows = int(array.chunks[0])
        codec = ChunkCodec.from_json(array.attrs["codec"]) if "codec" in array.attrs else None
        arr = _RowArray(group, name, tuple(array.shape[1:]), np.dtype(array.dtype), chunk_rows, array=array)
        if codec is not None:
            arr.row_shape, arr.dtype, arr.codec = codec.row_shape, np.dtype(np.float32), codec
            arr.table = group[name + TABLE]
        arr.rows = rows
        _resize(arr, rows)
        start = rows - rows % chunk_rows
        if rows > start:  # the last chunk is partial: refill its buffer so it is rewritten whole
            arr.current = arr.take_buffer()
            stored = array[start:rows]
            if codec is not None:  # its codes are refitted with the new rows: one more rounding
                table = np.broadcast_to(arr.table[start // chunk_rows], (rows - start, codec.levels))
                stored = codec.decode(stored, table)
            arr.current[: rows - start] = stored
            arr.fill = rows - start
        self._arrays[(id(group), name)] = arr

    def has_array(self, group: zarr.Group, name: str) -> bool:
        return (id(group), name) in self._arrays

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
        done = 0
        while done < n:
            if arr.current is None:
                arr.current = arr.take_buffer()
                arr.fill = 0
            take = min(n - done, arr.chunk_rows - arr.fill)
            _copy_rows(arr.current[arr.fill : arr.fill + take], values[done : done + take])
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
        """Flushes, trims the arrays under ``group`` to their exact row count, and forgets them."""
        self.flush()
        mine = {k: a for k, a in self._arrays.items() if a.group is group}

        def trim() -> None:
            for arr in mine.values():
                if arr.array is None:
                    _create(arr, max(arr.rows, 0))
                _resize(arr, arr.rows)

        self.run_on_writer(trim)
        for key in mine:
            del self._arrays[key]
        return {a.name: a.rows for a in mine.values()}

    def discard_arrays(self, group: zarr.Group) -> None:
        """Forgets the arrays under ``group`` without writing their buffered rows."""
        for key in [k for k, a in self._arrays.items() if a.group is group]:
            del self._arrays[key]

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread after the queued work; safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def behind(self) -> bool:
        """Whether one more chunk would take the bytes waiting for the writer past ``queue_bytes``
        (where a blocking ``append`` would wait)."""
        return self._pending_bytes > 0 and self._pending_bytes + self.chunk_bytes > self.queue_bytes

    # ---------------------------------------------------------------- internals
    def _submit_current(self, arr: _RowArray, keep: bool = False) -> None:
        start = arr.rows - arr.fill
        buffer = arr.current
        if keep:
            # A partial chunk at a flush: the buffer goes to the writer, a copy keeps filling here,
            # and the chunk is rewritten whole when it fills.
            arr.current = buffer.copy()
        else:
            arr.current = None
        chunk = _Chunk(arr, start, buffer, arr.fill)
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
                if isinstance(nxt, _Chunk) and not any(_same_chunk(nxt, c) for c in batch):
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

    def _write(self, chunks: list[_Chunk]) -> None:
        writes = [self._prepare(c) for c in chunks]

        async def write_all() -> None:
            await asyncio.gather(*(array.setitem(rows, block) for array, rows, block in writes))

        zarr_sync(write_all())
        self.bytes_written += sum(c.nbytes for c in chunks)

    def _prepare(self, chunk: _Chunk) -> tuple[Any, slice, np.ndarray]:
        """Sizes the chunk's array and codes its block; returns the async array, rows and values."""
        arr = chunk.array
        stop = chunk.start + chunk.rows
        if arr.array is None:
            _create(arr, max(stop, 4 * arr.chunk_rows))
        if stop > arr.capacity:
            _resize(arr, max(stop, 2 * arr.capacity))
        block = chunk.buffer[: chunk.rows]
        if arr.codec is not None:
            block, table = arr.codec.encode(block)
            arr.table[chunk.start // arr.chunk_rows] = table
        return arr.array.async_array, slice(chunk.start, stop), block

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriterError(f"The gradient store writer failed: {self._error!r}") from self._error


def _same_chunk(a: _Chunk, b: _Chunk) -> bool:
    return a.array is b.array and a.start == b.start


def _create(arr: _RowArray, rows: int) -> None:
    dtype = np.dtype(np.uint8) if arr.codec is not None else arr.dtype
    arr.array = create_row_array(
        arr.group, arr.name, rows, arr.stored_shape, dtype, arr.chunk_rows, skip_empty=arr.skip_empty
    )
    arr.capacity = rows
    if arr.codec is not None:
        arr.array.attrs["codec"] = arr.codec.to_json()
        arr.table = create_row_array(
            arr.group, arr.name + TABLE, -(-rows // arr.chunk_rows), (arr.codec.levels,), np.float32, 1024
        )


def _resize(arr: _RowArray, rows: int) -> None:
    """Sets the arrays' row count (the codec's tables follow in whole chunks)."""
    if arr.array.shape[0] != rows:
        arr.array.resize((rows, *arr.stored_shape))
    if arr.table is not None and arr.table.shape[0] != -(-rows // arr.chunk_rows):
        arr.table.resize((-(-rows // arr.chunk_rows), arr.codec.levels))
    arr.capacity = rows


def _copy_rows(dst: np.ndarray, src: torch.Tensor) -> None:
    # torch converts dtypes an order of magnitude faster than numpy's astype.
    torch.from_numpy(dst).copy_(src)
