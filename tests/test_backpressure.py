"""A store slower than training: the writer's queue stays within its byte bound (training waits),
and no row is dropped."""

from __future__ import annotations

import asyncio

import lightning as L
import torch
import zarr.storage

from helpers import EXACT, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from test_capture_fit import data

QUEUE = 32 << 10
CHUNK = 4 << 10


class PendingProbe(L.Callback):
    """The writer's queued bytes after every batch."""

    def __init__(self, capture: GradientCapture) -> None:
        self.capture = capture
        self.seen: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        self.seen.append(self.capture._run.writer.pending_bytes)


def test_a_slow_store_bounds_the_queue_and_keeps_every_row(tmp_path, monkeypatch):
    real_set = zarr.storage.LocalStore.set
    writes = {"chunks": 0}

    async def slow_set(self, key, value):
        if "/c/" in key:
            writes["chunks"] += 1
            await asyncio.sleep(0.01)  # a disk (or a network) far slower than the training step
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", slow_set)
    torch.manual_seed(0)
    n = 96
    x, y = data(n=n, d=32)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT, queue_bytes=QUEUE, chunk_bytes=CHUNK)
    probe = PendingProbe(cap)
    trainer([cap, probe], max_epochs=2).fit(Task(net), loader(x, y, batch_size=8))
    assert writes["chunks"] > 50  # the slow path was really taken
    # The queue filled up (training had to wait) but never past its bound plus one chunk in flight.
    assert max(probe.seen) > QUEUE // 2
    assert max(probe.seen) <= QUEUE + CHUNK
    store = open_store(tmp_path / "s.zarr")
    for e in store.epochs:
        assert sorted(store.sample_ids(e).tolist()) == list(range(n))
