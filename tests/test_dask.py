"""The Dask path on a real distributed.LocalCluster gives the local engine's results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from test_capture_fit import data, mlp

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask") / "s.zarr"
    torch.manual_seed(0)
    x, y = data(n=64)
    # int8 with deduplication and small chunks: many tasks, references across epochs, scales
    trainer([GradientCapture(path, chunk_bytes=512)], max_epochs=2).fit(Task(mlp()), loader(x, y))
    return open_store(path)


def test_norms_dot_and_influence_match_the_local_engine(store, client):
    ids = store.sample_ids(1)
    assert store.dedup_stats(1)["net.0/a"]["duplicates"] == 64
    assert len(store._chunks(1, store._layer("net.0"))) >= 3  # several tasks per layer
    np.testing.assert_allclose(store.norms(1, client=client), store.norms(1), rtol=1e-12)
    # float32 kernels over other blocks of rows: equal up to float32 rounding
    np.testing.assert_allclose(store.dot(1, ids[:3], ids, client=client), store.dot(1, ids[:3], ids), rtol=1e-5, atol=1e-7)
    local, remote = store.self_influence(), store.self_influence(client=client)
    np.testing.assert_array_equal(remote.ids, local.ids)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-12)
    np.testing.assert_allclose(store.tracin(ids[:2], client=client).scores, store.tracin(ids[:2]).scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(store.topk(ids[:2], 5, client=client).ids, store.topk(ids[:2], 5).ids)
