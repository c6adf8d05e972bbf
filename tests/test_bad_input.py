"""Input the capture cannot use as it would like: NaN/Inf gradients and empty epochs are recorded and
warned about, never a crash, and the store stays readable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, StoreWriteError, open_store
from test_capture_fit import data, mlp


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_nonfinite_gradients_are_recorded_and_flagged(tmp_path, precision):
    torch.manual_seed(0)
    x, y = data(n=16)
    x[3] = float("nan")  # one bad sample: its own gradient is NaN from the first step on
    ref = Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "precision": precision})
    with pytest.warns(UserWarning, match=r"sample\(s\) of epoch 0 have NaN or Inf gradients \(ids \[3"):
        trainer([ref, cap], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=4, shuffle=False))
    store = open_store(tmp_path / "s.zarr")
    ids = store.sample_ids(0)
    norms = np.asarray(store.norms(0))
    # Exactly the samples whose torch.func gradients are non-finite are flagged, and read NaN.
    expected = sorted(
        i for i, g in ref.grads[0].items() if not all(torch.isfinite(t).all() for t in g.values())
    )
    assert 3 in expected
    assert store.nonfinite(0).tolist() == expected
    assert sorted(ids[~np.isfinite(norms)].tolist()) == expected
    finite = np.isfinite(norms)
    assert finite.any()  # the rest is readable


def test_an_empty_epoch_is_committed_empty_with_a_warning(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=8)
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "samples": {"ids": [999]}})
    with pytest.warns(UserWarning, match="epoch 0 captured no rows"):
        trainer([cap], max_epochs=2).fit(Task(mlp()), loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    assert store.epochs == [0, 1]
    assert [len(store.sample_ids(e)) for e in store.epochs] == [0, 0]
    assert len(store.self_influence().ids) == 0
    assert np.asarray(store.norms(1)).shape == (0,)


def test_an_unwritable_store_path_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    torch.manual_seed(0)
    task = Task(mlp())
    before = [p.detach().clone() for p in task.parameters()]
    fit = trainer([GradientCapture(blocker / "s.zarr")], max_epochs=1)
    with pytest.raises(
        StoreWriteError, match=r"Cannot write the gradient store at .*a_file/s.zarr.*writable"
    ):
        fit.fit(task, loader(*data(n=8)))
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))  # not one step trained
