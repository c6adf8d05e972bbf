"""Damaged stores: a flipped byte, a truncated file, a deleted file or metadata that lies is found on
read, with an error naming what is damaged, never answered with silent garbage or a bare crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Task, loader, trainer
from mstore_lightning import GradientCapture, StoreReadError, open_store
from test_capture_fit import data, mlp


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "s.zarr"
    torch.manual_seed(0)
    x, y = data(n=20)
    cap = GradientCapture(path, policy={"precision": "int8"}, chunk_bytes=256)
    trainer([cap], max_epochs=2).fit(Task(mlp()), loader(x, y, batch_size=5))
    return path, answers(open_store(path))


def answers(store) -> dict:
    """Everything a user would read: ids, labels, norms, self-influence, restored gradients."""
    out = {"epochs": list(store.epochs)}
    for e in store.epochs:
        ids = store.sample_ids(e)
        out[e] = {
            "ids": ids.tolist(),
            "label": store.row_field(e, "label").tolist(),
            "norms": np.asarray(store.norms(e)).tolist(),
            "restore": {
                layer: {k: v.tolist() for k, v in store.restore(e, layer, ids[:3]).items()}
                for layer in store.layers
            },
        }
    si = store.self_influence()
    out["self_influence"] = (si.ids.tolist(), si.scores.tolist())
    return out


# One damaged file: which file, what is done to it, where, and with what value.
DAMAGES = {
    "pick": st.integers(0, 10**6),
    "how": st.sampled_from(["flip", "truncate", "delete", "lie", "swap"]),
    "at": st.integers(0, 10**6),
    "value": st.integers(0, 10**6),
}


def damage(root: Path, pick: int, how: str, at: int, value: int) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    target = files[pick % len(files)]
    raw = bytearray(target.read_bytes())
    if how == "delete":
        target.unlink()
    elif how == "truncate":
        target.write_bytes(bytes(raw[: at % max(len(raw), 1)]))
    elif how == "flip" and raw:
        raw[at % len(raw)] ^= 1 + value % 255
        target.write_bytes(bytes(raw))
    elif how == "swap" and target.name != "zarr.json":
        # A valid chunk from another place (another epoch, rank group or array) over this one.
        chunks = [p for p in files if p.name != "zarr.json" and p != target]
        if chunks:
            target.write_bytes(chunks[(at + value) % len(chunks)].read_bytes())
    elif how == "lie" and target.name == "zarr.json":
        meta = json.loads(raw)
        if meta.get("node_type") == "array":
            shape = meta["shape"]
            shape[at % len(shape)] += 1 + value % 7
            target.write_text(json.dumps(meta))
        elif "attributes" in meta and "lr" in meta["attributes"]:
            meta["attributes"]["lr"] = float(meta["attributes"]["lr"]) * 3 + 1
            target.write_text(json.dumps(meta))
    return target.relative_to(root).as_posix()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DAMAGES)
def test_damage_is_found_or_harmless(clean, tmp_path_factory, pick, how, at, value):
    path, expected = clean
    root = Path(shutil.copytree(path, tmp_path_factory.mktemp("damaged") / "s.zarr"))
    where = damage(root, pick, how, at, value)
    try:
        got = answers(open_store(root))
    except StoreReadError as exc:
        # Named: the message points at the damaged file's array or group, or at the store.
        message = str(exc)
        assert message and "\n" not in message.strip(), message
        return
    # No error: then nothing a user reads may have changed.
    assert got == expected, f"{how} of {where} changed what the store returns without an error"
