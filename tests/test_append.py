"""``mode="append"`` adds epochs after the committed ones and never rewrites or deletes one."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import zarr
from helpers import EXACT, Task, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_capture_fit import data, mlp
from test_resume import Crash, SimulatedCrash
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.store import layout
from mstore_lightning.store.session import IncompatibleStoreError, RunWriter


def hashes(path, under: str = "") -> dict[str, str]:
    """The sha256 of every file of the store (or of its folder ``under``), by relative path."""
    root = path / under if under else path
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def epoch_dir(epoch: int) -> str:
    return f"{layout.EPOCHS}/{layout.epoch_key(epoch)}"


def net(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def weights(task: Task) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.parameters()]


def unchanged(before: list[torch.Tensor], task: Task) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, task.parameters()))


# ---------------------------------------------------------------- incompatible stores
def test_another_model_with_the_same_layer_names_is_refused_and_the_store_kept(tmp_path):
    """The issue's case: Linear 64→128→10 fp32 without dedup, then Linear 32→16→10 int8."""
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    x, y = data(n=16, d=64, classes=10)
    fp32 = {"precision": "fp32", "dedup": False}
    trainer([GradientCapture(path, policy=fp32)], max_epochs=2).fit(Task(net(64, 128, 10)), loader(x, y))
    before = hashes(path)
    x2, y2 = data(n=16, d=32, classes=10)
    task = Task(net(32, 16, 10))
    start = weights(task)
    # Epochs 2 and 3 only: not a re-capture, so the layers and the policy are what is refused.
    cap = GradientCapture(path, policy={"precision": "int8", "epochs": [2, 3]}, mode="append")
    with pytest.raises(IncompatibleStoreError) as info:
        trainer([cap], max_epochs=4).fit(task, loader(x2, y2))
    message = str(info.value)
    assert "layer 'net.0' param_shapes" in message, message
    assert "'weight': [128, 64]" in message and "'weight': [16, 32]" in message  # both values
    assert unchanged(start, task)  # refused before training
    assert hashes(path) == before
    assert open_store(path).epochs == [0, 1]


@pytest.mark.parametrize(
    ("change", "field", "stored", "ours"),
    [
        ({"precision": "int8"}, "policy 'precision'", "'fp32'", "'int8'"),
        ({"dedup": True}, "policy 'dedup'", "False", "True"),
        ({"representation": "full"}, "policy 'representation'", "'auto'", "'full'"),
        ({"loss_reduction": "sum"}, "policy 'loss_reduction'", "'mean'", "'sum'"),
        ({"projection_seed": 3}, "policy 'projection_seed'", "0", "3"),
    ],
)
def test_another_storage_policy_is_refused_naming_the_field(tmp_path, change, field, stored, ours):
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    x, y = data(n=8)
    base = {"precision": "fp32", "dedup": False}
    trainer([GradientCapture(path, policy=base)]).fit(Task(mlp()), loader(x, y))
    before = hashes(path)
    task = Task(mlp())
    start = weights(task)
    cap = GradientCapture(path, policy={**base, **change, "epochs": [1]}, mode="append")
    expected = rf"{field} is {stored} in the store, {ours} in this run"
    with pytest.raises(IncompatibleStoreError, match=expected):
        trainer([cap], max_epochs=2).fit(task, loader(x, y))
    assert unchanged(start, task)
    assert hashes(path) == before


