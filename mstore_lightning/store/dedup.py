"""Row deduplication: a row already stored is written once and referenced.

Rows are compared by a content hash of their stored bytes (codes and scales together), and every hash
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

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_DEDUP_BYTES = 256 << 20
NO_REF = -1


def _blake2b(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


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
        hash_fn: ``bytes -> digest``; tests pass a weak one to force collisions.
    """

    def __init__(
        self, budget_bytes: int = DEFAULT_DEDUP_BYTES, hash_fn: Callable[[bytes], bytes] = _blake2b
    ) -> None:
        self.budget_bytes = int(budget_bytes)
        self.hash_fn = hash_fn
        self.held_bytes = 0
        self._index: dict[tuple[str, bytes], list[tuple[bytes, tuple[int, int, int]]]] = {}
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
        for i in range(rows.shape[0]):
            data = rows[i].tobytes()
            digest = self.hash_fn(data)
            bucket = self._index.get((key, digest), ())
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
                    self._index.setdefault((key, digest), []).append((data, (epoch, rank, first_row + i)))
                    self.held_bytes += len(data)
        return refs

    def take_stats(self) -> dict[str, object]:
        """Statistics since the last call, by array, and the epochs referenced; resets both."""
        out = {"arrays": {k: s.to_dict() for k, s in self.stats.items()}, "sources": sorted(self.sources)}
        self.stats, self.sources = {}, set()
        return out
