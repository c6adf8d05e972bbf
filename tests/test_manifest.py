"""Manifests: each committed group lists every chunk below it, bound to its place, and reads and
``verify`` refuse a chunk that is missing, unlisted, altered or copied from another place."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
import zarr
from helpers import EXACT, Task, loader, manifest_files, stored_manifests, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_capture_fit import data, mlp
from test_cli import spawn
from zarr.core.buffer import default_buffer_prototype

from mstore_lightning import GradientCapture, StoreReadError, open_store
from mstore_lightning.store.manifest import ManifestStore, digest
from mstore_lightning.store.verify import verify

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "store_v1" / "fp32.zarr"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Three epochs with queries, deduplicated inputs, small chunks, and a layer recomputed from
    stored weights: every kind of group a manifest covers."""
    path = tmp_path_factory.mktemp("manifest") / "run.zarr"
    torch.manual_seed(0)
    x, y = data(n=24)
    x[12:] = x[:12]  # repeated inputs, so that dedup leaves chunks unwritten
    qx, qy = data(n=4, seed=5)
    policy = {**EXACT, "dedup": True, "recompute": {"layers": ["net.2"]}}
    cap = GradientCapture(path, policy=policy, chunk_bytes=256, query=loader(qx, qy, batch_size=4, shuffle=False))
    trainer([cap], max_epochs=3).fit(Task(mlp()), loader(x, y))
    return path


@pytest.fixture
def copy(written, tmp_path):
    return Path(shutil.copytree(written, tmp_path / "copy.zarr"))


def test_every_committed_group_lists_exactly_its_chunks_with_their_digests(written):
    found = stored_manifests(written)
    kinds = {p.rsplit("/", 1)[-1] for p in found}
    assert kinds == {"r0", "q0", "weights"}
    assert found == manifest_files(written)  # digests computed here from the files, independently
    for epoch in range(3):
        attrs = json.loads((written / f"epochs/{epoch:05d}/zarr.json").read_text())["attributes"]
        assert attrs["manifest"] == 1
    report = verify(written)
    assert report.ok and report.epochs_without_manifest == [] and report.notes == []


def _swap_epochs(root: Path, array: str) -> str:
    """Copies epoch 2's first chunk of ``array`` over epoch 1's; returns the damaged chunk's key."""
    src = next(f for f in sorted((root / f"epochs/00002/r0/{array}/c").rglob("*")) if f.is_file())
    dst = root / "epochs/00001/r0" / array / src.relative_to(root / f"epochs/00002/r0/{array}")
    assert src.read_bytes() != dst.read_bytes()
    shutil.copyfile(src, dst)
    return dst.relative_to(root).as_posix()


# Each array, and the public reads that use it.
SWAPS = {
    "rows/ids": lambda s: s.sample_ids(1),
    "rows/loss": lambda s: s.row_field(1, "loss"),
    "rows/sqnorm": lambda s: s.norms(1, ["net.0"]),  # net.2 is recomputed, not stored
    "layers/net.0/d": lambda s: s.restore(1, "net.0", s.sample_ids(1)[:3]),  # rows of chunk 0
}


@pytest.mark.parametrize("array", list(SWAPS))
def test_a_chunk_copied_from_another_epoch_fails_verify_and_every_read_of_it(copy, array):
    key = _swap_epochs(copy, array)
    done = spawn("verify", copy)
    assert done.returncode == 1
    assert f"{key.rsplit('/c/', 1)[0]}, chunk c/{key.rsplit('/c/', 1)[1]}: a valid chunk" in done.stdout
    assert "copied from another array or epoch" in done.stdout
    store = open_store(copy)
    with pytest.raises(StoreReadError, match=f"Chunk {key}: a valid chunk, but not the one"):
        SWAPS[array](store)
    if array == "rows/sqnorm":
        with pytest.raises(StoreReadError, match=f"Chunk {key}"):
            store.self_influence(layers=["net.0"])
    np.testing.assert_array_equal(np.sort(store.sample_ids(0)), np.arange(24))  # the rest still reads


def test_a_chunk_copied_from_another_array_fails(copy):
    group = copy / "epochs/00001/r0/rows"
    shutil.copyfile(group / "step/c/1", group / "ids/c/1")
    report = verify(copy)
    assert [(p.array, p.chunk) for p in report.problems] == [("epochs/00001/r0/rows/ids", "c/1")]
    with pytest.raises(StoreReadError, match="Chunk epochs/00001/r0/rows/ids/c/1: a valid chunk"):
        open_store(copy).sample_ids(1)


def _chunks(root: Path, array: str) -> tuple[list[Path], list[Path]]:
    """The unwritten and the written chunks of a deduplicated array."""
    arr = zarr.open_array(root / array, mode="r")
    keys = [arr.metadata.encode_chunk_key((i, *[0] * (arr.ndim - 1))) for i in range(arr.cdata_shape[0])]
    files = [root / array / k for k in keys]
    return [f for f in files if not f.exists()], [f for f in files if f.exists()]


def test_a_chunk_added_after_the_commit_fails(copy):
    absent, _ = _chunks(copy, "epochs/00001/r0/layers/net.0/a")  # every input a repeat of epoch 0's
    _, present = _chunks(copy, "epochs/00000/r0/layers/net.0/a")
    absent[0].parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(present[0], absent[0])
    key = absent[0].relative_to(copy).as_posix()
    report = verify(copy)
    assert len(report.problems) == 1 and "not in its group's manifest" in report.problems[0].what
    store = open_store(copy)
    with pytest.raises(StoreReadError, match=f"Chunk {key}: chunk file is not in its group's manifest"):
        store.restore(1, "net.0", store.sample_ids(1))


