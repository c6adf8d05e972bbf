"""Input the capture cannot use as it would like: NaN/Inf gradients and empty epochs are recorded and
warned about, never a crash, and the store stays readable; a path it must not write to is refused
before training, and what it holds is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from helpers import EXACT, Reference, Task, loader, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_capture_fit import data, mlp

from mstore_lightning import (
    GradientCapture,
    IncompatibleStoreError,
    PolicyError,
    StoreExistsError,
    StoreWriteError,
    open_store,
)
from mstore_lightning.capture.finite import nonfinite_rows
from mstore_lightning.store import layout


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


def test_a_norm_that_overflows_from_finite_factors_does_not_flag_its_sample(tmp_path):
    # Linear layers are checked for NaN and Inf through their squared norms; a finite input whose
    # squared norm overflows float32 gets the exact check, which clears it. Both in the last batch,
    # so no weight update spreads them.
    torch.manual_seed(0)
    x, y = data(n=16)
    x[14] = float("nan")
    x[15] = 3e19  # finite, and so are its gradients; ‖a‖² of the first layer is not
    ref = Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    with pytest.warns(
        UserWarning, match=r"1 sample\(s\) of epoch 0 have NaN or Inf gradients \(ids \[14\]\)"
    ):
        trainer([ref, cap], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=4, shuffle=False))
    expected = sorted(
        i for i, g in ref.grads[0].items() if not all(torch.isfinite(t).all() for t in g.values())
    )
    assert expected == [14]
    assert open_store(tmp_path / "s.zarr").nonfinite(0).tolist() == [14]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    widths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    marks=st.lists(
        st.tuples(st.integers(0, 8), st.integers(0, 2), st.sampled_from(["nan", "inf", "-inf", "huge"])),
        max_size=5,
    ),
)
def test_nonfinite_rows_are_exactly_the_rows_holding_nan_or_inf(n, widths, marks):
    torch.manual_seed(0)
    factors = [torch.randn(n, w) for w in widths]
    for row, which, kind in marks:
        t = factors[which % len(factors)]
        # "huge" is finite, but two of them overflow a row sum: the exact check must clear them.
        t[row % n, :] = 3e38 if kind == "huge" else float(kind)
    exact = torch.zeros(n, dtype=torch.bool)
    for t in factors:
        exact |= ~torch.isfinite(t).all(dim=1)
    got = nonfinite_rows(factors)
    assert (torch.zeros(n, dtype=torch.bool) if got is None else got).tolist() == exact.tolist()


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


def _untouched(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["error", "append"])
def test_a_store_of_another_model_is_refused_before_training_and_kept(tmp_path, mode):
    path = tmp_path / "s.zarr"
    x, y = data(n=8)
    trainer([GradientCapture(path, policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    before = _untouched(path)
    other = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Linear(2, 3)
    )
    task = Task(other)
    weights = [p.detach().clone() for p in task.parameters()]
    error = IncompatibleStoreError if mode == "append" else StoreExistsError
    with pytest.raises(error, match="other layers" if mode == "append" else "already holds a gradient store"):
        trainer([GradientCapture(path, policy=EXACT, mode=mode)]).fit(task, loader(x, y))
    assert all(torch.equal(a, b) for a, b in zip(weights, task.parameters()))  # not one step trained
    assert _untouched(path) == before


def test_a_store_of_another_schema_version_is_refused_and_kept(tmp_path):
    path = tmp_path / "s.zarr"
    x, y = data(n=8)
    trainer([GradientCapture(path, policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    root = zarr.open_group(path, mode="r+")
    meta = dict(root.attrs[layout.META_KEY], schema_version=layout.SCHEMA_VERSION + 1)
    root.attrs.update(layout.with_crc({layout.META_KEY: meta}))  # a newer library's store, intact
    before = _untouched(path)
    with pytest.raises(
        IncompatibleStoreError, match=rf"schema version {layout.SCHEMA_VERSION + 1}.*new path"
    ):
        trainer([GradientCapture(path, policy=EXACT, mode="append")]).fit(Task(mlp()), loader(x, y))
    assert _untouched(path) == before


@pytest.mark.parametrize(("loss", "policy"), [("sum", "mean"), ("mean", "sum")])
def test_a_loss_reduced_the_other_way_stops_the_first_step(tmp_path, loss, policy):
    x, y = data(n=16)
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "loss_reduction": policy})
    with pytest.raises(PolicyError, match=rf"first captured step's loss is the {loss} of its 8 per-sample") as e:
        trainer([cap], max_epochs=1).fit(Task(mlp(), reduction=loss), loader(x, y, batch_size=8))
    assert f"CapturePolicy(loss_reduction={loss!r})" in str(e.value) and "a factor of 8" in str(e.value)
    assert open_store(tmp_path / "s.zarr").epochs == []
