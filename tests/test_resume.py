"""Resuming from a Lightning checkpoint after a crash: no duplicate and no missing rows."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import EXACT, Reference, Task, loader, manifest_files, stored_manifests, trainer
from mstore_lightning import GradientCapture, open_store
from mstore_lightning.store.verify import verify
from test_capture_fit import assert_matches_reference, data, mlp


class SimulatedCrash(RuntimeError):
    pass


class Crash(L.Callback):
    """Raises at a given global step, as a killed process would stop there."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise SimulatedCrash("simulated crash")


class StepLog(L.Callback):
    """Records which sample ids each global step trained on."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = defaultdict(list)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids[trainer.global_step] = batch["index"].tolist()


def rows_by_step(store, epoch):
    out = defaultdict(list)
    for step, sid in zip(store.row_field(epoch, "step").tolist(), store.sample_ids(epoch).tolist()):
        out[step].append(sid)
    return dict(out)


def test_crash_mid_epoch_resumes_from_epoch_end_checkpoint(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=30)
    path, ckpts = tmp_path / "s.zarr", tmp_path / "ckpt"
    # 5 batches an epoch; crash in the middle of epoch 1.
    first = trainer(
        [GradientCapture(path, policy=EXACT), ModelCheckpoint(dirpath=ckpts, save_last=True), Crash(at_step=7)],
        max_epochs=3,
        enable_checkpointing=True,
    )
    with pytest.raises(SimulatedCrash):
        first.fit(Task(mlp()), loader(x, y, batch_size=6))
    assert open_store(path).epochs == [0]

    ref = Reference()
    second = trainer(
        [ref, GradientCapture(path, policy=EXACT), ModelCheckpoint(dirpath=ckpts, save_last=True)], max_epochs=3, enable_checkpointing=True
    )
    second.fit(Task(mlp()), loader(x, y, batch_size=6), ckpt_path=ckpts / "last.ckpt")
    store = open_store(path)
    assert store.epochs == [0, 1, 2]
    for e in store.epochs:
        ids = store.sample_ids(e)
        assert len(ids) == 30 and sorted(ids.tolist()) == list(range(30))  # once each
    # The re-captured epochs match the weights they were trained with.
    for e in (1, 2):
        ids = store.sample_ids(e).tolist()
        for layer in store.layers:
            got = store.restore(e, layer, ids)["weight"]
            torch.testing.assert_close(got, ref.stacked(e, ids, f"{layer}.weight"), atol=1e-5, rtol=1e-4)
    assert stored_manifests(path) == manifest_files(path) and verify(path).ok


@pytest.mark.parametrize(("chunk_bytes", "precision"), [(4 << 20, "fp32"), (256, "fp32"), (256, "int8"), (256, "kbit:4")])
def test_crash_after_mid_epoch_checkpoint_keeps_rows_up_to_it(tmp_path, chunk_bytes, precision):
    torch.manual_seed(0)
    x, y = data(n=40)
    path, ckpts = tmp_path / "s.zarr", tmp_path / "ckpt"
    log = StepLog()
    mid = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=3, save_last=True)
    # 8 batches an epoch; checkpoints after steps 3 and 6 of epoch 0 ... crash at step 11 (epoch 1, batch 3).
    first = trainer(
        [GradientCapture(path, chunk_bytes=chunk_bytes, policy={"precision": precision}), mid, Crash(at_step=11), log],
        max_epochs=2,
        enable_checkpointing=True,
    )
    with pytest.raises(SimulatedCrash):
        first.fit(Task(mlp()), loader(x, y, batch_size=5, shuffle=False))
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=False)
    resumed_at = ckpt["global_step"]
    assert resumed_at == 9
    before = {s: ids for s, ids in log.ids.items() if s < resumed_at}

    log2 = StepLog()
    second = trainer(
        [GradientCapture(path, chunk_bytes=chunk_bytes, policy={"precision": precision}), ModelCheckpoint(dirpath=ckpts, save_last=True), log2],
        max_epochs=2,
        enable_checkpointing=True,
    )
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
        second.fit(Task(mlp()), loader(x, y, batch_size=5, shuffle=False), ckpt_path=ckpts / "last.ckpt")
    trained = {**before, **log2.ids}  # what the final model was trained on, step by step
    store = open_store(path)
    assert store.epochs == [0, 1]
    got = {**rows_by_step(store, 0), **rows_by_step(store, 1)}
    assert got == trained  # every trained step once, with exactly its samples
    assert sum(len(v) for v in rows_by_step(store, 1).values()) == len(store.sample_ids(1))
    assert np.all(np.diff(store.row_field(1, "step")) >= 0)
    norms = store.norms(1)  # every row decodes, the refilled last chunk (codes refitted for kbit) too
    assert norms.shape == (len(store.sample_ids(1)),) and np.isfinite(norms).all() and (norms > 0).all()
    # The resumed epoch's manifest lists the chunks kept from the crashed process as well as its own.
    assert stored_manifests(path) == manifest_files(path) and verify(path).ok