def test_a_layer_storing_otherwise_at_its_first_batch_is_refused_before_its_rows(tmp_path):
    """What a layer stores is chosen at its first batch; one that differs from the store's spec is
    refused there, before any row of that batch is written."""
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    x, y = data(n=8)
    trainer([GradientCapture(path, policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    root = zarr.open_group(path, mode="r+")
    meta = dict(root.attrs[layout.META_KEY])
    spec = dict(meta["layers"]["net.2"])
    spec["arrays"] = {**spec["arrays"], "d": {**spec["arrays"]["d"], "shape": [1, 99]}}
    meta["layers"] = {**meta["layers"], "net.2": spec}  # as another input width would have chosen
    root.update_attributes(layout.with_crc({layout.META_KEY: meta}))
    committed = hashes(path, epoch_dir(0))
    cap = GradientCapture(path, policy={**EXACT, "epochs": [1]}, mode="append")
    with pytest.raises(IncompatibleStoreError, match=r"layer 'net.2' arrays is .*99.* in the store"):
        trainer([cap], max_epochs=2).fit(Task(mlp()), loader(x, y))
    assert hashes(path, epoch_dir(0)) == committed
    assert open_store(path).epochs == [0]
    # The refused epoch was opened, uncommitted, but holds no array: not one row was written.
    for p in (path / epoch_dir(1)).rglob("zarr.json"):
        assert json.loads(p.read_text())["node_type"] == "group", p


# ---------------------------------------------------------------- re-captured epochs
@pytest.mark.parametrize("dedup", [False, True])
def test_a_fresh_fit_of_the_same_model_is_refused_and_committed_epochs_kept(tmp_path, dedup):
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    x, y = data(n=16)
    policy = {**EXACT, "dedup": dedup}
    trainer([GradientCapture(path, policy=policy)], max_epochs=2).fit(Task(mlp()), loader(x, y))
    before = hashes(path)
    task = Task(mlp())
    start = weights(task)
    with pytest.raises(IncompatibleStoreError) as info:
        trainer([GradientCapture(path, policy=policy, mode="append")], max_epochs=2).fit(task, loader(x, y))
    message = str(info.value)
    assert "committed epochs [0, 1]" in message and "capture epochs [0, 1] again" in message, message
    assert "ckpt_path" in message and "mode='overwrite'" in message and "another store path" in message
    assert unchanged(start, task)  # refused before training
    assert hashes(path) == before
    assert open_store(path).epochs == [0, 1]


def test_a_later_fit_whose_policy_leaves_out_the_committed_epochs_appends(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    x, y = data(n=16)
    trainer([GradientCapture(path, policy=EXACT)], max_epochs=2).fit(Task(mlp()), loader(x, y))
    before = {e: hashes(path, epoch_dir(e)) for e in (0, 1)}
    cap = GradientCapture(path, policy={**EXACT, "epochs": [2]}, mode="append")
    trainer([cap], max_epochs=3).fit(Task(mlp()), loader(x, y))
    assert open_store(path).epochs == [0, 1, 2]
    assert {e: hashes(path, epoch_dir(e)) for e in (0, 1)} == before


def test_the_writer_never_restarts_a_committed_epoch(tmp_path):
    """The last line: a writer not resuming from a checkpoint refuses to replace a committed epoch."""
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    x, y = data(n=8)
    trainer([GradientCapture(path, policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    meta = dict(zarr.open_group(path, mode="r").attrs[layout.META_KEY])
    before = hashes(path)
    run = RunWriter(str(path), mode="append")
    try:
        run.open(meta, resume=False)
        with pytest.raises(IncompatibleStoreError, match=r"committed epochs \[0\].*epochs \[0\] again"):
            run.begin_epoch(0)
    finally:
        run.close()
    assert hashes(path) == before


# ---------------------------------------------------------------- resumed runs
def test_a_run_resumed_mid_training_in_append_mode_completes_the_store(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=30)
    path, ckpts = tmp_path / "s.zarr", tmp_path / "ckpt"
    first = trainer(
        [
            GradientCapture(path, policy=EXACT, mode="append"),
            ModelCheckpoint(dirpath=ckpts, save_last=True),
            Crash(at_step=7),
        ],
        max_epochs=3,
        enable_checkpointing=True,
    )
    with pytest.raises(SimulatedCrash):
        first.fit(Task(mlp()), loader(x, y, batch_size=6))
    assert open_store(path).epochs == [0]
    epoch0 = hashes(path, epoch_dir(0))
    second = trainer(
        [GradientCapture(path, policy=EXACT, mode="append"), ModelCheckpoint(dirpath=ckpts, save_last=True)],
        max_epochs=3,
        enable_checkpointing=True,
    )
    second.fit(Task(mlp()), loader(x, y, batch_size=6), ckpt_path=ckpts / "last.ckpt")
    store = open_store(path)
    assert store.epochs == [0, 1, 2]
    assert all(sorted(store.sample_ids(e).tolist()) == list(range(30)) for e in store.epochs)
    assert hashes(path, epoch_dir(0)) == epoch0  # committed in the store and in the checkpoint


@pytest.mark.parametrize("dedup", [False, True])
def test_resuming_from_the_end_of_run_checkpoint_appends_new_epochs(tmp_path, dedup):
    torch.manual_seed(0)
    x, y = data(n=16)
    path, ckpts = tmp_path / "s.zarr", tmp_path / "ckpt"
    policy = {**EXACT, "dedup": dedup}
    first = trainer(
        [GradientCapture(path, policy=policy), ModelCheckpoint(dirpath=ckpts, save_last=True)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    first.fit(Task(mlp()), loader(x, y))
    before = {e: hashes(path, epoch_dir(e)) for e in (0, 1)}
    second = trainer(
        [GradientCapture(path, policy=policy, mode="append"), ModelCheckpoint(dirpath=ckpts, save_last=True)],
        max_epochs=4,
        enable_checkpointing=True,
    )
    second.fit(Task(mlp()), loader(x, y), ckpt_path=ckpts / "last.ckpt")
    store = open_store(path)
    assert store.epochs == [0, 1, 2, 3]
    assert all(sorted(store.sample_ids(e).tolist()) == list(range(16)) for e in store.epochs)
    assert {e: hashes(path, epoch_dir(e)) for e in (0, 1)} == before
