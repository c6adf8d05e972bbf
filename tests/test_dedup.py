"""Deduplication of input rows: hits, misses, forced hash collisions, budget, and exact reads through references."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, IncompatibleStoreError, open_store
from mstore_lightning.store.dedup import RowIndex
from test_capture_fit import assert_matches_reference, data, mlp


def weak_hash(data: bytes) -> bytes:
    return b"same"  # every row collides: only the byte check tells rows apart


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.binary(min_size=3, max_size=3), min_size=1, max_size=30),
    weak=st.booleans(),
    cuts=st.lists(st.integers(1, 29), max_size=3),
)
def test_references_point_to_the_first_identical_row(rows, weak, cuts):
    index = RowIndex(hash_fn=weak_hash) if weak else RowIndex()
    arr = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 3)
    bounds = sorted({0, len(rows), *[c for c in cuts if c < len(rows)]})  # rows arrive in several batches
    refs = np.concatenate(
        [
            index.deduplicate("layer/a", arr[a:b], epoch=2, rank=1, first_row=100 + a)
            for a, b in zip(bounds, bounds[1:])
        ]
    )
    for i, row in enumerate(rows):
        first = rows.index(row)
        expected = [-1, -1, -1] if first == i else [2, 1, 100 + first]
        assert refs[i].tolist() == expected
    stats = index.take_stats()["arrays"]["layer/a"]
    assert stats["duplicates"] == len(rows) - len(set(rows))
    assert stats["bytes_saved"] == 3 * stats["duplicates"]
    distinct: list[bytes] = []
    compared = 0  # under the weak hash, every distinct row met before the match (or all of them) collides
    for row in rows:
        compared += distinct.index(row) if row in distinct else len(distinct)
        distinct += [] if row in distinct else [row]
    assert stats["collisions"] == (compared if weak else 0)


def test_budget_bounds_the_index_and_later_rows_are_stored_in_full():
    index = RowIndex(budget_bytes=8)
    arr = np.arange(6, dtype=np.uint8).reshape(3, 2).repeat(2, axis=0)  # rows 0,0,1,1,2,2 of 2 bytes
    refs = index.deduplicate("k", arr[:4], epoch=0, rank=0, first_row=0)
    assert refs[:, 2].tolist() == [-1, 0, -1, 2]
    index.budget_bytes = 4  # full: the index holds two rows; a batch still finds its own repeats
    refs = index.deduplicate("k", arr[4:], epoch=0, rank=0, first_row=4)
    assert refs[:, 2].tolist() == [-1, 4] and index.held_bytes == 4
    assert index.deduplicate("k", arr[4:5], epoch=1, rank=0, first_row=0)[:, 2].tolist() == [-1]
    assert index.deduplicate("k", arr[:1], epoch=1, rank=0, first_row=0)[:, 2].tolist() == [0]


class WeakenHash(L.Callback):
    """Gives the capture's dedup index a hash under which every row collides."""

    def __init__(self, capture: GradientCapture) -> None:
        self.capture = capture

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.capture.recorder.dedup.hash_fn = weak_hash


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("collide", [False, True])
def test_first_layer_input_of_a_later_epoch_is_stored_as_references(tmp_path, shuffle, collide):
    torch.manual_seed(0)
    x, y = data(n=40)
    ref, cap = Reference(), GradientCapture(tmp_path / "s.zarr", policy=EXACT, chunk_bytes=256)
    callbacks = [ref, cap] + ([WeakenHash(cap)] if collide else [])
    trainer(callbacks, max_epochs=2).fit(Task(mlp()), loader(x, y, batch_size=8, shuffle=shuffle))
    store = open_store(tmp_path / "s.zarr")
    assert_matches_reference(store, ref)
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    refs = {e: root[f"epochs/{e:05d}/r0/layers/net.0/a_ref"][:] for e in (0, 1)}
    assert (refs[0] == -1).all()
    ids0, ids1 = store.sample_ids(0), store.sample_ids(1)
    # every row of epoch 1 points at the epoch-0 row of the same sample
    assert (refs[1][:, 0] == 0).all() and (ids0[refs[1][:, 2]] == ids1).all()
    assert "net.2/a" not in store.dedup_stats(1) or store.dedup_stats(1)["net.2/a"]["duplicates"] == 0
    stats = store.dedup_stats(1)["net.0/a"]
    assert stats["duplicates"] == 40 and stats["bytes_saved"] == 40 * 6 * 4
    assert (stats["collisions"] > 0) == collide
    # a chunk of nothing but references is not written at all
    chunk_dir = tmp_path / "s.zarr" / "epochs" / "00001" / "r0" / "layers" / "net.0" / "a" / "c"
    assert not chunk_dir.exists() or not any(files for _, _, files in os.walk(chunk_dir))
    assert store.nbytes_stored(1, "net.0") < store.nbytes_stored(0, "net.0")
    assert "dedup stored 40 input rows as references" in store.describe()


