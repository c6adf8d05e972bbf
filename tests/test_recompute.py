"""Store or recompute: weights kept instead of rows, rows recomputed on read, and measured decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from helpers import EXACT, IndexedTensors, Task, loader, trainer
from mstore_lightning import CapturePolicy, GradientCapture, PolicyError, StoreReadError, open_store
from mstore_lightning.analytics import influence
from mstore_lightning.capture.recompute import gamma
from test_capture_fit import data, mlp


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """Two epochs with the learning rate at 0: recomputed rows must equal captured ones."""
    path = tmp_path_factory.mktemp("recompute")
    torch.manual_seed(0)
    x, y = data(n=24)
    task = Task(mlp(), lr=0.0)
    caps = [
        GradientCapture(path / "stored.zarr", policy=EXACT),
        GradientCapture(path / "recomputed.zarr", policy={**EXACT, "recompute": {"layers": ["net.2"]}}),
    ]
    trainer(caps, max_epochs=2).fit(task, loader(x, y, batch_size=8))
    return open_store(path / "stored.zarr"), open_store(path / "recomputed.zarr"), task, IndexedTensors(x, y)


def test_recomputed_layer_stores_weights_not_rows(frozen_run):
    _, store, task, _ = frozen_run
    root = zarr.open_group(store.uri, mode="r")
    for e in (0, 1):
        assert store.catalog.epoch_attrs(e)["recomputed"] == ["net.2"]
        assert "net.2" not in root[f"epochs/{e:05d}/r0/layers"]
        np.testing.assert_array_equal(root[f"epochs/{e:05d}/weights/net.2.weight"][:], task.net[2].weight.detach().numpy())
    with pytest.raises(StoreReadError, match=r"call store.attach_recompute\(model, dataset\)"):
        store.norms(0)


def test_recompute_equals_capture_when_weights_are_frozen(frozen_run, monkeypatch):
    stored, store, task, dataset = frozen_run
    before = {k: v.clone() for k, v in task.state_dict().items()}
    store.attach_recompute(Task(mlp()), dataset, batch_size=5)  # weights come from the store
    for e in (0, 1):
        ids = store.sample_ids(e)
        for layer in ("net.0", "net.2"):
            got, want = store.restore(e, layer, ids), stored.restore(e, layer, ids)
            for p in want:
                torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-6)
        norms = store.norms(e)
        np.testing.assert_allclose(norms, stored.norms(e), rtol=1e-5)
        assert "recomputed from the end-of-epoch weights" in norms.approximate["net.2"]
        assert "net.0" not in norms.approximate
        np.testing.assert_allclose(store.dot(e, ids[:3], ids), stored.dot(e, ids[:3], ids), rtol=1e-4, atol=1e-7)
        monkeypatch.setattr(influence, "SCORE_BYTES", 8 * 2 * 7)  # top-k in windows of 7 rows
        got, want = store.topk(ids[:2], 4, epoch=e), stored.topk(ids[:2], 4, epoch=e)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in task.state_dict().items())
    assert "store or recompute: recompute (policy recompute.layers)" in store.describe()


class LoggingTask(Task):
    """Logs at step level: the measuring pass must not trip Lightning's logging checks."""

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        out = super().training_step(batch, batch_idx)
        self.log("train_loss", out["loss"], on_step=True)
        return out


@pytest.mark.parametrize(("threshold", "expect"), [(1e12, "recompute"), (None, None)])
def test_measured_decision_follows_gamma(tmp_path, threshold, expect):
    torch.manual_seed(0)
    x, y = data(n=32)
    rule = {"threshold_s_per_gb": threshold or 1.0, "expected_queries": 3}
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "recompute": rule})
    task = LoggingTask(mlp())
    trainer([cap], max_epochs=3).fit(task, loader(x, y))
    assert "log" not in vars(task)  # the silenced log was removed again
    store = open_store(tmp_path / "s.zarr")
    decisions = store.meta["recompute"]
    assert set(decisions) == {"net.0", "net.2"}
    for layer, d in decisions.items():
        assert d["t_read_s"] > 0 and d["t_recompute_s"] > 0 and d["bytes_per_sample"] > 0
        g = gamma(d["t_recompute_s"], d["t_read_s"], 3, d["bytes_per_sample"])
        assert d["gamma_s_per_gb"] == pytest.approx(g)
        assert d["decision"] == ("store" if g >= d["threshold_s_per_gb"] else "recompute")
        if expect:
            assert d["decision"] == expect
    recomputed = sorted(n for n, d in decisions.items() if d["decision"] == "recompute")
    assert store.catalog.epoch_attrs(0)["recomputed"] == []  # the measured epoch stores everything
    assert store.catalog.epoch_attrs(1)["recomputed"] == recomputed
    assert store.catalog.epoch_attrs(2)["recomputed"] == recomputed  # decided once, after the first epoch
    assert "gamma = (t_recompute" in store.describe()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"threshold_s_per_gb": 0}, r"`recompute.threshold_s_per_gb` must be a number > 0, got 0"),
        ({"expected_queries": 3}, r"`recompute` can be None or a mapping"),
        ({"threshold_s_per_gb": 1, "expected_queries": 0}, r"`recompute.expected_queries` must be an integer >= 1"),
        ({"layers": []}, r"`recompute.layers` must hold at least one pattern"),
        ("always", r"`recompute` can be"),
    ],
)
def test_recompute_policy_errors(value, match):
    with pytest.raises(PolicyError, match=match):
        CapturePolicy(recompute=value)
