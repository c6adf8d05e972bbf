"""Stores written by an earlier library (schema version 1, ``tests/fixtures/store_v1``) still open,
verify, and answer every query as that library did, and as torch.func per-sample gradients say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mstore_lightning import open_store
from mstore_lightning.store.verify import verify

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
PROBE = [0, 5, 9, 31]
QUERIES = [1, 30]


@pytest.fixture(params=["fp32", "int8"])
def written(request, tmp_path):
    # A copy: reading must not need to write, but a test must never be able to change the fixture.
    shutil.copytree(FIXTURE / f"{request.param}.zarr", tmp_path / "s.zarr")
    return request.param, tmp_path / "s.zarr", EXPECTED[request.param]


def test_an_earlier_store_verifies_and_lists_what_it_held(written):
    _, path, want = written
    assert verify(str(path)).ok
    store = open_store(path)
    assert store.layers == want["layers"] and store.epochs == want["epochs"]


def test_an_earlier_store_answers_every_query_as_the_library_that_wrote_it(written):
    _, path, want = written
    store = open_store(path)
    for e in store.epochs:
        got, old = store, want["by_epoch"][str(e)]
        ids = got.sample_ids(e)
        assert ids.tolist() == old["ids"]
        np.testing.assert_allclose(np.asarray(got.norms(e)), old["norms"], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got.norms(e, kept=False)), old["norms_from_rows"], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got.dot(e, PROBE, ids)), old["dot"], rtol=1e-5, atol=1e-9)
        for layer, params in old["restore"].items():
            for p, values in got.restore(e, layer, PROBE).items():
                np.testing.assert_allclose(values.numpy(), params[p], rtol=1e-6, atol=1e-9)
    si = store.self_influence()
    assert si.ids.tolist() == want["self_influence"]["ids"]
    np.testing.assert_allclose(si.scores, want["self_influence"]["scores"], rtol=1e-6)
    tr = store.tracin(QUERIES)
    np.testing.assert_allclose(tr.scores, want["tracin"]["scores"], rtol=1e-5, atol=1e-9)
    nb = store.topk(QUERIES, k=4)
    assert nb.ids.tolist() == want["topk"]["ids"]
    np.testing.assert_allclose(nb.scores, want["topk"]["scores"], rtol=1e-5)


def test_an_earlier_fp32_store_restores_torch_func_per_sample_gradients(tmp_path):
    store = open_store(FIXTURE / "fp32.zarr")
    reference = EXPECTED["fp32"]["torch_func"]
    for e in store.epochs:
        for layer in store.layers:
            for p, values in store.restore(e, layer, PROBE).items():
                want = torch.tensor(reference[str(e)][f"{layer}.{p}"])
                torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-6)
