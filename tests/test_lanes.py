"""Worker threads for scans over few queries: same sums as one thread, failures raised, memory bounded."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from helpers import Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from mstore_lightning.analytics import kernels
from mstore_lightning.store import lanes
from test_capture_fit import data, mlp


def test_lanes_run_every_call_on_workers_and_keep_few_waiting():
    done, waiting, names = [], [], set()

    def work(i: int) -> None:
        time.sleep(0.002)
        names.add(threading.current_thread().name)
        done.append(i)

    with lanes.Lanes(2) as pool:
        for i in range(12):
            pool.submit(work, i)
            waiting.append(len(pool._pending))
            if i == 5:
                pool.wait()
                assert sorted(done) == list(range(6))
    assert sorted(done) == list(range(12))
    assert threading.current_thread().name not in names
    assert max(waiting) <= 4  # two per thread: a fast reader cannot pile up chunks


def test_lanes_raise_the_first_failure_when_left():
    def fails():
        raise ValueError("chunk 3 is damaged")

    with pytest.raises(ValueError, match="chunk 3 is damaged"), lanes.Lanes(2) as pool:
        pool.submit(fails)
        pool.submit(time.sleep, 0.001)


def test_one_thread_runs_inline():
    names = []
    with lanes.Lanes(1) as pool:
        pool.submit(lambda: names.append(threading.current_thread().name))
    assert names == [threading.current_thread().name]


def test_a_scan_split_over_threads_sums_exactly_as_one_thread(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x, y = data(n=40)
    capture = GradientCapture(tmp_path / "s.zarr", chunk_bytes=1024)  # rows spread over many chunks
    trainer([capture], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=8))
    store = open_store(tmp_path / "s.zarr")
    ids = store.sample_ids(0)[::-1]  # out of order: put back in the asked order at the end
    gathered = np.asarray(store.dot(0, [5, 11], ids))  # few ids: gathered, not streamed
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 4)  # streamed by chunk from here on
    sums = {}
    for threads in (1, 3):
        monkeypatch.setattr(lanes.Lanes, "for_queries", classmethod(lambda cls, q, t=threads: cls(t)))
        sums[threads] = np.asarray(store.dot(0, [5, 11], ids))
    np.testing.assert_array_equal(sums[3], sums[1])
    np.testing.assert_allclose(sums[3], gathered, rtol=1e-5, atol=1e-7)
