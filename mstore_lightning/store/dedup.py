"""Row deduplication: a row already stored is written once and referenced.

Rows are compared by a 64-bit content hash of their stored bytes (codes and scales together), and every hash
hit is confirmed byte for byte before a row becomes a reference, so a hash collision can never alias
two different rows. The index keeps the bytes of the rows it knows, up to a byte budget; rows that
arrive after it is full are still checked against it (and against their own batch) but not added.

A duplicate row is stored as zeros (its chunk compresses to almost nothing, and a chunk of nothing but
duplicates is not written at all) and its ``<name>_ref`` row names where the bytes live:
``(epoch, rank, row)``, or ``(-1, -1, -1)`` for a row stored in place. The capture marks a row whose
stored bytes are all zeros ``(-3, -3, -3)`` (:data:`ZERO_ROW`) whatever the index says: its chunk may
hold nothing but zeros and go unwritten (zarr's fill value gives the row back), and the mark tells
that apart from a lost chunk of rows stored in place.

Example:
    >>> import numpy as np
    >>> index = RowIndex(budget_bytes=1 << 20)
    >>> rows = np.array([[1, 2], [3, 4], [1, 2]], dtype=np.int8)
    >>> index.deduplicate("fc1/a", rows.view(np.uint8), epoch=0, rank=0, first_row=0)[:, 2].tolist()
    [-1, -1, 0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_DEDUP_BYTES = 256 << 20
NO_REF = -1
ZERO_ROW = -3  # a row of zero bytes: needs no chunk


_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_hashes(rows: np.ndarray) -> list[int]:
    """A 64-bit hash of each row of ``rows`` (``(n, nbytes)`` uint8), computed for all rows at once.

    Each 8-byte word is multiplied by its own random odd constant and the products summed (mod 2⁶⁴),
    then mixed with splitmix64's finaliser. Cheap and well spread; a collision costs one byte check.
    """
    n, width = rows.shape
    words = -(-width // 8)
    padded = np.zeros((n, words * 8), dtype=np.uint8)
    padded[:, :width] = rows
    w = padded.view(np.uint64)
    mix = np.resize(_MIX, words) + np.arange(words, dtype=np.uint64) * np.uint64(2)  # distinct past 4096
    with np.errstate(over="ignore"):
        h = (w * mix).sum(axis=1, dtype=np.uint64) ^ np.uint64(width)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h.tolist()


@dataclass
class DedupStats:
    """What deduplication found for one array."""

    rows: int = 0  # rows looked at
    duplicates: int = 0  # rows stored as references
    bytes_saved: int = 0  # uncompressed bytes of the duplicate rows
    collisions: int = 0  # hash hits whose bytes differed

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Table:
    """One array's index: hashes kept sorted, pointing at row contents held in one buffer.

    Lookups are vectorised over a chunk's rows, and each chunk's new hashes are merged in at once.
    The buffer is reserved at the index's whole budget up front; its pages are touched only as rows
    arrive, so reserving costs nothing and no row is copied to grow it.
    """

    def __init__(self, width: int, capacity: int) -> None:
        self.hashes = np.empty(0, dtype=np.uint64)  # sorted
        self.slots = np.empty(0, dtype=np.int64)  # buffer row of each hash
        self.rows = np.empty((max(capacity, 1), width), dtype=np.uint8)
        self.where = np.empty((max(capacity, 1), 3), dtype=np.int32)
        self.count = 0

    def run(self, h: int) -> range:
        """Positions in :attr:`hashes` equal to ``h``."""
        lo = int(np.searchsorted(self.hashes, np.uint64(h), side="left"))
        hi = int(np.searchsorted(self.hashes, np.uint64(h), side="right"))
        return range(lo, hi)

    def add(self, hashes: np.ndarray, rows: np.ndarray, where: np.ndarray) -> None:
        n = len(hashes)
        if self.count + n > len(self.rows):
            grow = max(self.count + n, 2 * len(self.rows))  # the budget was raised
            self.rows = _grown(self.rows, grow, self.count)
            self.where = _grown(self.where, grow, self.count)
        self.rows[self.count : self.count + n] = rows
        self.where[self.count : self.count + n] = where
        order = np.argsort(hashes, kind="stable")
        at = np.searchsorted(
            self.hashes, hashes[order], side="right"
        )  # after equal hashes: first stays first
        self.hashes = np.insert(self.hashes, at, hashes[order])
        self.slots = np.insert(self.slots, at, self.count + order)
        self.count += n


class RowIndex:
    """Content index of stored rows, one namespace per logical array.

    Rows whose hash is unique in their batch and matches at most one known row are looked up all at
    once; the rare others (hash collisions, repeats within a batch) one by one, in order.

    Args:
        budget_bytes: most bytes of row contents the index holds for byte checks.
        hash_fn: ``bytes -> digest`` per row instead of :func:`row_hashes`; tests pass a weak one
            to force collisions.
    """

    def __init__(
        self, budget_bytes: int = DEFAULT_DEDUP_BYTES, hash_fn: Callable[[bytes], bytes] | None = None
    ) -> None:
        self.budget_bytes = int(budget_bytes)
        self.hash_fn = hash_fn
        self.held_bytes = 0
        self._tables: dict[str, _Table] = {}
        self.stats: dict[str, DedupStats] = {}
        self.sources: set[int] = set()  # epochs that references point into

    def deduplicate(self, key: str, rows: np.ndarray, epoch: int, rank: int, first_row: int) -> np.ndarray:
        """References for ``rows`` (``(n, nbytes)`` uint8), which will be stored from row ``first_row``.

        Returns:
            ``(n, 3)`` int32: ``(epoch, rank, row)`` of an identical stored row, or ``-1`` s for rows
            to be stored in place. Rows stored in place join the index while the budget allows.
        """
        n, width = rows.shape
        if key not in self._tables:
            self._tables[key] = _Table(width, self.budget_bytes // max(1, width))
        table = self._tables[key]
        stats = self.stats.setdefault(key, DedupStats())
        stats.rows += n
        refs = np.full((n, 3), NO_REF, dtype=np.int32)
        if self.hash_fn is None:
            h = np.asarray(row_hashes(rows), dtype=np.uint64)
        else:
            h = np.array(
                [int.from_bytes(self.hash_fn(r.tobytes())[:8].ljust(8, b"\0"), "little") for r in rows],
                dtype=np.uint64,
            )
        lo = np.searchsorted(table.hashes, h, side="left")
        known = np.searchsorted(table.hashes, h, side="right") - lo
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        alone = np.zeros(n, dtype=bool)
        alone[first[counts == 1]] = True
        simple = alone & (known <= 1)
        stored = np.zeros(n, dtype=bool)  # rows stored in place

        # The common path: one byte check per candidate, all at once.
        idx = np.nonzero(simple & (known == 1))[0]
        if idx.size:
            slots = table.slots[lo[idx]]
            equal = (table.rows[slots] == rows[idx]).all(axis=1)
            hit = idx[equal]
            refs[hit] = table.where[slots[equal]]
            stats.collisions += int((~equal).sum())
            stored[idx[~equal]] = True
        stored[simple & (known == 0)] = True

        # The rest, in order: a collision run in the table, or rows repeated within this batch.
        pending: dict[int, list[int]] = {}  # hash -> rows of this batch stored in place so far
        for i in np.nonzero(~simple)[0].tolist():
            hi = int(h[i])
            match = None
            for checked, pos in enumerate(table.run(hi)):
                if np.array_equal(table.rows[table.slots[pos]], rows[i]):
                    match, stats.collisions = table.where[table.slots[pos]], stats.collisions + checked
                    break
            else:
                stats.collisions += len(table.run(hi))
                for checked, j in enumerate(pending.get(hi, [])):
                    if np.array_equal(rows[j], rows[i]):
                        match = (epoch, rank, first_row + j)
                        stats.collisions += checked
                        break
                else:
                    stats.collisions += len(pending.get(hi, []))
            if match is None:
                stored[i] = True
                pending.setdefault(hi, []).append(i)
            else:
                refs[i] = match

        dup = refs[:, 2] >= 0
        stats.duplicates += int(dup.sum())
        stats.bytes_saved += int(dup.sum()) * width
        self.sources.update(int(e) for e in np.unique(refs[dup, 0]))
        self._remember(table, h, rows, np.nonzero(stored)[0], epoch, rank, first_row)
        return refs

    def _remember(
        self,
        table: _Table,
        h: np.ndarray,
        rows: np.ndarray,
        stored: np.ndarray,
        epoch: int,
        rank: int,
        first_row: int,
    ) -> None:
        """Adds the rows stored in place to the index, in row order, while the budget lasts."""
        width = rows.shape[1]
        keep = stored[: max(0, (self.budget_bytes - self.held_bytes) // max(1, width))]
        if keep.size:
            where = np.stack([np.full(keep.size, epoch), np.full(keep.size, rank), first_row + keep], 1)
            table.add(h[keep], rows[keep], where.astype(np.int32))
            self.held_bytes += keep.size * width

    def take_stats(self) -> dict[str, object]:
        """Statistics since the last call, by array, and the epochs referenced; resets both."""
        out = {"arrays": {k: s.to_dict() for k, s in self.stats.items()}, "sources": sorted(self.sources)}
        self.stats, self.sources = {}, set()
        return out


@dataclass
class RowRefs:
    """Deduplicates one array's stored rows as the writer codes them, and adds their references.

    Args:
        index: the run's row index, or ``None`` to store every row in full (query rows: references
            point only at training rows).
        key: the array's namespace in the index.
        ref: the name of the references' part.
        epoch: the epoch being written.
        rank: this process's rank.
    """

    index: RowIndex | None
    key: str
    ref: str
    epoch: int
    rank: int

    def __call__(self, parts: dict[str, np.ndarray], first_row: int) -> dict[str, np.ndarray]:
        """``parts`` (rows from ``first_row`` on) with duplicate rows zeroed, plus their references."""
        n = len(next(iter(parts.values())))
        if self.index is None:
            return {**parts, self.ref: np.full((n, 3), NO_REF, dtype=np.int32)}
        raw = np.concatenate(
            [np.ascontiguousarray(v).reshape(n, -1).view(np.uint8) for v in parts.values()], axis=1
        )
        refs = self.index.deduplicate(self.key, raw, self.epoch, self.rank, first_row)
        refs[~raw.any(axis=1)] = ZERO_ROW  # its chunk may go unwritten: the mark says that is no loss
        dup = refs[:, 2] >= 0
        if dup.any():
            parts = {k: v.copy() for k, v in parts.items()}
            for v in parts.values():
                v[dup] = 0
        return {**parts, self.ref: refs}


def _grown(a: np.ndarray, rows: int, used: int) -> np.ndarray:
    out = np.empty((rows, *a.shape[1:]), dtype=a.dtype)
    out[:used] = a[:used]
    return out
