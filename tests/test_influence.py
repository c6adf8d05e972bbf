"""Self-influence, TracIn and top-k against brute force on torch.func per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from mstore_lightning.analytics import influence, kernels, ranking
from test_capture_fit import data, mlp


class DecayingTask(Task):
    """Halves the learning rate every epoch, so each epoch's lr weight differs."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("influence")
    torch.manual_seed(0)
    x, y = data(n=30)
    ref = Reference()
    caps = [GradientCapture(path / "fp32.zarr", policy=EXACT), GradientCapture(path / "int8.zarr")]
    trainer([ref, *caps], max_epochs=3).fit(DecayingTask(mlp()), loader(x, y, batch_size=8))
    return open_store(path / "fp32.zarr"), open_store(path / "int8.zarr"), ref


def flat(ref: Reference, epoch: int, ids: list[int]) -> torch.Tensor:
    names = sorted(ref.grads[epoch][ids[0]])
    return torch.cat([ref.stacked(epoch, ids, n).flatten(1) for n in names], 1).double()


def test_lr_is_recorded_per_epoch(run):
    store, _, _ = run
    assert [store.lr(e) for e in store.epochs] == pytest.approx([0.1, 0.05, 0.025])


def test_self_influence_and_tracin_equal_brute_force(run):
    store, _, ref = run
    ids = list(range(30))
    want_self = sum(store.lr(e) * flat(ref, e, ids).pow(2).sum(1) for e in store.epochs)
    got = store.self_influence()
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_allclose(got.scores, want_self.numpy(), rtol=1e-4)
    queries = [3, 17, 29]
    want = sum(store.lr(e) * flat(ref, e, queries) @ flat(ref, e, ids).T for e in store.epochs)
    got = store.tracin(queries)
    assert got.scores.shape == (3, 30)
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-4, atol=1e-9)
    one = store.tracin(queries, epochs=[1], layers=["net.2"])
    w = (
        store.lr(1)
        * ref.stacked(1, queries, "net.2.weight").flatten(1).double()
        @ ref.stacked(1, ids, "net.2.weight").flatten(1).double().T
    )
    w += (
        store.lr(1)
        * ref.stacked(1, queries, "net.2.bias").double()
        @ ref.stacked(1, ids, "net.2.bias").double().T
    )
    np.testing.assert_allclose(one.scores, w.numpy(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_topk_equals_a_full_sort(run, metric):
    store, _, ref = run
    ids = list(range(30))
    g = flat(ref, 2, ids)
    scores = g[[4, 9]] @ g.T
    if metric == "cosine":
        scores = scores / torch.outer(g[[4, 9]].norm(dim=1), g.norm(dim=1))
    got = store.topk([4, 9], k=5, metric=metric)
    want = torch.argsort(scores, dim=1, descending=True)[:, :5]
    np.testing.assert_array_equal(got.ids, want.numpy())
    np.testing.assert_allclose(got.scores, torch.gather(scores, 1, want).numpy(), rtol=1e-4)
    if metric == "cosine":
        assert got.ids[0, 0] == 4 and got.scores[0, 0] == pytest.approx(1.0)


def test_int8_self_influence_stays_close(run):
    exact, store, _ = run
    a, b = exact.self_influence().scores, store.self_influence().scores
    assert np.max(np.abs(b - a) / a) < 0.02
    assert np.corrcoef(a, b)[0, 1] > 0.9999


def test_topk_rejects_bad_arguments(run):
    store, _, _ = run
    with pytest.raises(ValueError, match="`metric` can be 'cosine' or 'dot'; got 'l2'"):
        store.topk([1], 3, metric="l2")
    with pytest.raises(ValueError, match="`k` must be an integer >= 1, got 0"):
        store.topk([1], 0)


def test_results_convert_to_pandas_keyed_by_sample_id(run):
    store, _, _ = run
    si = store.self_influence()
    df = si.to_pandas()
    assert list(df.columns) == ["id", "score"] and df["id"].tolist() == si.ids.tolist()
    tr = store.tracin([3, 17]).to_pandas()
    assert list(tr.columns) == ["id", "query_0", "query_1"] and len(tr) == 30
    nb = store.topk([3, 17], k=4)
    long = nb.to_pandas()
    assert len(long) == 8 and long[long["query"] == 1]["id"].tolist() == nb.ids[1].tolist()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_scan_over_more_ids_than_a_block_equals_brute_force_and_fills_the_cache(tmp_path, precision):
    # More ids than one block: dot streams whole chunks, read on this thread and decoded by the
    # scan's workers. Out of order, with rows left out, so some chunks are taken only in part.
    torch.manual_seed(0)
    n = 1300
    x, y = data(n=n)
    ref = Reference()
    capture = GradientCapture(tmp_path / "s.zarr", policy={"precision": precision}, chunk_bytes=8192)
    trainer([ref, capture], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=64))
    ids = np.random.default_rng(0).permutation(n)[:1200]
    queries = [7, 900]
    plain = open_store(tmp_path / "s.zarr")
    got = np.asarray(plain.dot(0, queries, ids))
    if precision == "fp32":
        want = (flat(ref, 0, queries) @ flat(ref, 0, ids.tolist()).T).numpy()
        # An id asked twice in place of its neighbour: the chunk has as many rows asked as it holds,
        # but not each once, so it is taken row by row.
        all_ids = np.asarray(plain.sample_ids(0))
        twice = np.concatenate([all_ids[:1], all_ids[:1], all_ids[2:]])
        np.testing.assert_allclose(
            np.asarray(plain.dot(0, queries, twice)),
            (flat(ref, 0, queries) @ flat(ref, 0, twice.tolist()).T).numpy(),
            rtol=1e-4,
            atol=1e-6 * np.abs(want).max(),
        )
    else:  # the same decoded rows, gathered a block at a time instead of streamed
        want = np.concatenate([np.asarray(plain.dot(0, queries, ids[lo : lo + 600])) for lo in (0, 600)], 1)
    # float32 sums: near-cancelling entries are held to the matrix's scale, not their own.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())

    cached = open_store(tmp_path / "s.zarr", cache_bytes=1 << 28)
    first = np.asarray(cached.dot(0, queries, ids))  # its workers offer every decoded chunk
    reads = cached.scan.reader.reads  # batches of zarr reads so far
    again = np.asarray(cached.dot(0, queries, ids))
    assert cached.scan.reader.reads == reads
    np.testing.assert_array_equal(first, got)
    np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize(("queries", "in_stream"), [([3, 411], True), ([0, 150, 300, 450, 600, 699], False)])
def test_topk_takes_training_queries_from_the_blocks_it_scans(tmp_path, monkeypatch, queries, in_stream):
    # Queries lying in a few chunks a layer are taken from the blocks the scan reads anyway (no read
    # of their own); spread over more chunks, they are gathered first. Both equal brute force.
    torch.manual_seed(0)
    x, y = data(n=700)
    ref = Reference()
    capture = GradientCapture(tmp_path / "s.zarr", policy=EXACT, chunk_bytes=4096)
    trainer([ref, capture], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=64))
    store = open_store(tmp_path / "s.zarr")
    assert all(len(store.scan.source(0, layer).chunks()) > kernels.QUERY_BLOCKS for layer in store.layers)
    gathered = []
    gather_rows = kernels.gather_rows
    monkeypatch.setattr(
        kernels, "gather_rows", lambda *a, **kw: gathered.append(a[2]) or gather_rows(*a, **kw)
    )
    got = store.topk(queries, k=700, metric="dot")
    assert (gathered == []) == in_stream, gathered
    ids = np.asarray(store.sample_ids(0))
    scores = (flat(ref, 0, queries) @ flat(ref, 0, ids.tolist()).T).numpy()
    best = np.argsort(-scores, axis=1, kind="stable")
    np.testing.assert_allclose(got.scores, np.take_along_axis(scores, best, 1), rtol=1e-4, atol=1e-7)
    where = {int(i): r for r, i in enumerate(ids)}
    for q in range(len(queries)):  # each id with its own score (near-ties may swap places)
        brute = scores[q, [where[int(i)] for i in got.ids[q]]]
        np.testing.assert_allclose(np.asarray(got.scores)[q], brute, rtol=1e-4, atol=1e-7)