def test_inputs_after_a_frozen_layer_and_repeated_samples_are_deduplicated(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=16)
    x[8:], y[8:] = x[:8], y[:8]  # samples 8..15 repeat 0..7 within the epoch
    net = mlp()
    net[0].requires_grad_(False)
    ref = Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)], max_epochs=2).fit(
        Task(net), loader(x, y, shuffle=False)
    )
    store = open_store(tmp_path / "s.zarr")
    assert store.layers == ["net.2"]
    assert store.dedup_stats(0)["net.2/a"]["duplicates"] == 8
    assert store.dedup_stats(1)["net.2/a"]["duplicates"] == 16
    assert_matches_reference(store, ref)


def test_dedup_off_stores_every_row(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=16)
    trainer([GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "dedup": False})], max_epochs=2).fit(
        Task(mlp()), loader(x, y)
    )
    store = open_store(tmp_path / "s.zarr")
    assert store.dedup_stats() == {}
    assert "a_ref" not in zarr.open_group(tmp_path / "s.zarr", mode="r")["epochs/00001/r0/layers/net.0"]


def test_int8_rows_deduplicate_on_their_codes_and_scales(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=24)
    trainer([GradientCapture(tmp_path / "s.zarr")], max_epochs=2).fit(Task(mlp()), loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    assert store.dedup_stats(1)["net.0/a"]["duplicates"] == 24
    assert store.dedup_stats(1)["net.0/a"]["bytes_saved"] == 24 * (6 + 4)  # codes and one float32 scale
    ids = store.sample_ids(1)
    np.testing.assert_array_equal(store.factors(1, "net.0", ids)["a"], store.factors(0, "net.0", ids)["a"])
    x_q = store.factors(1, "net.0", np.arange(24))["a"][:, 0]
    assert torch.allclose(x_q, x, atol=float(x.abs().max()) / 254 + 1e-6)


def test_savings_are_reported_on_disk_and_in_rows(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=24)
    trainer([GradientCapture(tmp_path / "s.zarr")], max_epochs=2).fit(Task(mlp()), loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    assert store.dedup_saved(0)["net.0/a"] == {
        "rows_as_references": 0,
        "uncompressed_bytes": 0,
        "disk_bytes": 0,
    }
    saved = store.dedup_saved(1)["net.0/a"]
    assert saved["rows_as_references"] == 24 and saved["uncompressed_bytes"] == 24 * (6 + 4)
    # Every row of epoch 1 repeats epoch 0's: it saves what epoch 0's rows take on disk, less the references.
    root = tmp_path / "s.zarr/epochs"

    def chunks(folder):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")

    on_disk = {
        e: sum(chunks(root / f"0000{e}/r0/layers/net.0" / d) for d in ("a", "a_scale")) for e in (0, 1)
    }
    assert on_disk[0] > 0 and on_disk[1] == 0  # nothing of epoch 1's inputs is stored in place
    want = on_disk[0] - chunks(root / "00001/r0/layers/net.0/a_ref")  # all 24 rows, less the references
    assert saved["disk_bytes"] == want
    text = store.describe()
    assert (
        f"dedup stored 24 input rows as references (saved about {want:,} B on disk; 240 B uncompressed)"
        in text
    )


def test_policy_rejects_a_non_boolean_dedup():
    from mstore_lightning import CapturePolicy, PolicyError

    with pytest.raises(PolicyError, match=r"`dedup` must be true or false, got 'yes'"):
        CapturePolicy(dedup="yes")


def test_resumed_run_keeps_references_readable(tmp_path):
    """A later fit that appends epochs starts a fresh index; earlier references still read."""
    torch.manual_seed(0)
    x, y = data(n=16)
    path = tmp_path / "s.zarr"
    trainer([GradientCapture(path, policy=EXACT)], max_epochs=2).fit(Task(mlp()), loader(x, y))
    before = open_store(path).factors(1, "net.0", np.arange(16))["a"]
    trainer([GradientCapture(path, policy={**EXACT, "epochs": [2]}, mode="append")], max_epochs=3).fit(
        Task(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))), loader(x, y)
    )
    store = open_store(path)
    assert store.epochs == [0, 1, 2]
    torch.testing.assert_close(store.factors(1, "net.0", np.arange(16))["a"], before)


def test_appending_over_an_epoch_that_others_reference_is_refused(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=16)
    path = tmp_path / "s.zarr"
    trainer([GradientCapture(path, policy=EXACT)], max_epochs=2).fit(Task(mlp()), loader(x, y))
    with pytest.raises(
        IncompatibleStoreError, match=r"Epoch 0 of .* holds input rows that epochs \[1\] reference"
    ):
        trainer([GradientCapture(path, policy={**EXACT, "epochs": [0]}, mode="append")]).fit(
            Task(mlp()), loader(x, y)
        )
    store = open_store(path)
    assert store.epochs == [0, 1] and store.factors(1, "net.0", np.arange(16))["a"].shape == (16, 1, 6)
