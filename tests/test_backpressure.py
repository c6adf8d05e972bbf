"""A store slower than training: the writer's queue stays within its byte bound, and either training
waits and no row is dropped, or (``on_pressure="drop"``) training never waits and every dropped row is
counted."""

from __future__ import annotations

import asyncio
import threading

import lightning as L
import pytest
import torch
import zarr.storage

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from test_capture_fit import data

QUEUE = 32 << 10
CHUNK = 4 << 10


class PendingProbe(L.Callback):
    """The writer's queued bytes after every batch, and how long training has waited for it."""

    def __init__(self, capture: GradientCapture) -> None:
        self.capture = capture
        self.seen: list[int] = []
        self.waited = 0.0

    def on_train_batch_end(self, *args) -> None:
        self.seen.append(self.capture.recorder.writer.pending_bytes)
        self.waited = self.capture.recorder.writer.wait_seconds


def throttle_chunks(monkeypatch, before_write) -> None:
    """Makes every chunk write of a local store await ``before_write()`` first: a slow store."""
    real_set = zarr.storage.LocalStore.set

    async def slow_set(self, key, value):
        if "/c/" in key:
            await before_write()
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", slow_set)


def task(n: int = 96):
    torch.manual_seed(0)
    x, y = data(n=n, d=32)
    return x, y, torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


def test_a_slow_store_bounds_the_queue_and_keeps_every_row(tmp_path, monkeypatch):
    writes = {"chunks": 0}

    async def slow():
        writes["chunks"] += 1
        await asyncio.sleep(0.01)  # a disk (or a network) far slower than the training step

    throttle_chunks(monkeypatch, slow)
    n = 96
    x, y, net = task(n)
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


class Release(L.Callback):
    """Lets a stalled store write again once training is ``after`` batches in."""

    def __init__(self, after: int) -> None:
        self.after, self.gate = after, threading.Event()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.after:
            self.gate.set()


def test_dropping_under_pressure_never_waits_and_counts_every_dropped_row(tmp_path, monkeypatch):
    release = Release(after=16)

    async def stalled():
        while not release.gate.is_set():  # a store that stops answering for a while
            await asyncio.sleep(0.005)

    throttle_chunks(monkeypatch, stalled)
    n = 96
    x, y, net = task(n)
    cap = GradientCapture(
        tmp_path / "s.zarr", policy=EXACT, queue_bytes=QUEUE, chunk_bytes=CHUNK, on_pressure="drop"
    )
    probe, ref = PendingProbe(cap), Reference()
    with pytest.warns(UserWarning, match=r"dropped \d+ row\(s\) of epoch 0"):
        trainer([ref, cap, probe, release], max_epochs=2).fit(Task(net), loader(x, y, batch_size=4))
    # Training went on while nothing could be written: it never waited for the store.
    assert probe.waited == 0
    store = open_store(tmp_path / "s.zarr")
    assert store.dropped(0) > 0
    # Queued bytes stay within the bound plus what one step adds (each array fills one chunk at most).
    assert max(probe.seen) <= QUEUE + 6 * CHUNK
    for e in store.epochs:
        ids = store.sample_ids(e).tolist()
        assert len(ids) == len(set(ids)) and len(ids) + store.dropped(e) == n
        # The rows kept are whole: they restore to each sample's own gradient.
        got = store.restore(e, "net.0", ids)
        want = torch.stack([ref.grads[e][i]["net.0.weight"] for i in ids])
        torch.testing.assert_close(got["weight"], want, atol=1e-6, rtol=1e-5)


class EpochEndWait(L.Callback):
    """How long the writer made the capture wait, read after the capture's own epoch end."""

    def __init__(self, capture: GradientCapture) -> None:
        self.capture, self.waited = capture, 0.0

    def on_train_epoch_end(self, *args) -> None:
        self.waited = self.capture.recorder.writer.wait_seconds


def test_end_of_epoch_passes_wait_for_the_writer_even_when_steps_may_drop(tmp_path, monkeypatch):
    throttle_chunks(monkeypatch, lambda: asyncio.sleep(0.02))
    n = 96
    x, y, net = task(n)
    policy = {**EXACT, "timing": "checkpoint"}  # every row comes from the pass at the epoch's end
    cap = GradientCapture(
        tmp_path / "s.zarr", policy=policy, queue_bytes=QUEUE, chunk_bytes=CHUNK, on_pressure="drop"
    )
    probe = EpochEndWait(cap)
    trainer([cap, probe], max_epochs=1).fit(Task(net), loader(x, y, batch_size=4))
    assert probe.waited > 0  # the pass was held back by the queue bound instead of growing past it
    store = open_store(tmp_path / "s.zarr")
    assert store.dropped(0) == 0 and sorted(store.sample_ids(0).tolist()) == list(range(n))
