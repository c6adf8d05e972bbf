"""A training process killed with SIGKILL at random moments: what was committed survives, whole, and
resuming from the last Lightning checkpoint completes the store with no duplicate or missing row."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mstore_lightning import open_store
from mstore_lightning.store.verify import verify

pytestmark = pytest.mark.slow

N, EPOCHS = 48, 6

# The training run, in its own process so that it can be killed outright. Each batch sleeps a
# little, so that a kill lands anywhere: mid-epoch, at a commit, at a checkpoint.
CHILD = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from helpers import Task, loader, trainer
    from test_capture_fit import data, mlp
    from mstore_lightning import GradientCapture

    class Slow(Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.02)

    class StepLog(Callback):
        # What each global step trains on; a step redone after a resume is logged again, later.
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ids = " ".join(map(str, batch["index"].tolist()))
            with open(sys.argv[4], "a") as fh:
                fh.write(f"{{trainer.global_step}} {{trainer.current_epoch}} {{ids}}\\n")

    store, ckpts, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
    torch.manual_seed(0)
    x, y = data(n={N})
    capture = GradientCapture(store, policy={{"precision": "int8"}}, mode="append", chunk_bytes=512)
    # A checkpoint every 5 steps, mid-epoch ones included, and at every epoch's end.
    checkpoints = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=5, save_last=True)
    fit = trainer([StepLog(), capture, checkpoints, Slow()], max_epochs={EPOCHS}, enable_checkpointing=True)
    last = ckpts + "/last.ckpt"
    fit.fit(Task(mlp()), loader(x, y, batch_size=4), ckpt_path=last if resume else None)
    print("done", flush=True)
    """
)


def run_child(store: Path, ckpts: Path, resume: bool, kill_at: tuple[int, float] | None = None) -> int:
    """Runs the training child; with ``kill_at=(step, extra_s)``, SIGKILLs it ``extra_s`` after it
    starts its ``step``-th batch (counted from this run's start), wherever it is then."""
    log = Path(str(store) + ".steps")
    start = len(log.read_text().splitlines()) if log.exists() else 0
    cmd = [sys.executable, "-c", CHILD, str(store), str(ckpts), "resume" if resume else "fresh", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_at is None:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        return proc.returncode
    step, extra = kill_at
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) - start >= step:
            break
        time.sleep(0.005)
    time.sleep(extra)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


def trained_ids(store_path: Path) -> dict[int, list[int]]:
    """Per epoch, the ids the final model was trained on: the last logged batch of every step."""
    steps: dict[int, tuple[int, list[int]]] = {}
    for line in Path(str(store_path) + ".steps").read_text().splitlines():
        step, epoch, *ids = map(int, line.split())
        steps[step] = (epoch, ids)
    out: dict[int, list[int]] = {}
    for epoch, ids in steps.values():
        out.setdefault(epoch, []).extend(ids)
    return {e: sorted(ids) for e, ids in out.items()}


def assert_committed_epochs_whole(store_path: Path) -> list[int]:
    """Every committed epoch holds exactly the rows its steps trained on (once each), and verifies."""
    store = open_store(store_path)
    trained = trained_ids(store_path)
    for e in store.epochs:
        ids = sorted(store.sample_ids(e).tolist())
        assert ids == trained[e], f"epoch {e}: stored {ids}, trained {trained[e]}"
        for layer in store.layers:
            assert np.isfinite(np.asarray(store.norms(e, [layer]))).all()
    report = verify(str(store_path))
    assert report.ok, report.summary()
    return store.epochs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a child process")
def test_sigkill_at_random_moments_then_resume(tmp_path):
    rng = random.Random(1234)
    checked = []
    steps = EPOCHS * (N // 4)
    for attempt in range(3):
        store, ckpts = tmp_path / f"s{attempt}.zarr", tmp_path / f"ckpt{attempt}"
        # A random batch of the run, and a random moment within it (a batch takes about 25 ms).
        kill_at = (rng.randint(6, steps - 6), rng.uniform(0.0, 0.03))
        code = run_child(store, ckpts, resume=False, kill_at=kill_at)
        if code == 0:  # finished before the kill: nothing to check for this moment
            continue
        assert code == -signal.SIGKILL
        if not (ckpts / "last.ckpt").exists() or not store.exists():
            continue  # killed before the first checkpoint: a fresh start is the only way on
        before = assert_committed_epochs_whole(store)
        checked.append((kill_at, before))
        run_child(store, ckpts, resume=True)
        after = assert_committed_epochs_whole(store)
        assert after == list(range(EPOCHS)), (kill_at, before, after)
        assert set(before) <= set(after)
        # Without a resumable sampler, a mid-epoch resume trains that epoch on another order; the
        # store holds what was trained. Every other epoch holds each sample exactly once.
        store = open_store(store)
        once = [e for e in after if sorted(store.sample_ids(e).tolist()) == list(range(N))]
        assert len(once) >= EPOCHS - 1, once
    # The kills landed in training, with part of the run committed: otherwise nothing was tested.
    assert len(checked) >= 2 and all(len(b) < EPOCHS for _, b in checked), checked
