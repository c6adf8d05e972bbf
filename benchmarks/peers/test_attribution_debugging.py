"""Checks of ``attribution.py`` and ``debugging.py`` against independent references.

They need the peers' environment (Captum, dattri, cleanlab, mnist1d), so they live here and not in
``tests/``:

    .venv-peers/bin/python -m pytest benchmarks/peers/test_attribution_debugging.py -q
"""

from __future__ import annotations

import socket
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common

attr = common.load_peer_script("attribution")
dbg = common.load_peer_script("debugging")

_scores = st.integers(2, 6).flatmap(
    lambda q: st.integers(5, 40).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, (q, n), elements=st.floats(-1e3, 1e3, allow_nan=False, width=64), unique=True),
            arrays(np.float64, (q, n), elements=st.floats(-1e3, 1e3, allow_nan=False, width=64), unique=True),
            st.integers(1, n),
        )
    )
)


# ------------------------------------------------------------------------------------------ metrics
@settings(max_examples=60, deadline=None)
@given(_scores)
def test_agreement_matches_scipy_and_brute_force(case):
    """Pearson, per-row Spearman, top-k overlap and max relative error, each against its definition."""
    a, b, k = case
    got = attr.agreement(a, b, k)
    assert got["pearson"] == pytest.approx(stats.pearsonr(a.ravel(), b.ravel())[0], abs=1e-9, nan_ok=True)
    spearman = np.mean([stats.spearmanr(x, y)[0] for x, y in zip(a, b)])
    assert got["spearman"] == pytest.approx(spearman, abs=1e-9, nan_ok=True)
    overlap = np.mean([len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)])
    assert got["top_k_overlap"] == pytest.approx(overlap)
    assert got["max_rel_err"] == pytest.approx(max(abs(u - v) for u, v in zip(a.flat, b.flat)) / abs(b).max())


def test_agreement_of_identical_scores_is_perfect_and_of_reversed_is_not():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 50))
    same = attr.agreement(a, a.copy(), 5)
    assert (
        same["spearman"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0 and same["max_rel_err"] == 0.0
    )
    rev = attr.agreement(-a, a, 5)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["top_k_overlap"] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(4, 60).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, n, elements=st.floats(-10, 10, allow_nan=False)),
            arrays(bool, n).filter(lambda m: 0 < m.sum() < len(m)),
        )
    )
)
def test_detection_against_pair_counting(case):
    """ROC-AUC is the share of (flipped, clean) pairs the score orders right, ties counting half;
    precision at k is the flipped share of the k highest scores (ties broken by position)."""
    score, flipped = case
    pos, neg = score[flipped], score[~flipped]
    auc = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])
    got = attr.detection(score, flipped)
    assert got["roc_auc"] == pytest.approx(auc)
    k = int(flipped.sum())
    order = sorted(range(len(score)), key=lambda i: (-score[i], i))[:k]
    assert got["precision_at_k"] == pytest.approx(flipped[order].mean())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200).flatmap(lambda e: st.tuples(st.just(e), st.integers(1, e))))
def test_checkpoint_epochs_are_distinct_in_range_and_end_last(case):
    epochs, count = case
    got = attr.checkpoint_epochs(epochs, count)
    assert got == sorted(set(got)) and len(got) == count
    assert got[-1] == epochs - 1 and got[0] >= 0


@settings(max_examples=40, deadline=None)
@given(st.integers(10, 500), st.integers(0, 2**31 - 1))
def test_flip_labels_changes_exactly_its_share_to_other_classes(n, seed):
    y = np.random.default_rng(seed).integers(0, 10, size=n)
    noisy, mask = dbg.flip_labels(y, seed)
    assert mask.sum() == round(0.1 * n)
    assert np.all(noisy[mask] != y[mask]) and np.array_equal(noisy[~mask], y[~mask])
    again, mask2 = dbg.flip_labels(y, seed)
    assert np.array_equal(again, noisy) and np.array_equal(mask, mask2)


