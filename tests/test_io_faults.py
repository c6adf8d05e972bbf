"""A store write failing mid-run (a full disk, an I/O error): on_error="warn" keeps training, "raise"
stops it, and either way what was committed stays whole and readable."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage

from helpers import EXACT, Task, loader, trainer
from mstore_lightning import GradientCapture, StoreWriteError, open_store
from mstore_lightning.store.verify import verify
from test_capture_fit import data, mlp

FAULTS = {errno.ENOSPC: "No space left on device", errno.EIO: "Input/output error"}


@pytest.fixture
def failing_writes(monkeypatch):
    """From the first write under epoch 2 on, every write of the local store there fails with ``code``:
    first the epoch's own metadata, or with ``chunks_only`` its chunks, which the writer thread writes."""
    real_set = zarr.storage.LocalStore.set
    state = {"code": None, "failed": 0, "chunks_only": False}

    async def set_(self, key, value):
        hit = key.startswith("epochs/00002/") and (not state["chunks_only"] or "/c/" in key)
        if state["code"] is not None and hit:
            state["failed"] += 1
            raise OSError(state["code"], FAULTS[state["code"]], key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    return state


def assert_committed_intact(path, epochs):
    store = open_store(path)
    assert store.epochs == epochs
    for e in epochs:
        assert sorted(store.sample_ids(e).tolist()) == list(range(24))
        assert np.isfinite(np.asarray(store.norms(e))).all()
    report = verify(str(path))
    assert report.ok, report.summary()


@pytest.mark.parametrize("chunks_only", [False, True], ids=["metadata", "chunks"])
@pytest.mark.parametrize("code", sorted(FAULTS))
def test_warn_stops_capture_and_training_goes_on(tmp_path, failing_writes, code, chunks_only):
    failing_writes.update(code=code, chunks_only=chunks_only)
    torch.manual_seed(0)
    x, y = data(n=24)
    task = Task(mlp())
    before = [p.detach().clone() for p in task.parameters()]
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    fit = trainer([cap], max_epochs=4)
    with pytest.warns(
        UserWarning,
        match=rf"{os.strerror(code)}.*Epochs committed before it \(0, 1\).*epoch 2 is left uncommitted",
    ):
        fit.fit(task, loader(x, y, batch_size=6))
    assert fit.current_epoch == 4  # training ran to its end
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert failing_writes["failed"] >= 1
    failing_writes["code"] = None
    assert_committed_intact(tmp_path / "s.zarr", [0, 1])
    assert not any(m._forward_hooks for m in task.modules())  # hooks gone with the capture


def test_raise_stops_training_with_a_clear_error(tmp_path, failing_writes):
    failing_writes["code"] = errno.ENOSPC
    torch.manual_seed(0)
    x, y = data(n=24)
    task = Task(mlp())
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT, on_error="raise")
    fit = trainer([cap], max_epochs=4)
    with pytest.raises(StoreWriteError, match=r"No space left on device.*\(0, 1\) are whole and readable"):
        fit.fit(task, loader(x, y, batch_size=6))
    assert fit.current_epoch == 2
    failing_writes["code"] = None
    assert_committed_intact(tmp_path / "s.zarr", [0, 1])
    assert not any(m._forward_hooks for m in task.modules())


# A fit in its own process, as a user runs it: the writes of epoch 2 fail as in ``failing_writes``.
_FAILING_FIT = """
import errno, sys
sys.path.insert(0, {tests!r})
import torch, zarr.storage
from helpers import EXACT, Task, loader, trainer
from test_capture_fit import data, mlp
from mstore_lightning import GradientCapture

real_set = zarr.storage.LocalStore.set

async def set_(self, key, value):
    if key.startswith("epochs/00002/") and ({chunks_only!r} is False or "/c/" in key):
        raise OSError(errno.ENOSPC, "No space left on device", key)
    return await real_set(self, key, value)

zarr.storage.LocalStore.set = set_
torch.manual_seed(0)
x, y = data(n=24)
cap = GradientCapture({store!r}, policy=EXACT, on_error="raise")
trainer([cap], max_epochs=4).fit(Task(mlp()), loader(x, y, batch_size=6))
"""


@pytest.mark.parametrize("chunks_only", [False, True], ids=["metadata", "chunks"])
def test_raise_ends_the_traceback_with_one_line_naming_the_intact_epochs(tmp_path, chunks_only):
    store = tmp_path / "s.zarr"
    script = _FAILING_FIT.format(tests=str(Path(__file__).parent), chunks_only=chunks_only, store=str(store))
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("mstore_lightning.callbacks.gradient_capture.StoreWriteError: "), run.stderr
    for needle in (
        f"Writing the gradient store {str(store)!r} failed: OSError: [Errno 28] No space left on device",
        "Epochs committed before it (0, 1) are whole and readable",
        "epoch 2 is left uncommitted",
    ):
        assert needle in last, (needle, last)
    # The cause is kept above it, for debugging.
    assert "The above exception was the direct cause of the following exception" in run.stderr
    assert_committed_intact(store, [0, 1])


def test_on_error_is_checked(tmp_path):
    with pytest.raises(ValueError, match="`on_error` can be 'warn', 'raise'; got 'ignore'"):
        GradientCapture(tmp_path / "s.zarr", on_error="ignore")
