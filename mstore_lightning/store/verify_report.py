"""What ``verify`` finds: the problems (damage) and notes about a store, and a summary in words."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One piece of damage: where it is (an array or group path and a chunk key) and what it is."""

    array: str
    chunk: str | None
    what: str

    def __str__(self) -> str:
        where = f"{self.array}, chunk {self.chunk}" if self.chunk else self.array
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        uri: the store checked.
        problems: damage found; empty for a healthy store.
        notes: facts worth knowing that are not damage (an epoch still open, an ambiguous zero chunk).
        arrays_checked: arrays whose metadata and chunks were checked.
        chunks_checked: chunks decoded, or accounted for as unwritten zeros.
        epochs_committed: committed epochs, ascending.
        epochs_open: epochs not committed, ascending.
        epochs_without_manifest: committed epochs written before manifests existed, whose chunks are
            checked by their own crc32c only (which does not tell a chunk copied from elsewhere).
    """

    uri: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arrays_checked: int = 0
    chunks_checked: int = 0
    epochs_committed: list[int] = field(default_factory=list)
    epochs_open: list[int] = field(default_factory=list)
    epochs_without_manifest: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """A human-readable account: the verdict and counts, then every problem and note on a line."""
        verdict = "OK" if self.ok else f"DAMAGED, {len(self.problems)} problem(s)"
        lines = [
            f"{self.uri}: {verdict}",
            f"  epochs committed: {self.epochs_committed}; open: {self.epochs_open}",
            f"  {self.arrays_checked} arrays and {self.chunks_checked} chunks checked",
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
