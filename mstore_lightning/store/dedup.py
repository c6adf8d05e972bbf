"""Row deduplication: a row already stored is written once and referenced.

Rows are compared by a 64-bit content hash of their stored bytes (codes and scales together), and every hash
hit is confirmed byte for byte before a row becomes a reference, so a hash collision can never alias
two different rows. The index keeps the bytes of the rows it knows, up to a byte budget; rows that
arrive after it is full are still checked against it but not added.

A duplicate row is stored as zeros (its chunk compresses to almost nothing, and a chunk of nothing but
duplicates is not written at all) and its ``<name>_ref`` row names where the bytes live:
``(epoch, rank, row)``, or ``(-1, -1, -1)`` for a row stored in place.

Example:
    >>> import numpy as np
    >>> index = RowIndex(budget_bytes=1 << 20)
    >>> rows = np.array([[1, 2], [3, 4], [1, 2]], dtype=np.int8)
    >>> index.deduplicate("fc1/a", rows.view(np.uint8), epoch=0, rank=0, first_row=0)[:, 2].tolist()
    [-1, -1, 0]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

DEFAULT_DEDUP_BYTES = 256 << 20
NO_REF = -1


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


class RowIndex:
    """Content index of stored rows, one namespace per logical array.

    Args:
        budget_bytes: most bytes of row contents the index holds for byte checks.
        hash_fn: ``bytes -> digest`` per row instead of :func:`row_hashes`; tests pass a weak one
            to force collisions.
    """

    def __init__(
        self, budget_bytes: int = DEFAULT_DEDUP_BYTES, hash_fn: Callable[[bytes], Hashable] | None = None
    ) -> None:
        self.budget_bytes = int(budget_bytes)
        self.hash_fn = hash_fn
        self.held_bytes = 0
        self._index: dict[tuple[str, Hashable], list[tuple[bytes, tuple[int, int, int]]]] = {}
        self.stats: dict[str, DedupStats] = {}
        self.sources: set[int] = set()  # epochs that references point into

    def deduplicate(self, key: str, rows: np.ndarray, epoch: int, rank: int, first_row: int) -> np.ndarray:
        """References for ``rows`` (``(n, nbytes)`` uint8), which will be stored from row ``first_row``.

        Returns:
            ``(n, 3)`` int32: ``(epoch, rank, row)`` of an identical stored row, or ``-1`` s for rows
            to be stored in place. Rows stored in place join the index while the budget allows.
        """
        refs = np.full((rows.shape[0], 3), NO_REF, dtype=np.int32)
        stats = self.stats.setdefault(key, DedupStats())
        stats.rows += rows.shape[0]
        digests = row_hashes(rows) if self.hash_fn is None else [self.hash_fn(r.tobytes()) for r in rows]
        for i, digest in enumerate(digests):
            bucket = self._index.get((key, digest), ())
            data = memoryview(rows[i])
            for checked, (stored, where) in enumerate(bucket):
                if stored == data:
                    refs[i] = where
                    self.sources.add(where[0])
                    stats.duplicates += 1
                    stats.bytes_saved += len(data)
                    stats.collisions += checked
                    break
            else:
                stats.collisions += len(bucket)
                if self.held_bytes + len(data) <= self.budget_bytes:
                    entry = (rows[i].tobytes(), (epoch, rank, first_row + i))
                    self._index.setdefault((key, digest), []).append(entry)
                    self.held_bytes += len(data)
        return refs

    def take_stats(self) -> dict[str, object]:
        """Statistics since the last call, by array, and the epochs referenced; resets both."""
        out = {"arrays": {k: s.to_dict() for k, s in self.stats.items()}, "sources": sorted(self.sources)}
        self.stats, self.sources = {}, set()
        return out
