"""``store.suspects()``: each signal against a brute-force computation, the combination against an
independent rank aggregation, determinism, and the flags on data built to have them."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import defaultdict

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import EXACT, Task, loader, per_sample_grads, trainer
from scipy.stats import median_abs_deviation
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.analytics.suspects import NEIGHBOURS, combine
from mstore_lightning.reports import report_paths


class PlainLoss(Task):
    """Returns the batch loss alone: the capture must find losses and margins by itself."""

    def training_step(self, batch: dict, batch_idx: int):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])


class Smoothed(Task):
    """Label smoothing breaks the softmax - onehot form; the logits it returns give the margins."""

    def training_step(self, batch: dict, batch_idx: int):
        logits = self(batch["x"])
        return {
            "loss": nn.functional.cross_entropy(logits, batch["y"], label_smoothing=0.1),
            "logits": logits,
        }


class Truth(L.Callback):
    """Before each step: every sample's cross-entropy, logit margin, per-sample gradient, and the
    inputs of the two linear layers of ``pl_module.net``."""

    def __init__(self) -> None:
        self.loss, self.margin = defaultdict(dict), defaultdict(dict)
        self.inputs, self.features = defaultdict(dict), defaultdict(dict)
        self.grads: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            z = pl_module(batch["x"])
            features = pl_module.net[:-1](batch["x"])
        y = batch["y"]
        loss = nn.functional.cross_entropy(z, y, reduction="none")
        own = z.gather(1, y[:, None])[:, 0]
        other = z.scatter(1, y[:, None], float("-inf")).amax(1)
        g = per_sample_grads(pl_module, batch["x"], y)
        for row, sid in enumerate(batch["index"].tolist()):
            e = trainer.current_epoch
            self.loss[e][sid], self.margin[e][sid] = float(loss[row]), float(own[row] - other[row])
            self.grads[e][sid] = {k: v[row] for k, v in g.items()}
            self.inputs[e][sid] = batch["x"][row].double()
            self.features[e][sid] = features[row].double()


def blobs(n: int = 48, seed: int = 0, flips: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    x = centres[y] + 0.5 * torch.randn(n, 4, generator=g)
    flipped = np.zeros(n, dtype=bool)
    if flips:
        rows = torch.randperm(n, generator=g)[:flips]
        y = y.clone()
        y[rows] = (y[rows] + 1) % 3
        flipped[rows.numpy()] = True
    return x, y, flipped


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _fit(tmp_path, task: Task, x, y, epochs: int = 3, callbacks=()) -> object:
    torch.manual_seed(0)
    trainer([*callbacks, GradientCapture(tmp_path / "s.zarr", policy=EXACT)], max_epochs=epochs).fit(
        task, loader(x, y, batch_size=8)
    )
    return open_store(tmp_path / "s.zarr")


def test_every_signal_equals_its_brute_force_computation(tmp_path):
    x, y, _ = blobs(flips=5)
    truth = Truth()
    store = _fit(tmp_path, PlainLoss(net()), x, y, callbacks=[truth])
    sus = store.suspects()
    ids = sus.ids
    epochs = store.epochs
    want_loss = np.array([np.mean([truth.loss[e][i] for e in epochs]) for i in ids])
    want_margin = np.array([np.mean([truth.margin[e][i] for e in epochs]) for i in ids])
    np.testing.assert_allclose(sus.signals["loss"], want_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sus.signals["margin"], want_margin, rtol=1e-4, atol=1e-5)
    flat = {
        e: {i: torch.cat([g.flatten() for g in truth.grads[e][i].values()]).double() for i in ids}
        for e in epochs
    }
    want_si = np.array([sum(store.lr(e) * float(flat[e][i].pow(2).sum()) for e in epochs) for i in ids])
    np.testing.assert_allclose(sus.signals["self_influence"], want_si, rtol=1e-4)
    last = epochs[-1]
    labels = {int(i): int(c) for i, c in zip(store.sample_ids(last), store.row_field(last, "label"))}
    unit = {i: flat[last][i] / flat[last][i].norm() for i in ids}
    class_sum = {c: sum(unit[i] for i in ids if labels[int(i)] == c) for c in set(labels.values())}
    want_align = np.array(
        [
            float(
                flat[last][i]
                @ class_sum[labels[int(i)]]
                / (flat[last][i].norm() * class_sum[labels[int(i)]].norm())
            )
            for i in ids
        ]
    )
    np.testing.assert_allclose(sus.signals["alignment"], want_align, rtol=1e-4, atol=1e-6)
    # Neighbours: in each linear layer, by a full sort of cosines of its inputs, the sample itself
    # left out; then averaged over the two layers.
    own = np.array([labels[int(i)] for i in ids])

    def disagreement(points):
        f = torch.stack([points[last][int(i)] for i in ids])
        f = f / f.norm(dim=1, keepdim=True)
        cos = (f @ f.T).fill_diagonal_(-2.0).numpy()
        nearest = np.argsort(-cos, axis=1, kind="stable")[:, :NEIGHBOURS]
        return (own[nearest] != own[:, None]).mean(1)

    want_near = (disagreement(truth.inputs) + disagreement(truth.features)) / 2
    np.testing.assert_array_equal(sus.signals["neighbours"], want_near)
    # The score: two views weighed equally, the median robust z-score of loss, margin and
    # alignment, and that of neighbours, by scipy's MAD (the standard deviation where the MAD is 0).

    def z(v):
        mad = median_abs_deviation(v, scale="normal")
        return (v - np.median(v)) / (mad if mad > 0 else v.std())

    fit = np.median([z(want_loss), z(-want_margin), z(-want_align)], axis=0)
    want_score = (fit + z(want_near)) / 2
    np.testing.assert_allclose(sus.scores, want_score, rtol=1e-3, atol=1e-3)
    assert np.all(np.diff(sus.scores) <= 0)


def test_logits_from_the_step_give_margins_when_the_rows_cannot(tmp_path):
    x, y, _ = blobs()
    truth = Truth()
    store = _fit(tmp_path, Smoothed(net()), x, y, epochs=1, callbacks=[truth])
    ids = store.sample_ids(0)
    sus = store.suspects(epochs=[0])
    by_id = dict(zip(sus.ids.tolist(), sus.signals["margin"]))
    np.testing.assert_allclose(
        [by_id[i] for i in ids], [truth.margin[0][i] for i in ids], rtol=1e-4, atol=1e-5
    )
    # Its loss is the cross-entropy of the logits, not the smoothed loss that was trained.
    np.testing.assert_allclose(
        store.row_field(0, "loss"), [truth.loss[0][i] for i in ids], rtol=1e-4, atol=1e-5
    )


def test_a_loss_that_is_not_cross_entropy_ranks_on_the_gradients_and_says_so(tmp_path):
    x, _, _ = blobs()
    target = torch.randn(len(x), 3)
    store = _fit(tmp_path, Task(net(), loss="mse"), x, target, epochs=1)
    sus = store.suspects()
    assert "margin" not in sus.signals and any("no margin" in n for n in sus.notes)
    assert len(sus.ids) == len(x)


def test_without_a_layer_keeping_its_input_there_is_no_neighbour_signal_and_it_says_so(tmp_path):
    x, y, _ = blobs(flips=3)
    torch.manual_seed(0)
    capture = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "representation": "full"})
    trainer([capture], max_epochs=2).fit(PlainLoss(net()), loader(x, y, batch_size=8))
    sus = open_store(tmp_path / "s.zarr").suspects()
    assert "neighbours" not in sus.signals and "alignment" in sus.signals
    assert any("no neighbour signal" in n for n in sus.notes)


def test_rankings_are_deterministic_and_k_keeps_the_first(tmp_path):
    x, y, _ = blobs(flips=4)
    store = _fit(tmp_path, PlainLoss(net()), x, y)
    a, b = store.suspects(), open_store(tmp_path / "s.zarr").suspects()
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    top = store.suspects(k=5)
    np.testing.assert_array_equal(top.ids, a.ids[:5])
    frame = top.to_pandas()
    assert list(frame["id"]) == top.ids.tolist() and {"loss", "margin", "conflicting"} <= set(frame.columns)


def test_the_score_leaves_unknown_values_out_and_ignores_unscored_signals():
    loss = np.array([1.0, 2.0, 3.0, 10.0])
    only_loss = combine({"loss": loss, "self_influence": np.array([9.0, 0, 0, 0])})
    np.testing.assert_allclose(only_loss, 0.6745 * (loss - 2.5) / 1.0)
    both = combine({"loss": loss, "margin": np.array([np.nan, 0.0, 1.0, 2.0])})
    assert both[0] == only_loss[0]  # no margin for sample 0: its loss alone
    assert not np.isnan(both).any()
    shares = np.array([0.0, 0.0, 0.0, 0.5])  # most at one value: the MAD is 0, the std scales it
    np.testing.assert_allclose(combine({"neighbours": shares}), shares / shares.std())
    # A view is the median of its signals: one signal far off does not move it.
    steady = np.array([1.0, 2.0, 3.0, 4.0])
    fit = combine({"loss": steady, "margin": -steady, "alignment": -np.array([1.0, 2.0, 3.0, 100.0])})
    np.testing.assert_allclose(fit, 0.6745 * (steady - 2.5))
    # Two views weigh the same, whatever the number of signals in each.
    views = combine(
        {
            "loss": steady,
            "margin": -steady,
            "alignment": -np.array([1.0, 2.0, 3.0, 100.0]),
            "neighbours": shares,
        }
    )
    np.testing.assert_allclose(views, (fit + shares / shares.std()) / 2)


def opposed(n: int = 40, flips: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Two classes at +mu and -mu: a flipped sample's gradient points against its new class's."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 2
    x = (1 - 2 * y.float())[:, None] * torch.tensor([3.0, 3.0, 0, 0]) + 0.3 * torch.randn(n, 4, generator=g)
    flipped = np.zeros(n, dtype=bool)
    flipped[:flips] = True
    y = torch.where(torch.from_numpy(flipped), 1 - y, y)
    return x, y, flipped


def test_gradients_opposing_their_class_are_flagged_and_clean_data_is_quiet(tmp_path):
    x, y, flipped = opposed(flips=4)
    sus = _fit(tmp_path / "noisy", PlainLoss(nn.Linear(4, 2)), x, y, epochs=4).suspects()
    conflicting = set(sus.ids[sus.flags["conflicting"]].tolist())
    assert conflicting == set(np.nonzero(flipped)[0].tolist())
    clean = _fit(tmp_path / "clean", PlainLoss(nn.Linear(4, 2)), *opposed()[:2], epochs=4).suspects()
    assert not clean.flags["conflicting"].any()
    assert clean.groups == [] and not clean.flags["duplicate_conflict"].any()


def test_duplicate_inputs_with_other_labels_are_grouped(tmp_path):
    x, y, _ = blobs(n=48)
    x[10], y[10] = x[3], (y[3] + 1) % 3  # the same input as sample 3, another label
    x[20], y[20] = x[5] * (1 + 1e-6), y[5]  # a near copy that agrees: not a conflict
    sus = _fit(tmp_path, PlainLoss(net()), x, y, epochs=1).suspects()
    assert sus.groups == [[3, 10]]
    flagged = set(sus.ids[sus.flags["duplicate_conflict"]].tolist())
    assert flagged == {3, 10}


@pytest.mark.parametrize("epochs", [[0], None])
def test_suspects_reads_only_the_epochs_asked_for(tmp_path, epochs):
    x, y, _ = blobs()
    store = _fit(tmp_path, PlainLoss(net()), x, y, epochs=2)
    sus = store.suspects(epochs=epochs)
    want = np.mean(
        [store.row_field(e, "loss")[np.argsort(store.sample_ids(e))] for e in (epochs or store.epochs)], 0
    )
    np.testing.assert_allclose(np.sort(sus.signals["loss"]), np.sort(want), rtol=1e-6)


def test_the_report_operator_and_the_cli_show_the_same_ranking(tmp_path):
    x, y, _ = blobs(n=40, flips=4)
    torch.manual_seed(0)
    path = tmp_path / "s.zarr"
    cap = GradientCapture(path, policy=EXACT, analytics=[{"suspects": {"k": 5}}])
    trainer([cap], max_epochs=2).fit(PlainLoss(net()), loader(x, y, batch_size=8))
    store = open_store(path)
    want = store.suspects()
    paths = report_paths(path)
    summary = paths.read_summary(1)
    (record,) = [r for r in summary["analytics"] if r["name"] == "suspects"]
    assert record["status"] == "ok"
    assert {"suspects/conflicting_share", "suspects/duplicate_conflict_share"} <= set(record["scalars"])
    top = pd.read_csv(paths.epoch_dir(1) / "suspects_top.csv")
    assert top["id"].tolist() == want.ids[:5].tolist()
    np.testing.assert_allclose(top["score"], want.scores[:5])
    shares = pd.read_csv(paths.epoch_dir(1) / "suspects_classes.csv")
    assert shares["share_of_suspects"].sum() == pytest.approx(1.0)
    cli = [sys.executable, "-m", "mstore_lightning.cli", "suspects", str(path)]
    shown = subprocess.run(cli, capture_output=True, text=True, check=True, timeout=300)
    assert "suspects: showing the top 20 of 40 (--top N or --all for more)" in shown.stderr
    assert len(shown.stdout.strip().splitlines()) == 1 + 20
    every = subprocess.run(
        [*cli, "--all", "--format", "csv", "-q"], capture_output=True, text=True, check=True
    )
    frame = pd.read_csv(io.StringIO(every.stdout))
    assert frame["id"].tolist() == want.ids.tolist()
    assert {"loss", "margin", "self_influence", "alignment", "conflicting", "duplicate_conflict"} <= set(
        frame.columns
    )
