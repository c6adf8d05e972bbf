"""The whole-capture budget: every layer exact while the capture fits, the largest projected first."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from helpers import Task, loader, trainer
from hypothesis import given, settings
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.capture import choice
from mstore_lightning.config import DEFAULT_BUDGET, CapturePolicy


class _C:
    def __init__(self, nbytes: int, error: float) -> None:
        self.nbytes, self.error = nbytes, error


def _ladder(size: int) -> list[_C]:
    # Projections of k = 2 .. 2^j: bytes grow with k, the predicted error falls.
    return [_C(min(size - 1, 16 * k), 1.0 / k) for k in (2, 4, 8, 16, 32, 64, 128)]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(50, 5000), min_size=1, max_size=8),
    fixed=st.integers(0, 3000),
    total=st.integers(100, 20000),
)
def test_fit_total_projects_only_while_over_and_largest_first(sizes, fixed, total):
    named = {f"l{i}": s for i, s in enumerate(sizes)}
    picks = choice.fit_total(named, {n: _ladder(s) for n, s in named.items()}, fixed, total)
    after = {n: picks[n].nbytes if n in picks else s for n, s in named.items()}
    if fixed + sum(named.values()) <= total:
        assert picks == {}
    floor = fixed + sum(min([s] + [c.nbytes for c in _ladder(s) if c.nbytes < s]) for s in named.values())
    if floor <= total:
        assert fixed + sum(after.values()) <= total  # it fits whenever it can
    for n in picks:  # a layer left exact is never larger than one that was projected
        assert all(named[m] <= named[n] for m in named if m not in picks)
    if picks:  # one step less on the last layer shrunk would not have fitted: no needless loss
        assert fixed + sum(after.values()) > total - max(named.values())


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(256, 128)
        self.mid = nn.Linear(128, 64)
        self.small = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.relu(self.mid(torch.relu(self.big(x)))))


def _fit(tmp_path, budget, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 256, generator=g), torch.randint(0, 3, (16,), generator=g)
    policy = {"precision": "fp32", "budget": budget, **kw}
    trainer([GradientCapture(tmp_path / "s.zarr", policy=policy)]).fit(Task(Wide()), loader(x, y))
    return open_store(tmp_path / "s.zarr")


def test_a_whole_capture_budget_projects_the_largest_layer_and_says_so(tmp_path):
    exact = _fit(tmp_path / "a", None)
    sizes = {n: exact.layer_spec(n)["choice"]["bytes_per_sample"] for n in exact.layers}
    assert sizes["net.big"] > sizes["net.mid"] > sizes["net.small"]
    budget = sum(sizes.values()) // 2
    with pytest.warns(
        UserWarning, match=r"over the budget of [\d,]+; \d layer\(s\) are stored as seeded projections"
    ):
        store = _fit(tmp_path / "b", {"bytes_per_sample": budget})
    projected = {n for n in store.layers if store.layer_spec(n)["representation"] == "projection"}
    assert "net.big" in projected and "net.small" not in projected
    assert all(sizes[n] >= sizes[m] for n in projected for m in set(sizes) - projected)  # largest first
    assert sum(store.layer_spec(n)["choice"]["bytes_per_sample"] for n in store.layers) <= budget
    spec = store.layer_spec("net.big")
    assert "whole-capture budget" in spec["choice"]["reason"] and spec["projection"]["predicted_error"] > 0
    assert store.approximate("net.big") and store.approximate("net.small") is None
    assert "whole-capture budget" in store.describe()


def test_the_default_budget_keeps_small_models_exact_and_none_means_exact(tmp_path):
    assert CapturePolicy().budget == DEFAULT_BUDGET
    assert CapturePolicy(budget=None).budget is None
    store = _fit(tmp_path, DEFAULT_BUDGET)
    assert all(store.layer_spec(n)["representation"] != "projection" for n in store.layers)


def test_a_per_layer_cap_is_its_own_field(tmp_path):
    store = _fit(tmp_path, {"layer_bytes_per_sample": 1024})
    assert store.layer_spec("net.big")["representation"] == "projection"
    assert store.layer_spec("net.big")["choice"]["bytes_per_sample"] <= 1024
    assert store.layer_spec("net.small")["representation"] != "projection"
