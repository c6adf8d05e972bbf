"""What ``verify`` passes, every read can use: over hypothesis-drawn damage of one file, either
``verify`` reports damage, or every public read answers exactly as on the undamaged store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.utils.data import DataLoader, Subset

from helpers import IndexedTensors, Task, loader, trainer
from mstore_lightning import GradientCapture, StoreReadError, open_store
from mstore_lightning.store.verify import verify
from test_capture_fit import data, mlp
from test_corruption import DAMAGES, damage

QUERIES = [2, 13]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """int8 with the input rows deduplicated (the same data every epoch), and query rows."""
    path = tmp_path_factory.mktemp("clean") / "s.zarr"
    torch.manual_seed(0)
    x, y = data(n=20)
    queries = DataLoader(Subset(IndexedTensors(x, y), QUERIES), batch_size=2)
    cap = GradientCapture(path, policy={"precision": "int8"}, chunk_bytes=256, query=queries)
    trainer([cap], max_epochs=2).fit(Task(mlp()), loader(x, y, batch_size=5, shuffle=False))
    assert verify(str(path)).ok
    return path, reads(path)


def reads(path: Path) -> dict:
    """Every public read a user makes of the store, each through a freshly opened store."""
    store = open_store(path)
    out: dict = {"epochs": list(store.epochs), "layers": store.layers}
    for e in store.epochs:
        ids = store.sample_ids(e)
        out[e] = {
            "ids": ids.tolist(),
            "fields": {f: store.row_field(e, f).tolist() for f in ("step", "label", "loss", "lr")},
            "lr": store.lr(e),
            "norms": np.asarray(store.norms(e)).tolist(),
            "norms_from_rows": np.asarray(store.norms(e, kept=False)).tolist(),
            "query_ids": store.sample_ids(e, "query").tolist(),
            "query_norms": np.asarray(store.norms(e, split="query")).tolist(),
            "restore": {
                layer: {k: v.tolist() for k, v in store.restore(e, layer, ids).items()}
                for layer in store.layers
            },
        }
    si = store.self_influence()
    out["self_influence"] = (si.ids.tolist(), si.scores.tolist())
    tr = store.tracin(QUERIES)
    out["tracin"] = (tr.ids.tolist(), tr.scores.tolist())
    return out


def check_one(clean, tmp_path_factory, pick, how, at, value):
    path, expected = clean
    root = Path(shutil.copytree(path, tmp_path_factory.mktemp("damaged") / "s.zarr"))
    where = damage(root, pick, how, at, value)
    try:
        report = verify(str(root))
    except StoreReadError:
        return  # no store at all, said plainly
    if not report.ok:
        return
    try:
        got = reads(root)
    except StoreReadError as exc:
        raise AssertionError(f"verify passed the store after {how} of {where}, but a read fails: {exc}")
    assert got == expected, f"verify passed the store after {how} of {where}, but a read changed"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DAMAGES)
def test_a_store_verify_passes_reads_as_before(clean, tmp_path_factory, pick, how, at, value):
    check_one(clean, tmp_path_factory, pick, how, at, value)


@pytest.mark.slow
@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DAMAGES)
def test_a_store_verify_passes_reads_as_before_over_many_damages(
    clean, tmp_path_factory, pick, how, at, value
):
    check_one(clean, tmp_path_factory, pick, how, at, value)


@pytest.mark.parametrize("target", ["rows/sqnorm", "layers/net.0/a_ref"])
def test_a_deleted_chunk_that_reads_need_is_damage(clean, tmp_path, target):
    path, _ = clean
    root = Path(shutil.copytree(path, tmp_path / "s.zarr"))
    chunk = root / "epochs" / "00001" / "r0" / target / "c" / "0" / "0"
    if not chunk.exists():
        chunk = next((root / "epochs" / "00001" / "r0" / target / "c").rglob("*"))
    chunk.unlink()
    report = verify(str(root))
    assert not report.ok
    assert any(target in p.array for p in report.problems), report.summary()