def test_topk_on_an_int8_store_multiplies_codes_and_agrees_with_decoded_rows(tmp_path, monkeypatch):
    # Linear layers stored as int8 factors are scored on their codes (exact integer products,
    # scaled after), cached as codes where there is a cache; dot() on decoded floats agrees.
    from mstore_lightning.core.families import kron

    assert kron.int_matmul()  # the pinned torch multiplies int8 matrices on the CPU
    torch.manual_seed(0)
    x, y = data(n=300)
    capture = GradientCapture(tmp_path / "s.zarr", policy={"precision": "int8"}, chunk_bytes=4096)
    trainer([capture], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=64))
    calls = []
    on_codes = kron.kron_gram_codes
    monkeypatch.setattr(kron, "kron_gram_codes", lambda *a: calls.append(1) or on_codes(*a))
    queries = [3, 150, 299]
    for cache_bytes, decoded_first in ((0, False), (1 << 26, False), (1 << 26, True)):
        store = open_store(tmp_path / "s.zarr", cache_bytes=cache_bytes)
        if decoded_first:  # some chunks cached as floats (queries' among them), the rest as codes
            store.dot(0, [3, 150], [0])
        calls.clear()
        got = store.topk(queries, k=300, metric="dot")
        # The codes path ran; queries taken partly from float chunks make their layers' Grams float.
        assert bool(calls) != decoded_first
        again = store.topk(queries, k=300, metric="dot")  # from the cache, where there is one
        np.testing.assert_array_equal(again.scores, got.scores)
        ids = np.asarray(store.sample_ids(0))
        want = np.asarray(store.dot(0, queries, ids))  # gathered rows, decoded to float32
        where = {int(i): r for r, i in enumerate(ids)}
        for q in range(len(queries)):
            floats = want[q, [where[int(i)] for i in got.ids[q]]]
            np.testing.assert_allclose(
                np.asarray(got.scores)[q], floats, rtol=1e-5, atol=1e-6 * np.abs(want).max()
            )


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_topk_scores_a_window_of_rows_at_a_time_and_equals_brute_force(tmp_path, monkeypatch, metric):
    torch.manual_seed(0)
    n, k = 700, 5
    x, y = data(n=n)
    ref = Reference()
    capture = GradientCapture(tmp_path / "s.zarr", policy=EXACT, chunk_bytes=4096)
    trainer([ref, capture], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=64))
    store = open_store(tmp_path / "s.zarr")
    queries = [3, 411]
    # 96 rows of scores for two queries at once: windows that cut through chunks
    monkeypatch.setattr(influence, "SCORE_BYTES", 8 * 2 * 96)
    widths = []
    windows = kernels.dot_windows

    def spying(*args, **kwargs):
        for first, block in windows(*args, **kwargs):
            widths.append(block.shape[1])
            yield first, block

    monkeypatch.setattr(kernels, "dot_windows", spying)
    got = store.topk(queries, k=k, metric=metric)
    assert max(widths) == 96 and sum(widths) == n  # every row scored, never more than a window at once
    ids = np.asarray(store.sample_ids(0))
    g = flat(ref, 0, ids.tolist())
    scores = (flat(ref, 0, queries) @ g.T).numpy()
    if metric == "cosine":
        scores /= np.outer(flat(ref, 0, queries).norm(dim=1), g.norm(dim=1))
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got.ids, ids[best])
    np.testing.assert_allclose(got.scores, np.take_along_axis(scores, best, 1), rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    queries=st.integers(1, 4),
    n=st.integers(1, 60),
    k=st.integers(1, 12),
    pieces=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_merging_best_candidates_in_any_split_and_order_equals_one_sort(queries, n, k, pieces, seed):
    # Few distinct values and some NaNs: ties at the cut, broken by the lower row, NaN last.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(queries, n)).astype(np.float64)
    scores[rng.random((queries, n)) < 0.1] = np.nan
    rows = np.arange(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(pieces - 1, n - 1), replace=False)) if n > 1 else []
    parts = list(zip(np.split(scores, cuts, axis=1), np.split(rows, cuts)))
    rng.shuffle(parts)
    best_s, best_r = np.zeros((queries, 0)), np.zeros((queries, 0), dtype=np.int64)
    for s, r in parts:
        best_s, best_r = ranking.merge_best(best_s, best_r, s, r, k)
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    want = np.stack([np.lexsort((rows, -keyed[q]))[:k] for q in range(queries)])
    np.testing.assert_array_equal(best_r, want)
    np.testing.assert_array_equal(best_s, np.take_along_axis(scores, want, 1))


