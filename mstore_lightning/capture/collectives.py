"""What capture needs of the other processes of a distributed run, as plain callables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _no_barrier(name: str) -> None:
    return None


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Collectives:
    """The processes of a run as the recorder sees them; one process by default.

    Under Lightning these come from ``trainer.strategy``; a plain ``torch.distributed`` loop passes
    its own.

    Attributes:
        rank: this process's rank; rank 0 writes the shared metadata and commits epochs.
        world_size: the number of processes.
        barrier: ``barrier(name)`` waits for every process.
        total: ``total(value)`` is every process's ``value`` summed.
        broadcast: ``broadcast(obj)`` is rank 0's ``obj`` on every process.
    """

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[str], None] = _no_barrier
    total: Callable[[float], float] = _same
    broadcast: Callable[[Any], Any] = _same