def test_training_step_records_loss_and_margin_of_each_sample():
    """The loss baselines' records against cross-entropy and margins computed by hand."""
    torch.manual_seed(0)
    spec = dbg.TASKS["digits"]
    model = dbg.Classifier(spec.build(), spec, n=12, epochs=2)
    x, y, ids = torch.randn(5, 64), torch.tensor([0, 3, 9, 3, 1]), torch.tensor([11, 2, 7, 0, 5])
    out = model.training_step({"x": x, "y": y, "index": ids}, 0)
    logits = model.net(x).detach()
    for j, i in enumerate(ids.tolist()):
        row = logits[j]
        others = torch.cat([row[: y[j]], row[y[j] + 1 :]])
        assert model.margins[0, i] == pytest.approx(float(row[y[j]] - others.max()), rel=1e-5)
        assert model.losses[0, i] == pytest.approx(float(F.cross_entropy(row[None], y[j : j + 1])), rel=1e-5)
    assert np.isnan(model.losses[1]).all() and np.isnan(model.losses[0, [1, 3, 4, 6, 8, 9, 10]]).all()
    assert out["loss"].item() == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_loss_baselines_rank_by_their_definitions():
    model = dbg.Classifier(dbg.build_cnn(), dbg.TASKS["mnist1d"], n=3, epochs=2)
    model.losses[:] = [[1.0, 2.0, 3.0], [3.0, 0.5, 1.0]]
    model.margins[:] = [[2.0, -1.0, 0.0], [0.0, -1.0, 4.0]]
    got = dbg.loss_baselines(model)
    np.testing.assert_allclose(got["loss_last_epoch"], [3.0, 0.5, 1.0])
    np.testing.assert_allclose(got["loss_mean_over_epochs"], [2.0, 1.25, 2.0])
    np.testing.assert_allclose(got["aum"], [-1.0, 1.0, -2.0])  # low margin, high suspicion


def test_mnist1d_is_generated_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    data = dbg.load_mnist1d(0)
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.flipped.sum() == 400
    assert np.array_equal(dbg.load_mnist1d(0).x_train, data.x_train)  # its generator is seeded


def test_cnn_takes_mnist1d_sequences():
    assert dbg.build_cnn()(torch.randn(3, 40)).shape == (3, 10)


# ------------------------------------------------------------------------------- attribution, end to end
def _reference(task, saved) -> tuple[np.ndarray, np.ndarray]:
    """TracIn and self-influence from ``torch.func`` per-sample gradients at each saved checkpoint."""
    net = attr.build_net()
    x, y = task.train_set.x, task.train_set.y
    xq, yq = task.query_set.x, task.query_set.y
    tracin = np.zeros((len(yq), len(y)))
    self_inf = np.zeros(len(y))
    for _, path, lr in saved:
        lr = attr.load_checkpoint(net, path)
        net.double()
        g = common.per_sample_grads(net, x.double(), y)
        gq = common.per_sample_grads(net, xq.double(), yq)
        flat = torch.cat([v.reshape(len(y), -1) for v in g.values()], 1)
        flat_q = torch.cat([v.reshape(len(yq), -1) for v in gq.values()], 1)
        tracin += lr * (flat_q @ flat.T).numpy()
        self_inf += lr * (flat * flat).sum(1).numpy()
        net.float()
    return tracin, self_inf


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Two epochs, both checkpoints, 12 queries: every method's scores and a float64 reference."""
    workdir = tmp_path_factory.mktemp("attribution")
    task = attr.Task(epochs=2, checkpoints=[0, 1], queries=12)
    run = attr.capture_runs(task, workdir)
    paths = [p for _, p, _ in run["checkpoints"]]
    lrs = [lr for _, _, lr in run["checkpoints"]]
    queries = np.arange(task.n_queries)
    methods = {name: attr.ours(path, queries) for name, path in run["stores"].items()}
    methods["captum"] = attr.captum(task, paths, 256, fast=True)
    methods["dattri_exact"] = attr.dattri(task, paths, lrs, 256, attr.DATTRI_EXACT)
    scores = {name: {op: fn() for op, fn in ops.items()} for name, ops in methods.items()}
    return task, run, scores, _reference(task, run["checkpoints"])


def test_checkpoints_hold_the_stores_epochs_and_learning_rates(small_run):
    _, run, _, _ = small_run
    assert [e for e, _, _ in run["checkpoints"]] == [0, 1]
    for path in run["stores"].values():
        store = attr.open_store(path)
        assert store.epochs == [0, 1]
        assert [store.lr(e) for e in store.epochs] == [lr for _, _, lr in run["checkpoints"]] == [attr.LR] * 2


@pytest.mark.parametrize("method", ["ours_fp32", "captum", "dattri_exact"])
def test_exact_methods_match_torch_func(small_run, method):
    """The fp32 store and both exact peers give TracInCP as computed from float64 per-sample gradients.

    Every method works in float32 over ~26,000 parameters, so each score carries a rounding error up to
    about sqrt(n) * 6e-8 ~ 1e-5 of its scale (measured up to 1.1e-5 on the smallest self-influences):
    TracIn is held to 1e-5 of its largest entry, self-influence (a sum of squares) to 1e-4 of each one.
    """
    _, _, scores, (tracin, self_inf) = small_run
    np.testing.assert_allclose(scores[method]["tracin"], tracin, rtol=0, atol=1e-5 * np.abs(tracin).max())
    np.testing.assert_allclose(scores[method]["self_influence"], self_inf, rtol=1e-4)


