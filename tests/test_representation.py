"""Representation choice: projections (unbiased, bounded, seeded), pooled convolutions, and budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, StoreReadError, open_store
from mstore_lightning.capture import choice
from mstore_lightning.core import pooling, projection
from mstore_lightning.core.families.conv import ConvExtractor
from mstore_lightning.core.families.kron import kron_gram
from mstore_lightning.core.families.linear import LinearExtractor

HYPER = {"in_features": 40, "out_features": 30}


def projected_gram(a: torch.Tensor, d: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    proj = {"seed": seed, "k_in": k, "k_out": k}
    p_in, p_out = projection.projection_matrices(proj, "layer", 40, 30)
    a_m, d_m = LinearExtractor.matrices(HYPER, a, d)
    rows = projection.project(a_m.double(), d_m.double(), p_in.double(), p_out.double(), "factors", ["weight"])
    return kron_gram(rows["a"], rows["d"], rows["a"], rows["d"], True, False)


@pytest.mark.parametrize("positions", [1, 6])
def test_projected_inner_products_are_unbiased_with_the_predicted_spread(positions):
    g = torch.Generator().manual_seed(0)
    a, d = torch.randn(3, 1, positions, 40, generator=g), torch.randn(3, 1, positions, 30, generator=g)
    a_m, d_m = LinearExtractor.matrices(HYPER, a, d)
    exact = kron_gram(a_m.double(), d_m.double(), a_m.double(), d_m.double(), True, False)
    norms = exact.diagonal().sqrt()
    k, seeds = 16, 400
    errors = torch.stack([(projected_gram(a, d, s, k) - exact) / torch.outer(norms, norms) for s in range(seeds)])
    # unbiased: the mean error is within 4 standard errors of zero, for norms and cross terms alike
    assert (errors.mean(0).abs() <= 4 * errors.std(0) / seeds**0.5).all()
    # spread: within the rank-one bound (sampling slack of 15% on a 400-draw std)
    assert (errors.std(0) <= 1.15 * projection.predicted_error(k, k)).all()
    if positions == 1:  # rank one: the bound is tight for the squared norm
        assert errors.std(0).diagonal().min() >= 0.7 * projection.predicted_error(k, k)


def test_a_layer_gets_its_own_matrices_and_the_seed_reproduces_them():
    proj = {"seed": 3, "k_in": 4, "k_out": 4}
    one, again = projection.projection_matrices(proj, "fc1", 8, 8), projection.projection_matrices(proj, "fc1", 8, 8)
    other = projection.projection_matrices(proj, "fc2", 8, 8)
    assert torch.equal(one[0], again[0]) and not torch.equal(one[0], other[0])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 4, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
    ref = Reference()
    policies = {
        "exact": {**EXACT, "representation": "factors"},
        "projection": {**EXACT, "representation": "projection", "projection_dim": 8, "projection_seed": 5},
        "pooled": {**EXACT, "pool": {"*conv": 2}},
        "budget": {**EXACT, "budget": {"layer_bytes_per_sample": 2048}},
    }
    caps = [GradientCapture(path / f"{k}.zarr", policy=v) for k, v in policies.items()]
    trainer([ref, *caps], max_epochs=1).fit(Task(Net()), loader(x, y, batch_size=8))
    return {k: open_store(path / f"{k}.zarr") for k in policies}, ref


def test_projection_stores_the_sketch_of_each_gradient_from_its_seed(runs):
    stores, ref = runs
    store = stores["projection"]
    ids = store.sample_ids(0).tolist()
    for layer in store.layers:
        spec = store.layer_spec(layer)
        p = spec["projection"]
        assert spec["representation"] == "projection" and p["seed"] == 5 and max(p["k_in"], p["k_out"]) <= 8
        p_in, p_out = projection.projection_matrices(p, layer, p["dim_in"], p["dim_out"])
        weight = ref.stacked(0, ids, f"{layer}.weight").double()
        grouped = weight.reshape(len(ids), 1, p["dim_out"], p["dim_in"])  # one group; conv kernels flattened
        sketch = p_out.double().T @ grouped @ p_in.double()
        rows = store.factors(0, layer, ids)
        if p["form"] == "full":
            got = rows["weight"].double()
        else:
            got = torch.einsum("bgto,bgti->bgoi", rows["d"].double(), rows["a"].double())
        torch.testing.assert_close(got, sketch, rtol=1e-4, atol=1e-6)
    # the store keeps the seed and sizes, never the matrices
    group = zarr.open_group(store.uri, mode="r")["epochs/00000/r0/layers/net.fc1"]
    assert all(np.prod(arr.shape[1:]) < 8 * 64 for _, arr in group.arrays())


def test_projected_results_are_marked_and_restore_refuses(runs):
    stores, _ = runs
    store = stores["projection"]
    norms = store.norms(0)
    assert set(norms.approximate) == set(store.layers) and "unbiased" in norms.approximate["net.fc1"]
    assert np.asarray(norms).shape == (32,)
    with pytest.raises(StoreReadError, match="cannot be restored"):
        store.restore(0, "net.fc1", [0])
    assert stores["exact"].norms(0).approximate == {}
    assert "approximate: Kronecker projection" in store.describe()


def test_pooled_convolution_is_the_exact_formula_on_block_means(runs):
    stores, _ = runs
    exact, pooled = stores["exact"], stores["pooled"]
    spec = pooled.layer_spec("net.conv")
    assert spec["summary"]["pool"] == 2 and spec["arrays"]["a"]["row_shape"] == [1, 4, 4, 4]
    ids = exact.sample_ids(0)
    f = exact.factors(0, "net.conv", ids)
    blocky = {k: pooling.unpool(pooling.pool(f[k], 2), list(f[k].shape[1:]), 2) for k in ("a", "d")}
    want = ConvExtractor.restore(spec["hyper"], spec["params"], blocky)
    got = pooled.restore(0, "net.conv", ids)
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-6)
    norms = pooled.norms(0, layers=["net.conv"])
    assert "net.conv" in norms.approximate and "net.fc1" not in pooled.norms(0, layers=["net.fc1"]).approximate
    assert pooled.nbytes_stored(0, "net.conv") < exact.nbytes_stored(0, "net.conv")


def test_budget_keeps_exact_layers_that_fit_and_projects_the_rest(runs):
    stores, _ = runs
    store = stores["budget"]
    assert store.layer_spec("net.fc2")["representation"] == "factors"  # 64 + 5 numbers fit
    fc1 = store.layer_spec("net.fc1")
    assert fc1["representation"] == "projection" and fc1["choice"]["bytes_per_sample"] <= 2048
    assert "most accurate within 2,048 B/sample" in fc1["choice"]["reason"]
    assert "why: most accurate within 2,048 B/sample" in store.describe()


def cands(bytes_exact: int = 100_000):
    a, d = torch.randn(1, 1, 512), torch.randn(1, 1, 256)
    hyper = {"in_features": 512, "out_features": 256}
    shapes = {"weight": [256, 512], "bias": [256]}
    return choice.candidates(LinearExtractor, hyper, ["weight", "bias"], shapes, a, d, "fp32", 1, 0)


@settings(max_examples=30, deadline=None)
@given(max_bytes=st.integers(16, 10_000), max_error=st.floats(0.05, 0.95))
def test_budget_rules(max_bytes, max_error):
    cs = cands()
    by_bytes, why = choice.pick(cs, "auto", {"layer_bytes_per_sample": max_bytes}, 64)
    fitting = [c for c in cs if c.nbytes <= max_bytes]
    if fitting:  # the most accurate that fits
        assert by_bytes.nbytes <= max_bytes and by_bytes.error == min(c.error for c in fitting)
    by_error, _ = choice.pick(cs, "auto", {"max_error": max_error}, 64)
    assert by_error.error <= max_error
    assert by_error.nbytes == min(c.nbytes for c in cs if c.error <= max_error)
    both, why = choice.pick(cs, "auto", {"layer_bytes_per_sample": max_bytes, "max_error": max_error}, 64)
    ok = [c for c in cs if c.nbytes <= max_bytes and c.error <= max_error]
    if ok:
        assert both.nbytes == min(c.nbytes for c in ok)
    elif fitting:
        assert "misses" in why


def test_no_budget_keeps_the_smaller_exact_form():
    chosen, why = choice.pick(cands(), "auto", None, 64)
    assert chosen.representation == "factors" and why.startswith("smallest exact form")
