"""The Dask path on a real distributed.LocalCluster: the local engine's results, and torch.func's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from test_capture_fit import data, mlp
from test_query import QueryReference
from torch import nn

from mstore_lightning import GradientCapture, open_store

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
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
    assert len(store.scan.source(1, "net.0").chunks()) >= 3  # several tasks per layer
    np.testing.assert_allclose(store.norms(1, client=client), store.norms(1), rtol=1e-12)
    # on the stored factors, one task per chunk (the kept norms are one small array, read locally)
    np.testing.assert_allclose(
        store.norms(1, client=client, kept=False), store.norms(1, kept=False), rtol=1e-12
    )
    # float32 kernels over other blocks of rows: equal up to float32 rounding
    np.testing.assert_allclose(
        store.dot(1, ids[:3], ids, client=client), store.dot(1, ids[:3], ids), rtol=1e-5, atol=1e-7
    )
    local, remote = store.self_influence(), store.self_influence(client=client)
    np.testing.assert_array_equal(remote.ids, local.ids)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-12)
    np.testing.assert_allclose(
        store.tracin(ids[:2], client=client).scores, store.tracin(ids[:2]).scores, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(store.topk(ids[:2], 5, client=client).ids, store.topk(ids[:2], 5).ids)


class HalvingTask(Task):
    """SGD whose learning rate halves each epoch, so every epoch's ``lr_e`` weighs differently."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def query_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask_query") / "s.zarr"
    torch.manual_seed(0)
    (x, y), (qx, qy) = sequences(40, 0), sequences(6, 1)
    ref, qref = Reference(), QueryReference(qx, qy)
    # A Linear over 3 positions (the T > 1 kernels), queries captured at each epoch's end, lossless
    cap = GradientCapture(
        path,
        policy={**EXACT, "representation": "factors"},
        chunk_bytes=512,
        query=loader(qx, qy, batch_size=4, shuffle=False),
    )
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
    trainer([ref, cap, qref], max_epochs=2).fit(HalvingTask(net), loader(x, y))
    return open_store(path), ref, qref


def flat(grads, names):
    return torch.cat([grads[n].flatten(1) for n in names], 1).double()


def test_influence_and_topk_on_query_rows_match_torch_func(query_run, client):
    store, ref, qref = query_run
    assert store.lr(0) == 2 * store.lr(1)
    assert store.has_queries(1) and len(store.scan.source(1, "net.0", "query").chunks()) >= 2
    assert len(store.scan.source(1, "net.0").chunks()) >= 3  # several tasks per layer
    ids, qids = np.arange(40), np.arange(6)
    names = sorted(ref.grads[0][0])
    train = {
        e: torch.cat([ref.stacked(e, ids.tolist(), n).flatten(1) for n in names], 1).double() for e in (0, 1)
    }
    query = {e: flat(qref.grads[e], names) for e in (0, 1)}

    got = store.self_influence(client=client)
    np.testing.assert_array_equal(got.ids, ids)
    want = sum(store.lr(e) * train[e].pow(2).sum(1) for e in (0, 1))
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-4)

    got = store.tracin(qids, client=client)
    want = sum(store.lr(e) * query[e] @ train[e].T for e in (0, 1))
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-4, atol=1e-6 * want.abs().max().item())

    np.testing.assert_allclose(
        store.norms(1, split="query", client=client), query[1].norm(dim=1).numpy(), rtol=1e-5
    )
    top = store.topk(qids[:3], 5, client=client)  # the last epoch's query rows, by cosine
    cos = nn.functional.normalize(query[1][:3], dim=1) @ nn.functional.normalize(train[1], dim=1).T
    best = torch.argsort(cos, dim=1, descending=True)[:, :5]
    np.testing.assert_array_equal(top.ids, ids[best.numpy()])
    np.testing.assert_allclose(top.scores, torch.gather(cos, 1, best).numpy(), rtol=1e-4)