def test_during_timing_is_not_tracincp(small_run):
    """The "during" arm holds each row at its own step's weights, another quantity than TracInCP: a
    mix-up of the arms (both at the checkpoint weights) would make them coincide."""
    _, _, scores, (_, self_inf) = small_run
    during = scores["ours_int8_during"]["self_influence"]
    assert np.abs(during - self_inf).max() / self_inf.max() > 0.01


def test_exactness_checks_flag_a_wrong_method():
    good = {"max_rel_err": 1e-7}
    bad = {"max_rel_err": 3e-2}
    agree = {op: {"ours_fp32": {"captum": good, "dattri_exact": bad}} for op in ("tracin", "self_influence")}
    checks = attr.exactness_checks(agree)
    assert checks["ours_fp32_vs_captum_tracin"]["ok"] and not checks["ours_fp32_vs_dattri_exact_tracin"]["ok"]
    assert set(checks) == {f"ours_fp32_vs_{p}_{op}" for p in ("captum", "dattri_exact") for op in agree}


# -------------------------------------------------------------------------------- debugging, end to end
def test_one_seed_runs_every_detector_and_capture_leaves_training_alone(tmp_path):
    r = dbg.run_seed("digits", dbg.TASKS["digits"], epochs=2, seed=3, workdir=tmp_path)
    assert r["capture_vs_plain_max_loss_diff"] == 0.0
    assert set(r["detection"]) == set(dbg.LABELS)
    for d in r["detection"].values():
        assert 0.5 < d["roc_auc"] <= 1.0  # every detector beats chance on 10% flipped digits
    assert r["times"]["cleanlab"]["fits"] == dbg.FOLDS and len(r["cleanlab"]["fold_fit_s"]) == dbg.FOLDS
    flagged = r["cleanlab"]["find_label_issues"]
    assert 0 < flagged["flagged"] and 0.0 <= flagged["precision"] <= 1.0


def test_self_influence_scores_are_the_stores_norms_by_sample_id(tmp_path):
    """Both scores debugging.py reads equal Σ_e lr_e ‖g‖² built from the store's per-epoch, per-layer
    norms placed by sample id (rows arrive shuffled), and the layers add up to the whole."""
    spec, data = dbg.TASKS["digits"], dbg.load_digits(1)
    out = dbg.run_ours(spec, data, epochs=2, seed=1, path=tmp_path / "s.zarr")
    store = attr.open_store(tmp_path / "s.zarr")
    per_layer = {layer: np.zeros(len(data.y_train)) for layer in store.layers}
    for e in store.epochs:
        ids = store.sample_ids(e)
        assert not np.array_equal(ids, np.sort(ids))  # shuffled: position is not identity
        for layer in store.layers:
            per_layer[layer][ids] += store.lr(e) * np.asarray(store.norms(e, [layer]), dtype=np.float64) ** 2
    np.testing.assert_allclose(out["score"]["output_layer"], per_layer[spec.head], rtol=1e-9)
    np.testing.assert_allclose(out["score"]["all_layers"], sum(per_layer.values()), rtol=1e-6)
    assert spec.head == store.layers[-1] and len(store.layers) == 3


def test_cross_validated_probabilities_are_out_of_fold(monkeypatch):
    """Every sample's probabilities come from the one fold model that did not train on it."""
    spec, data = dbg.TASKS["digits"], dbg.load_digits(0)
    seen: list[set[int]] = []
    real_fit = dbg.fit

    def spy(spec_, data_, rows, epochs, seed, callbacks):
        seen.append(set(rows.tolist()))
        return real_fit(spec_, data_, rows, epochs, seed, callbacks)

    monkeypatch.setattr(dbg, "fit", spy)
    out = dbg.run_cleanlab(spec, data, epochs=1, seed=0)
    n = len(data.y_train)
    assert len(seen) == dbg.FOLDS
    held_out = [set(range(n)) - s for s in seen]
    assert set().union(*held_out) == set(range(n))
    assert all(not (a & b) for a, b in combinations(held_out, 2))
    assert np.isfinite(out["score"]).all() and out["score"].shape == (n,)
