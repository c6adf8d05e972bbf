"""Query capture at epoch end (GradientCapture(query=...)) and TracIn against torch.func."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import numpy as np
import pytest
import torch

from helpers import EXACT, Reference, Task, loader, per_sample_grads, trainer
from mstore_lightning import GradientCapture, StoreReadError, open_store
from test_capture_fit import data, mlp


class QueryReference(L.Callback):
    """torch.func gradients of the query samples with the end-of-epoch weights."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.grads: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Task) -> None:
        self.grads[trainer.current_epoch] = per_sample_grads(pl_module, self.x, self.y)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("query")
    torch.manual_seed(0)
    x, y = data(n=24)
    qx, qy = data(n=10, seed=5)
    ref, qref = Reference(), QueryReference(qx, qy)
    cap = GradientCapture(path / "s.zarr", policy=EXACT, query=loader(qx, qy, batch_size=4, shuffle=False))
    trainer([ref, cap, qref], max_epochs=2).fit(Task(mlp()), loader(x, y))
    return open_store(path / "s.zarr"), ref, qref


def test_query_rows_hold_end_of_epoch_gradients(run):
    store, _, qref = run
    for e in store.epochs:
        assert store.has_queries(e)
        qids = store.sample_ids(e, split="query")
        np.testing.assert_array_equal(qids, np.arange(10))
        assert (store.row_count(e), store.row_count(e, "query")) == (24, 10)
        for layer in store.layers:
            got = store.restore(e, layer, qids, split="query")
            for p, g in got.items():
                torch.testing.assert_close(g, qref.grads[e][f"{layer}.{p}"], rtol=1e-4, atol=1e-6)
        assert np.isnan(store.row_field(e, "loss", split="query")).all()


def test_tracin_uses_the_query_rows(run):
    store, ref, qref = run
    ids = list(range(24))
    names = sorted(ref.grads[0][0])
    want = 0
    for e in store.epochs:
        train = torch.cat([ref.stacked(e, ids, n).flatten(1) for n in names], 1).double()
        query = torch.cat([qref.grads[e][n].flatten(1) for n in names], 1).double()
        want = want + store.lr(e) * query @ train.T
    got = store.tracin(np.arange(10))
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-4, atol=1e-9)
    top = store.topk([0, 1], k=3, metric="dot")
    last = torch.cat([ref.stacked(1, ids, n).flatten(1) for n in names], 1).double()
    q = torch.cat([qref.grads[1][n].flatten(1) for n in names], 1).double()[[0, 1]]
    np.testing.assert_array_equal(top.ids, torch.argsort(q @ last.T, dim=1, descending=True)[:, :3].numpy())


def test_query_ids_outside_the_query_set_are_named(run):
    store, _, _ = run
    with pytest.raises(
        StoreReadError, match=r"Sample id\(s\) \[99\] were not captured as queries in epoch 0"
    ):
        store.dot(0, [99], [0], split_a="query")


def test_query_must_be_iterable():
    with pytest.raises(ValueError, match="`query` must be a DataLoader"):
        GradientCapture("unused.zarr", query=3)


def test_checkpoint_timing_captures_the_training_set_with_end_of_epoch_weights(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=20)
    ref = QueryReference(x, y)
    policy = {**EXACT, "timing": "checkpoint", "samples": {"ids": list(range(0, 20, 2))}}
    trainer([GradientCapture(tmp_path / "s.zarr", policy=policy), ref], max_epochs=2).fit(
        Task(mlp()), loader(x, y, batch_size=6, shuffle=True)
    )
    store = open_store(tmp_path / "s.zarr")
    for e in store.epochs:
        ids = store.sample_ids(e)
        assert sorted(ids.tolist()) == list(range(0, 20, 2)) and not store.has_queries(e)
        assert (store.row_count(e), store.row_count(e, "query")) == (10, 0)
        for layer in store.layers:
            for p, g in store.restore(e, layer, ids).items():
                torch.testing.assert_close(g, ref.grads[e][f"{layer}.{p}"][ids], rtol=1e-4, atol=1e-6)
        assert np.isnan(store.row_field(e, "loss")).all()
    assert store.policy["timing"] == "checkpoint"


@pytest.mark.parametrize("policy", [{"timing": "checkpoint"}, {"recompute": {"threshold_s_per_gb": 1.0}}])
def test_end_of_epoch_passes_leave_training_unchanged(tmp_path, policy):
    """Shuffling, dropout and the extra passes: the trained weights equal a run without capture."""
    x, y = data(n=40)
    qx, qy = data(n=8, seed=5)

    def fit(callbacks):
        torch.manual_seed(0)
        task = Task(
            torch.nn.Sequential(
                torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(8, 3)
            )
        )
        trainer(callbacks, max_epochs=3).fit(task, loader(x, y, batch_size=8, shuffle=True))
        return [p.detach().clone() for p in task.parameters()]

    plain = fit([])
    cap = GradientCapture(
        tmp_path / "s.zarr", policy={**EXACT, **policy}, query=loader(qx, qy, batch_size=4, shuffle=False)
    )
    captured = fit([cap])
    for a, b in zip(plain, captured):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_results_are_arrays_the_caller_can_write(tmp_path):
    """``torch.as_tensor`` warns on read-only arrays: every result is a fresh, writable one."""
    import warnings

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    ids = store.sample_ids(0)
    results = {
        "sample_ids": ids,
        "row_field": store.row_field(0, "loss"),
        "margin": store.row_field(0, "margin"),
        "norms": store.norms(0),
        "self_influence": store.self_influence().scores,
        "class_conflicts": store.class_conflicts(0).ids,
        "suspects": store.suspects().ids,
    }
    for name, value in results.items():
        assert np.asarray(value).flags.writeable, name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.as_tensor(np.asarray(value))
    ids[0] = -1  # the caller's copy: the store's stays as it was
    assert store.sample_ids(0)[0] != -1
