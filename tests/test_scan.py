"""The public scan and the representation objects: each representation round-trips to its spec and its
kernels agree with brute force; stored and recomputed row sources keep one contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import EXACT, IndexedTensors, Task, loader, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_capture_fit import data, mlp

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.core.representation import Factors, Full, PooledFactors, Representation
from mstore_lightning.store.scan import RowSource, StoredRows


def linear_spec(fan_in: int, fan_out: int, bias: bool) -> dict:
    params = ["weight", "bias"] if bias else ["weight"]
    shapes = {"weight": [fan_out, fan_in], "bias": [fan_out]}
    return {
        "name": "fc",
        "kind": "linear",
        "params": params,
        "param_shapes": {p: shapes[p] for p in params},
        "hyper": {"in_features": fan_in, "out_features": fan_out},
        "representation": "factors",
        "arrays": {},
    }


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    m=st.integers(1, 4),
    positions=st.integers(1, 3),
    fan_in=st.integers(1, 6),
    fan_out=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factor_kernels_equal_brute_force_on_restored_gradients(n, m, positions, fan_in, fan_out, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    rep = Representation.from_spec(linear_spec(fan_in, fan_out, bias))
    assert isinstance(rep, Factors) and rep.approximate is None

    def rows(k: int) -> dict:
        a = torch.randn(k, 1, positions, fan_in, generator=gen, dtype=torch.float64)
        return {"a": a, "d": torch.randn(k, 1, positions, fan_out, generator=gen, dtype=torch.float64)}

    x, y = rows(n), rows(m)
    gx, gy = rep.restore(x), rep.restore(y)
    # the per-sample gradient, written out: Σ_t d_t a_tᵀ and Σ_t d_t
    want_w = torch.einsum("buto,buti->boi", x["d"], x["a"])
    torch.testing.assert_close(gx["weight"], want_w)
    if bias:
        torch.testing.assert_close(gx["bias"], x["d"].sum((1, 2)))
    flat_x = torch.cat([gx[p].reshape(n, -1) for p in rep.params], 1)
    flat_y = torch.cat([gy[p].reshape(m, -1) for p in rep.params], 1)
    torch.testing.assert_close(rep.gram(x, y).double(), flat_x @ flat_y.T)
    torch.testing.assert_close(rep.sqnorm(x), (flat_x**2).sum(1))
    total = rep.class_sum(x)
    for p in rep.params:
        torch.testing.assert_close(total[p], gx[p].sum(0))
    sums = {p: gy[p][0] for p in rep.params}
    matrix = rep.class_sum({k: v[:1] for k, v in y.items()}).get("__matrix__")
    torch.testing.assert_close(rep.dot_class(x, sums, matrix), flat_x @ flat_y[0])
    # a full representation of the same gradients answers the same
    full = Representation.from_spec({**linear_spec(fan_in, fan_out, bias), "representation": "full"})
    assert isinstance(full, Full)
    torch.testing.assert_close(full.gram(gx, gy).double(), flat_x @ flat_y.T)
    torch.testing.assert_close(full.sqnorm(gx), (flat_x**2).sum(1))


def test_every_representation_round_trips_to_the_spec_in_the_store(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=16)
    policies = {
        "exact": EXACT,
        "full": {**EXACT, "representation": "full"},
        "projected": {"representation": "projection", "projection_dim": 4},
    }
    for name, policy in policies.items():
        trainer([GradientCapture(tmp_path / f"{name}.zarr", policy=policy)]).fit(Task(mlp()), loader(x, y))
        store = open_store(tmp_path / f"{name}.zarr")
        for layer in store.layers:
            spec = store.layer_spec(layer)
            rep = Representation.from_spec(spec)
            assert rep.to_spec() == {k: spec[k] for k in rep.to_spec()}
            assert Representation.from_spec({**spec, **rep.to_spec()}) == rep
            assert [s.name for s in rep.stored if s.role == "part"][0] == next(iter(spec["arrays"]))
    pooled = {
        **linear_spec(3, 2, False),
        "kind": "conv",
        "summary": {"pool": 2, "a_shape": [1, 3, 4], "d_shape": [1, 2, 4]},
    }
    rep = Representation.from_spec(pooled)
    assert isinstance(rep, PooledFactors) and "pooled 2x" in rep.approximate
    assert Representation.from_spec(rep.to_spec()) == rep


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """The same frozen run stored whole, and with one layer recomputed from the epoch's weights."""
    path = tmp_path_factory.mktemp("scan")
    torch.manual_seed(0)
    x, y = data(n=30)
    caps = [
        GradientCapture(path / "stored.zarr", policy=EXACT, chunk_bytes=1024),
        GradientCapture(path / "recomputed.zarr", policy={**EXACT, "recompute": {"layers": ["net.2"]}}),
    ]
    trainer(caps).fit(Task(mlp(), lr=0.0), loader(x, y, batch_size=8))
    stored, recomputed = open_store(path / "stored.zarr"), open_store(path / "recomputed.zarr")
    recomputed.attach_recompute(Task(mlp()), IndexedTensors(x, y), batch_size=7)
    return stored, recomputed


@pytest.mark.parametrize("which", ["stored", "recomputed"])
def test_both_row_sources_keep_the_contract(two_sources, which):
    stored, other = two_sources
    store = stored if which == "stored" else other
    src = store.scan.source(0, "net.2")
    assert isinstance(src, RowSource) and isinstance(src, StoredRows) == (which == "stored")
    n = len(src)
    assert n == len(store.sample_ids(0)) == 30
    seen, last = [], -1
    for block in src.blocks():
        assert block.first > last
        last = block.first
        rows = block.load()
        assert all(v.shape[0] == block.rows for v in rows.values())
        seen.extend(range(block.first, block.first + block.rows))
    assert seen == list(range(n))  # every row once, in order
    for lo, hi in ((0, 1), (3, 17), (29, 30)):
        covered = [r for b in src.blocks(lo, hi) for r in range(b.first, b.first + b.rows)]
        assert set(range(lo, hi)) <= set(covered)
    picks = np.array([17, 2, 29, 2])
    whole = {k: torch.cat([b.load()[k] for b in src.blocks()]) for k in src.gather(picks)}
    for k, v in src.gather(picks).items():
        torch.testing.assert_close(v, whole[k][torch.from_numpy(picks)])
    reference = stored.scan.source(0, "net.2").gather(picks)  # the weights never moved: same rows
    for k, v in src.gather(picks).items():
        torch.testing.assert_close(v, reference[k], rtol=1e-4, atol=1e-6)
    assert len(src.chunks()) >= 1 and sum(c.hi - c.lo for c in src.chunks()) == n
    ok, why = store.scan.portable(0, "net.2")
    assert ok == (which == "stored") and (ok or "without a Dask client" in why)
    assert ("recomputed" in store.scan.approximate(0, None).get("net.2", "")) == (which == "recomputed")
