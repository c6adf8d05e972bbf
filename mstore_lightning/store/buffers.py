"""The arrays a :class:`~.writer.BackgroundWriter` fills: their stored parts, their recycled chunk
buffers, and the Zarr arrays made for them.

The training thread copies rows into an array's current buffer (pinned, for rows on CUDA); full
buffers travel to the writer thread as :class:`Chunk`, with the event their copies finish at, and
come back to the array's free list once written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from mstore_lightning.core.quant import TABLE, ChunkCodec
from mstore_lightning.core.transfer import DeviceCopies
from mstore_lightning.store import codecs
from mstore_lightning.store.layout import create_row_array

PARTS_ATTR = "parts"  # on an array's first part: every part's name, for a resumed run to find them

Coder = Callable[[np.ndarray, int], dict[str, np.ndarray]]


@dataclass(frozen=True)
class PartSpec:
    """One stored Zarr array of a buffered array.

    Args:
        name: its path under the group.
        row_shape: shape of one stored row.
        dtype: stored dtype.
        skip_empty: leave chunks of nothing but zeros unwritten (rows that are references).
        codec: codes fitted per chunk; the part's rows are the values to code, and a ``<name>_table``
            array holds one table per chunk.
    """

    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype
    skip_empty: bool = False
    codec: ChunkCodec | None = None

    @property
    def stored(self) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one row in the Zarr array (a codec stores packed uint8 codes)."""
        if self.codec is not None:
            return self.codec.code_shape, np.dtype(np.uint8)
        return self.row_shape, self.dtype


@dataclass
class Part:
    spec: PartSpec
    array: Any = None  # created on the writer thread at the first chunk
    table: Any = None
    capacity: int = 0  # rows the Zarr array can hold (writer thread only)


@dataclass
class Chunk:
    array: RowArray
    start: int
    buffer: np.ndarray
    rows: int
    last: bool = False  # the array's last chunk: an array created for it gets its final size
    ready: Any = None  # the event the buffer's device copies are done at (CUDA rows); None: done

    def wait_ready(self) -> None:
        """Waits until the device copies into the buffer are done (writer thread)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    @property
    def nbytes(self) -> int:
        return self.buffer[: self.rows].nbytes


@dataclass
class RowArray:
    """One buffered array being filled row by row, its stored parts, and its recycled buffers."""

    group: zarr.Group
    name: str
    row_shape: tuple[int, ...]  # of a buffered row
    dtype: np.dtype
    chunk_rows: int
    parts: list[Part]
    coder: Coder | None = None  # buffered rows (and the first one's row number) -> stored rows per part
    rows: int = 0  # rows appended so far
    fill: int = 0  # rows in the current buffer
    current: np.ndarray | None = None
    free: list[np.ndarray] = field(default_factory=list)
    # The stored rows of a chunk written in part: its first row, and its rows per part (writer thread).
    coded: tuple[int, dict[str, np.ndarray]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The CUDA device rows come from, set by the first append; its buffers are pinned.
    device: torch.device | None = None

    def take_buffer(self) -> np.ndarray:
        with self.lock:
            if self.free:
                return self.free.pop()
        shape = (self.chunk_rows, *self.row_shape)
        return DeviceCopies.host_buffer(shape, self.dtype, pinned=self.device is not None)

    def give_back(self, buffer: np.ndarray) -> None:
        with self.lock:
            self.free.append(buffer)


def row_bytes(parts: list[PartSpec]) -> int:
    """Stored bytes of one row over ``parts``."""
    total = 0
    for p in parts:
        shape, dtype = p.stored
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return total


def buffer_bytes(arr: RowArray) -> int:
    return arr.chunk_rows * int(np.prod(arr.row_shape, dtype=np.int64)) * arr.dtype.itemsize


def create_part(arr: RowArray, part: Part, rows: int, compression: codecs.Choice | None = None) -> None:
    spec = part.spec
    shape, dtype = spec.stored
    compression = compression or codecs.Choice(codecs.DEFAULT)
    attributes: dict[str, Any] = {codecs.COMPRESSION_ATTR: compression.to_json()}
    if part is arr.parts[0]:
        attributes[PARTS_ATTR] = {
            "parts": [{"name": p.spec.name, "skip_empty": p.spec.skip_empty} for p in arr.parts],
            "buffer": {"row_shape": list(arr.row_shape), "dtype": arr.dtype.str},
        }
    if spec.codec is not None:
        attributes["codec"] = spec.codec.to_json()
    part.array = create_row_array(
        arr.group,
        spec.name,
        rows,
        shape,
        dtype,
        arr.chunk_rows,
        spec.skip_empty,
        attributes,
        compression.name,
    )
    part.capacity = rows
    if spec.codec is not None:
        part.table = create_row_array(
            arr.group, spec.name + TABLE, -(-rows // arr.chunk_rows), (spec.codec.levels,), np.float32, 1024
        )


def resize_part(part: Part, rows: int, chunk_rows: int) -> None:
    """Sets the part's row count (a codec's tables follow in whole chunks)."""
    if part.array.shape[0] != rows:
        part.array.resize((rows, *part.spec.stored[0]))
    tables = -(-rows // chunk_rows)
    if part.table is not None and part.table.shape[0] != tables:
        part.table.resize((tables, part.spec.codec.levels))
    part.capacity = rows