def test_a_listed_chunk_that_is_gone_fails_even_where_chunks_may_be_unwritten(copy):
    _, present = _chunks(copy, "epochs/00000/r0/layers/net.0/a")
    present[-1].unlink()
    key = present[-1].relative_to(copy).as_posix()
    report = verify(copy)
    assert [p.what for p in report.problems] == ["chunk file is missing, though its group's manifest lists it"]
    store = open_store(copy)
    with pytest.raises(StoreReadError, match=f"Chunk {key}: chunk file is missing"):
        store.restore(0, "net.0", store.sample_ids(0))


def test_a_group_whose_manifest_is_gone_fails(copy):
    meta_path = copy / "epochs/00001/r0/zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["manifest"]
    meta_path.write_text(json.dumps(meta))
    report = verify(copy)
    assert [(p.array, p.what) for p in report.problems] == [
        ("epochs/00001/r0", "has no manifest, though its epoch was committed with one")
    ]
    with pytest.raises(StoreReadError, match="epochs/00001/r0 has no manifest"):
        open_store(copy).sample_ids(1)


def test_a_store_written_before_manifests_opens_and_verify_says_it_has_none(tmp_path):
    path = Path(shutil.copytree(FIXTURE_V1, tmp_path / "v1.zarr"))
    report = verify(path)
    assert report.ok and report.epochs_without_manifest == report.epochs_committed == [0, 1]
    done = spawn("verify", path)
    assert done.returncode == 0
    assert "note: epoch(s) [0, 1] were committed before manifests existed" in done.stdout
    assert len(open_store(path).sample_ids(1)) > 0


def test_epochs_with_and_without_manifests_in_one_store_are_each_read_as_written(copy):
    """A store appended to after an upgrade holds epochs of both kinds."""
    from mstore_lightning.store import layout

    for group in ("r0", "q0", "weights"):  # epoch 0 as an earlier library committed it
        meta_path = copy / f"epochs/00000/{group}/zarr.json"
        meta = json.loads(meta_path.read_text())
        del meta["attributes"]["manifest"]
        meta_path.write_text(json.dumps(meta))
    meta_path = copy / "epochs/00000/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"] = layout.with_crc({k: v for k, v in meta["attributes"].items() if k != "manifest"})
    meta_path.write_text(json.dumps(meta))
    report = verify(copy)
    assert report.ok and report.epochs_without_manifest == [0]
    _swap_epochs(copy, "rows/ids")  # epoch 1 is still checked
    store = open_store(copy)
    assert sorted(store.sample_ids(0).tolist()) == list(range(24))
    with pytest.raises(StoreReadError, match="Chunk epochs/00001/r0/rows/ids"):
        store.sample_ids(1)


# ---------------------------------------------------------------- the writer's record
KEYS = st.sampled_from(
    ["epochs/00000/r0/a/c/0", "epochs/00000/r0/a/c/1", "epochs/00000/r0/b/c/0", "epochs/00000/q0/a/c/0"]
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, st.binary(min_size=5, max_size=40)),
        st.tuples(st.just("delete"), KEYS, st.just(b"")),
        st.tuples(st.just("delete_dir"), st.sampled_from(["epochs/00000/r0/a", "epochs/00000/q0"]), st.just(b"")),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_the_writers_record_matches_what_the_store_holds(ops):
    """Whatever sequence of writes and deletes, the manifest is the digest of what is left."""
    store = ManifestStore(zarr.storage.MemoryStore())
    copy = store.with_read_only(False)  # zarr's copies of the wrapper share its record

    async def run() -> tuple[dict[str, int], dict[str, bytes]]:
        proto = default_buffer_prototype()
        for op, key, value in ops:
            target = copy if len(value) % 2 else store
            if op == "set":
                await target.set(key, proto.buffer.from_bytes(value))
            elif op == "delete":
                await target.delete(key)
            else:
                await target.delete_dir(key)
        held = {k: (await store.get(k, proto)).to_bytes() async for k in store.list()}
        return await store.manifest("epochs/00000/r0"), held

    got, held = asyncio.run(run())
    want = {
        k[len("epochs/00000/r0/") :]: crc32c.crc32c(v[:-4], crc32c.crc32c(k.encode()))
        for k, v in held.items()
        if k.startswith("epochs/00000/r0/")
    }
    assert got == want
    assert not any(k.startswith("epochs/00000/r0/") for k in store.digests)  # taken once written


def test_the_digest_binds_the_key_and_the_bytes_before_the_chunk_crc():
    body = b"gradient rows"
    chunk = body + crc32c.crc32c(body).to_bytes(4, "little")
    other = b"other rows!!!" + crc32c.crc32c(b"other rows!!!").to_bytes(4, "little")
    a = digest("epochs/00001/r0/rows/ids/c/0", np.frombuffer(chunk, dtype=np.uint8))
    assert a != digest("epochs/00002/r0/rows/ids/c/0", np.frombuffer(chunk, dtype=np.uint8))
    # Same length, both ending in their own crc32c: a CRC over the whole would not tell them apart.
    assert a != digest("epochs/00001/r0/rows/ids/c/0", np.frombuffer(other, dtype=np.uint8))


def test_a_whole_rank_group_copied_from_another_epoch_fails(copy):
    """Its manifest comes along, but its digests were taken over the other epoch's keys."""
    shutil.rmtree(copy / "epochs/00001/r0")
    shutil.copytree(copy / "epochs/00002/r0", copy / "epochs/00001/r0")
    report = verify(copy)
    assert not report.ok
    assert all("copied from another array or epoch" in p.what for p in report.problems if p.chunk)
    # Every chunk of the group is damaged; reads overlap, so whichever is checked first is named.
    with pytest.raises(StoreReadError, match=r"Chunk epochs/00001/r0/rows/ids/c/\d+: a valid chunk"):
        open_store(copy).sample_ids(1)