def test_a_store_with_a_chunk_cache_answers_from_it_exactly_as_one_without(tmp_path):
    # Small chunks, so a query's rows sit in several chunks; after one scan fills the cache, later
    # queries (their own rows included) are answered from it without reading the store again.
    torch.manual_seed(0)
    x, y = data(n=40)
    capture = GradientCapture(tmp_path / "s.zarr", chunk_bytes=1024)
    trainer([capture], max_epochs=1).fit(Task(mlp()), loader(x, y, batch_size=8))
    plain = open_store(tmp_path / "s.zarr")
    cached = open_store(tmp_path / "s.zarr", cache_bytes=1 << 26)
    cached.topk([5], k=3, metric="dot")  # fills the cache
    before = plain.scan.reader.reads  # every read of stored rows counts one
    plain.dot(0, [5], [6])
    assert plain.scan.reader.reads > before  # the counter sees the reads of a store without a cache
    reads = cached.scan.reader.reads
    queries = [33, 2, 19, 2, 38]  # out of order, across chunks, one repeated
    got = cached.topk(queries, k=4, metric="dot")
    dots = cached.dot(0, queries, list(range(40)))
    assert cached.scan.reader.reads == reads
    want = plain.topk(queries, k=4, metric="dot")
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(dots, plain.dot(0, queries, list(range(40))))
