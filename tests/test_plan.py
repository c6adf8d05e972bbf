"""The storage plan: logged once after the first batch, recorded in the store, and an epoch that
cannot fit on the store's disk refused before any of it is written."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch
from helpers import Task, loader, trainer
from torch import nn

from mstore_lightning import DiskSpaceError, GradientCapture, open_store


def wide() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 256, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (needs root, as CI runs); skipped where the machine cannot mount one."""
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_the_plan_is_logged_once_and_recorded(tmp_path, caplog):
    x, y = data(60)
    cap = GradientCapture(tmp_path / "s.zarr", policy={"precision": "fp32"})
    with caplog.at_level(logging.INFO):
        trainer([cap], max_epochs=2).fit(Task(wide()), loader(x, y, batch_size=10))
    plans = [r.getMessage() for r in caplog.records if "storage plan" in r.getMessage()]
    assert len(plans) == 1
    store = open_store(tmp_path / "s.zarr")
    plan = store.meta["plan"]
    # net.0 keeps factors (256 + 256 fp32 numbers), net.2 the smaller of factors (259) and full (771).
    assert plan["layers"]["net.0"]["bytes_per_sample"] == (256 + 256) * 4
    assert plan["layers"]["net.2"]["bytes_per_sample"] == (256 + 3) * 4
    fields = 8 + 8 + 8 + 8 + 4 + 4 * 2  # ids, step, label, lr, loss; one squared norm per layer
    assert plan["bytes_per_sample"] == (512 + 259) * 4 + fields
    assert plan["rows_per_epoch"] == 60 and plan["bytes_per_epoch"] == 60 * plan["bytes_per_sample"]
    assert "total 3.1 KB/sample; 60 rows an epoch: 187.7 KB an epoch" in plans[0].replace(",", "")
    assert (
        "storage plan (before compression): 3,128 B/sample, 60 rows and 187,680 B an epoch"
        in store.describe()
    )


def test_an_epoch_that_cannot_fit_is_refused_before_it_is_written(small_disk):
    x, y = data(600)  # 600 rows x 3.1 KB > 1 MB
    cap = GradientCapture(small_disk / "s.zarr", policy={"precision": "fp32"})
    with pytest.raises(DiskSpaceError) as err:
        trainer([cap], max_epochs=1).fit(Task(wide()), loader(x, y, batch_size=50))
    msg = str(err.value)
    assert "600 rows x 3.1 KB/sample = 1.9 MB before compression" in msg
    assert "free" in msg and "Nothing of this epoch was written" in msg
    for hint in ("budget={'bytes_per_sample':", "layers=[...]", "samples=0.", "every_n_steps=2"):
        assert hint in msg
    assert "(net.0, net.2)" in msg  # the largest layers, to project first
    assert open_store(small_disk / "s.zarr").epochs == []
