"""Cosine, outliers and clustering against brute force on torch.func per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from test_capture_fit import mlp


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three groups of near-identical samples, one label each, and one sample scaled up 50x."""
    path = tmp_path_factory.mktemp("geometry")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    protos = torch.randn(3, 6, generator=g) * 2
    group = torch.arange(36) % 3
    x = protos[group] + 0.01 * torch.randn(36, 6, generator=g)
    y = group.clone()
    x[35] *= 50  # an outlier
    ref = Reference()
    trainer([ref, GradientCapture(path / "s.zarr", policy=EXACT)], max_epochs=1).fit(
        Task(mlp(), lr=0.0), loader(x, y, batch_size=12)  # frozen: a group shares one gradient
    )
    return open_store(path / "s.zarr"), ref, group.numpy()


def flat(ref, ids):
    names = sorted(ref.grads[0][ids[0]])
    return torch.cat([ref.stacked(0, ids, n).flatten(1) for n in names], 1).double()


def test_cosine_equals_brute_force(run):
    store, ref, _ = run
    ids = list(range(36))
    g = flat(ref, ids)
    want = torch.nn.functional.cosine_similarity(g[:5, None], g[None], dim=-1)
    np.testing.assert_allclose(store.cosine(0, ids[:5], ids), want.numpy(), rtol=1e-4, atol=1e-6)


def test_outliers_flag_the_scaled_sample(run):
    store, ref, _ = run
    ids = store.sample_ids(0)
    norms = flat(ref, ids.tolist()).norm(dim=1).log().numpy()
    z = 0.6745 * (norms - np.median(norms)) / np.median(np.abs(norms - np.median(norms)))
    got = store.outliers(0)
    np.testing.assert_allclose(got.scores, z, rtol=1e-4, atol=1e-4)
    assert got.flagged[0] == 35 and set(got.flagged) == set(ids[z > 3.5])


def test_cluster_recovers_the_groups_and_reports_its_sketch_error(run):
    store, _, group = run
    got = store.cluster(0, k=4, dim=16, layers=["net.0", "net.2"])  # three groups and the outlier
    ids = got.ids
    keep = ids != 35
    labels, truth = got.labels[keep], group[ids[keep]]
    assert all(len(set(labels[truth == c])) == 1 for c in range(3))
    assert len({labels[truth == c][0] for c in range(3)} | {got.labels[~keep][0]}) == 4
    assert got.sizes.sum() == 36 and got.sketch_dim == 8 * 6 + 8 + 3 * 8 + 3  # both layers capped at their sizes
    coarse = store.cluster(0, k=4, dim=2)
    assert coarse.predicted_error > got.predicted_error
    assert 0 <= got.measured_error < coarse.measured_error


def test_geometry_results_convert_to_pandas(run):
    store, _, _ = run
    out = store.outliers(0).to_pandas()
    assert out.loc[out["id"] == 35, "flagged"].item() and out["flagged"].sum() == len(store.outliers(0).flagged)
    clusters = store.cluster(0, k=4).to_pandas()
    assert list(clusters.columns) == ["id", "cluster"] and clusters["cluster"].nunique() == 4
