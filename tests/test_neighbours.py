"""The neighbour signal of ``suspects()`` and the duplicate check: each layer's input as a point
(``Representation.input_features``) against the inputs the model really saw, the averaged share of
other-labelled neighbours against a full sort, the work bound, the count sketch, and the duplicate
search against the pairwise definition."""

from __future__ import annotations

import importlib
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import EXACT, Task, loader, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.analytics.kernels import as_scan

# The module, not the function of the same name that the package exports.
SUSPECTS = importlib.import_module("mstore_lightning.analytics.suspects")
VOCAB, T, CLASSES = 12, 6, 3


class TokenNet(nn.Module):
    """Ids -> an embedding with padding -> a linear map over tokens -> a 1-D convolution -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.mix = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 4, 3)
        self.head = nn.Linear(4 * (T - 2), CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))
        return self.head(torch.tanh(self.conv(h.transpose(1, 2))).flatten(1))


class Inputs(L.Callback):
    """Every sample's input to each module, per epoch, as the forward saw it."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.seen = names, defaultdict(dict)
        self.handles: list = []

    def on_fit_start(self, trainer, pl_module):
        for name in self.names:
            module = pl_module.net.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def keep(module, args):
            for row, sid in enumerate(self.ids):
                self.seen[(self.epoch, f"net.{name}")][sid] = args[0][row].detach().clone()

        return keep

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids, self.epoch = batch["index"].tolist(), trainer.current_epoch

    def on_fit_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()


def token_data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    ids[:, :2] = 1 + 3 * y[:, None] + torch.randint(0, 3, (n, 2), generator=g)  # class words
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # padded tails
    return ids, y


