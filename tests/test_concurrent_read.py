"""Reading a store while another process trains into it: only committed epochs are seen, each whole,
and in-flight chunks never cause an error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mstore_lightning import open_store
from mstore_lightning.store.verify import epoch_states

pytestmark = pytest.mark.slow

N, EPOCHS = 48, 5

CHILD = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import torch
    from lightning.pytorch.callbacks import Callback
    from helpers import Task, loader, trainer
    from test_capture_fit import data, mlp
    from mstore_lightning import GradientCapture

    class Slow(Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.03)

    torch.manual_seed(0)
    x, y = data(n={N})
    capture = GradientCapture(sys.argv[1], policy={{"precision": "int8"}}, chunk_bytes=512)
    trainer([capture, Slow()], max_epochs={EPOCHS}).fit(Task(mlp()), loader(x, y, batch_size=4))
    """
)


def test_a_reader_beside_a_training_process_sees_only_whole_committed_epochs(tmp_path):
    path = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stderr=subprocess.PIPE, text=True)
    seen: list[tuple[int, ...]] = []
    reads = 0
    try:
        while proc.poll() is None:
            if not (path / "zarr.json").exists():
                time.sleep(0.01)
                continue
            store = open_store(path)
            epochs = tuple(store.epochs)
            for e in epochs:
                # Every epoch a reader lists is complete and its chunks decode.
                assert sorted(store.sample_ids(e).tolist()) == list(range(N))
                norms = store.norms(e)
                assert norms.shape == (N,) and np.isfinite(norms).all()
                reads += 1
            if not seen or seen[-1] != epochs:
                seen.append(epochs)
            time.sleep(0.05)  # leave the training process most of the CPU
    finally:
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    # The reader watched epochs appear one after another while training ran, and never an open one.
    assert len(seen) >= 3 and reads > 0
    assert all(list(s) == list(range(len(s))) for s in seen)
    final = open_store(path)
    assert final.epochs == list(range(EPOCHS))
    assert set(epoch_states(path).values()) == {"committed"}


def test_store_sizes_skip_a_file_renamed_between_listing_and_stat(tmp_path, monkeypatch):
    """A writer renames its ``.partial`` files while a report lists the store: the listing must go
    on without the file that moved, not fail."""
    import os

    import zarr

    from mstore_lightning.store import zarr_io

    (tmp_path / "epochs" / "00001").mkdir(parents=True)
    (tmp_path / "epochs" / "00001" / "a").write_bytes(b"x" * 10)
    moving = tmp_path / "epochs" / "00001" / "zarr.1234.partial"
    moving.write_bytes(b"y" * 20)
    real_scandir = os.scandir

    def scandir_then_rename(path):
        entries = list(real_scandir(path))
        if moving.exists() and any(e.name == moving.name for e in entries):
            moving.rename(moving.with_name("zarr.json"))  # the writer's rename, after the listing
        return iter(entries)

    monkeypatch.setattr(zarr_io.os, "scandir", scandir_then_rename)
    sizes = zarr_io.object_sizes(zarr.storage.LocalStore(tmp_path), "")
    assert sizes == {"epochs/00001/a": 10}