def share_bounds(points: torch.Tensor, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The least and the most share of other labels among each row's ``k`` nearest others (float64
    cosines, a full sort), over every way of breaking ties at the ``k``-th place: counted bags of
    ids tie often, and which of them is taken is arbitrary."""
    f = points.double()
    f = f / f.norm(dim=1, keepdim=True)
    cos = (f @ f.T).fill_diagonal_(-np.inf).numpy()
    kth = -np.sort(-cos, axis=1)[:, k - 1 : k]
    sure, maybe = cos > kth + 1e-6, np.abs(cos - kth) <= 1e-6
    other = labels[None, :] != labels[:, None]
    need = k - sure.sum(1)
    base = (sure & other).sum(1)
    least = base + np.maximum(0, need - (maybe & ~other).sum(1))
    most = base + np.minimum(need, (maybe & other).sum(1))
    return least / k, most / k


def test_each_layer_input_as_a_point_is_the_input_the_model_saw(tmp_path):
    ids, y = token_data()
    inputs = Inputs(["embed", "mix", "conv", "head"])
    torch.manual_seed(0)
    policy = {**EXACT, "representation": "factors"}
    trainer([inputs, GradientCapture(tmp_path / "s.zarr", policy=policy)], max_epochs=2).fit(
        Task(TokenNet()), loader(ids, y, batch_size=10)
    )
    scan = as_scan(open_store(tmp_path / "s.zarr"))
    last = scan.catalog.epochs[-1]
    order = scan.catalog.row_field(last, "ids").tolist()
    labels = np.asarray(scan.catalog.row_field(last, "label"))
    bounds = []
    for rep in scan.catalog.select(None):
        seen = torch.stack([inputs.seen[(last, rep.name)][i] for i in order])
        if rep.kind == "embedding":  # counts of each id, the padding id left out
            want = torch.stack([torch.bincount(s, minlength=VOCAB).float() for s in seen])
            want[:, 0] = 0
        elif rep.kind == "conv":  # the feature map in place
            want = seen.reshape(len(seen), -1)
        else:  # a linear map over tokens: their mean; the head has one position
            want = seen.reshape(len(seen), -1, seen.shape[-1]).mean(1)
        got = torch.cat([rep.input_features(b.load()) for b in scan.source(last, rep).blocks()])
        assert got.shape[1] == rep.input_width
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
        bounds.append(share_bounds(want, labels, SUSPECTS.NEIGHBOURS))
    shares, note = SUSPECTS.neighbour_disagreement(scan, last)
    assert note is None
    least, most = (np.mean([b[i] for b in bounds], 0) for i in (0, 1))
    assert np.all(least - 1e-12 <= shares) and np.all(shares <= most + 1e-12)
    assert (least == most).mean() > 0.5  # most rows have no tie at the k-th place: exact there


def test_past_the_work_bound_the_signal_reads_evenly_spaced_layers_and_says_so(tmp_path, monkeypatch):
    ids, y = token_data()
    torch.manual_seed(0)
    policy = {**EXACT, "representation": "factors"}
    trainer([GradientCapture(tmp_path / "s.zarr", policy=policy)], max_epochs=1).fit(
        Task(TokenNet()), loader(ids, y, batch_size=10)
    )
    store = open_store(tmp_path / "s.zarr")
    scan = as_scan(store)
    reps = scan.catalog.select(None)
    n = len(ids)
    # Room for the head alone: it is the one read.
    monkeypatch.setattr(SUSPECTS, "NEIGHBOUR_WORK", n * n * reps[-1].input_width)
    shares, note = SUSPECTS.neighbour_disagreement(scan, 0)
    assert "read 1 of 4 layers" in note
    head = torch.cat([reps[-1].input_features(b.load()) for b in scan.source(0, reps[-1]).blocks()])
    labels = np.asarray(scan.catalog.row_field(0, "label"))
    least, most = share_bounds(head, labels, SUSPECTS.NEIGHBOURS)
    assert np.all(least - 1e-12 <= shares) and np.all(shares <= most + 1e-12)
    assert any("read 1 of 4 layers" in m for m in store.suspects().notes)


@given(widths=st.lists(st.integers(1, 64), min_size=1, max_size=12), work=st.integers(0, 3000))
def test_the_layers_kept_are_evenly_spaced_fit_the_bound_and_end_with_the_last(widths, work):
    reps = [SimpleNamespace(input_width=w) for w in widths]
    rows = 3
    kept = SUSPECTS.within_work(reps, rows, work)
    at = [next(i for i, r in enumerate(reps) if r is k) for k in kept]
    assert at == sorted(set(at)) and at[-1] == len(reps) - 1
    assert rows * rows * sum(r.input_width for r in kept) <= work or len(kept) == 1
    if rows * rows * sum(widths) <= work:
        assert kept == reps
    if len(at) > 2:  # evenly spaced: neighbouring gaps differ by at most one layer
        gaps = np.diff(at)
        assert gaps.max() - gaps.min() <= 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), cols=st.integers(1, 300), width=st.integers(1, 64), seed=st.integers(0, 99))
def test_the_count_sketch_keeps_narrow_inputs_and_folds_wide_ones_linearly(n, cols, width, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, cols, generator=g), torch.randn(n, cols, generator=g)
    fx = SUSPECTS._fold(x, width, "layer")
    if cols <= width:
        assert fx is x
        return
    assert fx.shape == (n, width)
    torch.testing.assert_close(SUSPECTS._fold(x, width, "layer"), fx)  # seeded by the layer's name
    torch.testing.assert_close(
        SUSPECTS._fold(x + 2 * y, width, "layer"), fx + 2 * SUSPECTS._fold(y, width, "layer")
    )
    # Each column lands in one bucket with a sign of ±1: the fold keeps the sum of squares' share.
    ones = SUSPECTS._fold(torch.eye(cols), width, "layer")
    assert torch.all(ones.abs().sum(1) == 1)


def test_the_count_sketch_keeps_inner_products_in_expectation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 2000, generator=g).double(), torch.randn(1, 2000, generator=g).double()
    y = y + x  # correlated, so the inner product is far from 0
    width, draws = 64, 400
    est = torch.tensor(
        [float(SUSPECTS._fold(x, width, f"l{i}") @ SUSPECTS._fold(y, width, f"l{i}").T) for i in range(draws)]
    )
    exact = float(x @ y.T)
    # Var of one estimate <= (|x|²|y|² + <x,y>²) / width.
    se = ((float(x.norm() * y.norm()) ** 2 + exact**2) / width / draws) ** 0.5
    assert abs(float(est.mean()) - exact) < 4 * se


def brute_groups(a: torch.Tensor, labels: np.ndarray, ids: np.ndarray) -> list[list[int]]:
    """The duplicate groups by definition: every pair measured in float64, joined transitively."""
    a = a.double()
    norms = a.norm(dim=1)
    near = torch.cdist(a, a) <= SUSPECTS.DUPLICATE_DISTANCE * torch.maximum(norms[:, None], norms[None, :])
    n = len(a)
    group = list(range(n))
    for i in range(n):
        for j in range(n):
            if near[i, j] and group[i] != group[j]:
                old, new = group[j], group[i]
                group = [new if g == old else g for g in group]
    out = defaultdict(list)
    for i, g in enumerate(group):
        out[g].append(i)
    return sorted(
        sorted(int(ids[i]) for i in rows) for rows in out.values() if len({int(labels[i]) for i in rows}) > 1
    )


def test_the_duplicate_search_finds_every_group_the_pairwise_definition_does(tmp_path):
    g = torch.Generator().manual_seed(3)
    n = 48
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 3 * nn.functional.one_hot(y, 4).float()
    x[1], y[1] = x[0] * 1.004, (y[0] + 1) % 3  # 0.4% away, another label: a pair
    x[2], y[2] = x[0] * 1.02, 2  # 2% away: too far
    x[3], y[3] = x[0] + 0.006 * x[0].norm() * torch.tensor([1.0, 0, 0, 0]), 2  # off-axis, 0.6%
    x[4] = x[5] = 0.0  # two zero inputs with different labels
    y[4], y[5] = 0, 1
    x[7], y[7] = x[6], y[6]  # a copy that agrees: no conflict
    torch.manual_seed(0)
    trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT)], max_epochs=1).fit(
        Task(nn.Linear(4, 3)), loader(x, y, batch_size=8)
    )
    scan = as_scan(open_store(tmp_path / "s.zarr"))
    rep = scan.catalog.select(None)[0]
    stored = torch.cat([b.load()["a"].reshape(b.rows, -1) for b in scan.source(0, rep).blocks()])
    labels, ids = scan.catalog.row_field(0, "label"), scan.catalog.row_field(0, "ids")
    groups, note = SUSPECTS.duplicate_groups(scan, 0)
    assert note is None
    want = brute_groups(stored, np.asarray(labels), np.asarray(ids))
    assert groups == want
    assert [0, 1, 3] in groups and [4, 5] in groups and not any(2 in grp for grp in groups)


@pytest.mark.parametrize(
    "policy",
    [{"representation": "factors", "pool": 2}, {"representation": "projection", "projection_dim": 4}],
    ids=["pooled", "projected"],
)
def test_pooled_and_projected_layers_give_points_of_their_stated_width(tmp_path, policy):
    ids, y = token_data()
    inputs = Inputs(["conv"])
    torch.manual_seed(0)
    trainer([inputs, GradientCapture(tmp_path / "s.zarr", policy={**EXACT, **policy})], max_epochs=1).fit(
        Task(TokenNet()), loader(ids, y, batch_size=10)
    )
    scan = as_scan(open_store(tmp_path / "s.zarr"))
    order = scan.catalog.row_field(0, "ids").tolist()
    forms = {type(rep).__name__ for rep in scan.catalog.select(None)}
    assert ("PooledFactors" if "pool" in policy else "ProjectedFactors") in forms
    for rep in scan.catalog.select(None):
        if rep.input_width is None:
            continue
        got = torch.cat([rep.input_features(b.load()) for b in scan.source(0, rep).blocks()])
        assert got.shape == (len(ids), rep.input_width) and torch.isfinite(got).all()
        if rep.name == "net.conv" and "pool" in policy:  # block means, repeated over each block
            seen = torch.stack([inputs.seen[(0, "net.conv")][i] for i in order])
            want = nn.functional.avg_pool1d(seen, 2).repeat_interleave(2, dim=-1)
            torch.testing.assert_close(got, want.reshape(len(seen), -1), rtol=1e-5, atol=1e-6)
    shares, _ = SUSPECTS.neighbour_disagreement(scan, 0)
    assert np.isfinite(shares).all()
