"""The store's write path: chunk alignment, codecs, bounded memory, failures, and JSON-only metadata."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import EXACT, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from mstore_lightning.store import codecs, layout
from mstore_lightning.store.buffers import PartSpec
from mstore_lightning.store.writer import BackgroundWriter, WriterError
from test_capture_fit import data, mlp


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    chunk_rows=st.integers(1, 16),
    flush_at=st.sets(st.integers(0, 11)),
)
def test_rows_arrive_exactly_whatever_the_batching(tmp_path_factory, sizes, chunk_rows, flush_at):
    group = zarr.open_group(tmp_path_factory.mktemp("w") / "s.zarr", mode="w")
    w = BackgroundWriter(queue_bytes=1 << 20, chunk_bytes=chunk_rows * 3 * 2)
    w.open_array(group, "x", (3,), np.float16)
    rng = np.random.default_rng(0)
    parts = []
    for i, n in enumerate(sizes):
        part = rng.standard_normal((n, 3)).astype(np.float32)
        parts.append(part)
        w.append(group, "x", torch.from_numpy(part))
        if i in flush_at:
            w.flush()  # a partial chunk written now must be rewritten whole later
    rows = w.finish_arrays(group)
    w.close()
    want = np.concatenate(parts).astype(np.float16)
    assert rows == {"x": len(want)}
    np.testing.assert_array_equal(group["x"][:], want)
    assert group["x"].chunks == (chunk_rows, 3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=10),
    chunk_rows=st.integers(1, 8),
    flush_at=st.sets(st.integers(0, 9)),
)
def test_the_writer_codes_every_row_once_even_across_flushes(tmp_path_factory, sizes, chunk_rows, flush_at):
    # A coder with memory (as deduplication has): coding a row twice would show in its output.
    group = zarr.open_group(tmp_path_factory.mktemp("w") / "s.zarr", mode="w")
    w = BackgroundWriter(queue_bytes=1 << 20)
    coded: list[int] = []

    def coder(rows: np.ndarray, first_row: int) -> dict[str, np.ndarray]:
        numbers = np.arange(first_row, first_row + len(rows))
        coded.extend(numbers.tolist())
        return {"x": (rows * 2).astype(np.int16), "x_seen": np.full(len(rows), len(coded), np.int64)}

    parts = [PartSpec("x", (2,), np.dtype(np.int16)), PartSpec("x_seen", (), np.dtype(np.int64))]
    w.open_array(group, "x", (2,), np.float32, chunk_rows=chunk_rows, parts=parts, coder=coder)
    sent = []
    for i, n in enumerate(sizes):
        rows = np.arange(2 * sum(map(len, sent)), 2 * (sum(map(len, sent)) + n), dtype=np.float32).reshape(
            n, 2
        )
        sent.append(rows)
        w.append(group, "x", torch.from_numpy(rows))
        if i in flush_at:
            w.flush()  # a partial chunk written now is rewritten whole later, with its rows coded once
    total = sum(map(len, sent))
    assert w.finish_arrays(group) == {"x": total}
    w.close()
    assert coded == list(range(total))  # every row coded exactly once, in order
    np.testing.assert_array_equal(group["x"][:], (np.concatenate(sent) * 2).astype(np.int16))
    seen = group["x_seen"][:]
    assert (np.diff(seen) >= 0).all() and (total == 0 or seen[-1] == total)
    assert group["x"].attrs["parts"]["parts"] == [
        {"name": "x", "skip_empty": False},
        {"name": "x_seen", "skip_empty": False},
    ]


def test_an_array_finished_within_its_first_chunk_is_created_at_its_size(tmp_path, monkeypatch):
    # A short epoch's arrays: one metadata write each, not a creation and then a trim.
    resized = []
    real = zarr.Array.resize
    monkeypatch.setattr(
        zarr.Array, "resize", lambda self, shape: (resized.append(self.path), real(self, shape))
    )
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    w = BackgroundWriter(queue_bytes=1 << 20)
    w.open_array(group, "short", (3,), np.float32, chunk_rows=16)
    w.open_array(group, "long", (3,), np.float32, chunk_rows=16)
    w.append(group, "short", torch.ones(5, 3))
    w.append(group, "long", torch.ones(20, 3))  # a whole chunk goes first, at a guessed size
    assert w.finish_arrays(group) == {"short": 5, "long": 20}
    w.close()
    assert group["short"].shape == (5, 3) and group["long"].shape == (20, 3)
    assert resized == ["long"]


def test_finishing_one_group_leaves_another_groups_rows_buffered_and_each_chunk_is_written_once(tmp_path):
    # An epoch's query group is finished before its training group: flushing the training rows then
    # wrote their chunk once as a partial and again whole.
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    train, query = root.create_group("r0"), root.create_group("q0")
    written: list[tuple[str, int]] = []

    class Counting(BackgroundWriter):
        def _write(self, chunks):
            written.extend((c.array.group.basename, c.start) for c in chunks)
            super()._write(chunks)

    w = Counting(queue_bytes=1 << 20)
    for group, n in ((train, 7), (query, 3)):
        w.open_array(group, "x", (2,), np.float32, chunk_rows=16)
        w.append(group, "x", torch.arange(2 * n, dtype=torch.float32).reshape(n, 2))
    assert w.finish_arrays(query) == {"x": 3}
    assert "x" not in train  # not created: its rows wait for their own group's finish
    assert w.finish_arrays(train) == {"x": 7}
    w.close()
    assert sorted(written) == [("q0", 0), ("r0", 0)]
    np.testing.assert_array_equal(train["x"][:], np.arange(14, dtype=np.float32).reshape(7, 2))


def _nice(thread: threading.Thread | None = None) -> int:
    return os.getpriority(os.PRIO_PROCESS, (thread or threading.current_thread()).native_id)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
@pytest.mark.parametrize("low", [True, False])
def test_the_writer_and_its_compression_run_at_the_lowest_priority_and_zarrs_threads_keep_theirs(
    tmp_path, low
):
    base = _nice()
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    before = set(threading.enumerate())
    w = BackgroundWriter(queue_bytes=1 << 20, chunk_bytes=64 * 4 * 8, low_priority=low)
    w.open_array(group, "x", (64,), np.float32)
    rows = torch.randn(100, 64)
    w.append(group, "x", rows)
    w.flush()
    seen = {}
    w.run_on_writer(lambda: seen.update(writer=_nice()))
    codec = [t for t in set(threading.enumerate()) - before if t.name.startswith("mstore-codec")]
    assert codec, "chunks of a local store are compressed on the writer's own pool"
    want = 19 if low else base
    assert seen["writer"] == want and {_nice(t) for t in codec} == {want}
    # zarr's event loop thread, shared with every other zarr user in the process, is left as it was.
    assert {_nice(t) for t in threading.enumerate() if t.name == "zarr_io"} == {base}
    assert w.finish_arrays(group) == {"x": 100}
    w.close()
    assert not any(t.is_alive() for t in codec), "no low-priority thread outlives the writer"
    np.testing.assert_array_equal(group["x"][:], rows.numpy())


def test_a_capture_that_drops_rows_under_pressure_keeps_its_writer_at_normal_priority(tmp_path, monkeypatch):
    made = []
    real = BackgroundWriter.__init__

    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self.low_priority)

    monkeypatch.setattr(BackgroundWriter, "__init__", recording)
    for i, pressure in enumerate(("drop", "block")):
        capture = GradientCapture(store=str(tmp_path / f"{i}.zarr"), on_pressure=pressure)
        trainer(max_epochs=1, callbacks=[capture]).fit(Task(mlp()), loader(*data(n=16)))
    assert made == [False, True]


def test_writer_blocks_instead_of_growing_when_storage_is_slow(tmp_path):
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    chunk = 64 * 1024  # bytes per chunk

    class Slow(BackgroundWriter):
        peak = 0

        def _write(self, chunks):
            Slow.peak = max(Slow.peak, self.pending_bytes)
            time.sleep(0.02 * len(chunks))  # each chunk takes 20 ms, even when written together
            super()._write(chunks)

    w = Slow(queue_bytes=4 * chunk, chunk_bytes=chunk)
    w.open_array(group, "x", (1024,), np.float32)  # 16 rows a chunk
    t0 = time.perf_counter()
    for i in range(40):
        w.append(group, "x", torch.full((16, 1024), float(i)))
    w.finish_arrays(group)
    w.close()
    assert Slow.peak <= 4 * chunk
    assert w.wait_seconds > 0.2  # the training side waited rather than queueing everything
    assert time.perf_counter() - t0 >= 40 * 0.02
    np.testing.assert_array_equal(group["x"][:, 0], np.repeat(np.arange(40, dtype=np.float32), 16))


def test_writer_failure_surfaces_on_the_training_thread(tmp_path):
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")

    class Broken(BackgroundWriter):
        def _write(self, chunks):
            raise OSError(28, "No space left on device")

    w = Broken(queue_bytes=1 << 20, chunk_bytes=64)
    w.open_array(group, "x", (4,), np.float32)
    with pytest.raises(WriterError, match="No space left on device"):
        for _ in range(100):
            w.append(group, "x", torch.zeros(4, 4))
            time.sleep(0.001)
        w.flush()
    w.close()
    assert not w._thread.is_alive()


def fit_store(path: Path, **policy) -> None:
    torch.manual_seed(0)
    x, y = data(n=24)
    trainer([GradientCapture(path, policy={**EXACT, **policy})], max_epochs=2).fit(Task(mlp()), loader(x, y))


def test_each_array_takes_the_compressor_its_first_chunk_measured_and_any_zarr_reader_decodes_it(tmp_path):
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    arrays = {
        "codes": rng.integers(-127, 128, (4096, 256), dtype=np.int8),  # at its entropy: not worth it
        "relu": np.maximum(rng.standard_normal((4096, 128)), 0).astype(np.float32),
        "ids": np.arange(4096 * 64, dtype=np.int64).reshape(4096, 64),
    }
    w = BackgroundWriter(chunk_bytes=1 << 20)
    for epoch in (0, 1):
        group = zarr.open_group(path, mode="a").require_group(f"e{epoch}")
        for name, rows in arrays.items():
            w.open_array(group, name, rows.shape[1:], rows.dtype)
            w.append(group, name, torch.from_numpy(rows[::-1].copy() if epoch else rows))
        w.finish_arrays(group)
    w.close()
    chosen = {}
    for epoch in (0, 1):
        for name, rows in arrays.items():
            arr = zarr.open_array(path / f"e{epoch}" / name, mode="r")  # a plain Zarr reader
            np.testing.assert_array_equal(arr[:], rows[::-1] if epoch else rows)
            record = arr.attrs["compression"]
            names = [c.to_dict()["name"] for c in arr.compressors]
            assert names[-1] == "crc32c" and len(names) == (1 if record["chosen"] == "none" else 2)
            assert record["sample_bytes"] >= 256 << 10 and record["measured"]
            chosen.setdefault(name, record)
            assert record == chosen[name]  # measured on the first epoch's first chunk, then kept
    best = {n: max(m["ratio"] for m in r["measured"].values()) for n, r in chosen.items()}
    assert chosen["codes"]["chosen"] == "none" and best["codes"] < 1 / (1 - codecs.MIN_SAVING)
    assert not any(n.startswith("blosc") for n in chosen["codes"]["measured"])  # no shuffle for bytes
    for name in ("relu", "ids"):
        measured = chosen[name]["measured"]
        assert chosen[name]["chosen"] != "none" and measured[chosen[name]["chosen"]]["ratio"] > 1.5
        faster = [
            m for m in measured.values() if m["mb_per_s"] > measured[chosen[name]["chosen"]]["mb_per_s"]
        ]
        assert all(1 - 1 / m["ratio"] < 0.9 * (1 - 1 / best[name]) for m in faster)


def test_layout_codecs_and_json_only_metadata(tmp_path):
    path = tmp_path / "s.zarr"
    fit_store(path, precision="fp16")
    root = zarr.open_group(path, mode="r")
    meta = root.attrs[layout.META_KEY]
    assert meta["schema_version"] == layout.SCHEMA_VERSION
    assert meta["policy"]["precision"] == "fp16" and meta["loss_reduction"] == "mean"
    assert set(meta["versions"]) >= {"torch", "lightning", "zarr", "numcodecs"}
    spec = meta["layers"]["net.0"]
    assert spec["kind"] == "linear" and spec["hyper"] == {"in_features": 6, "out_features": 8}
    assert spec["representation"] == "factors" and spec["arrays"]["a"]["dtype"] == "float16"
    arr = root["epochs/00000/r0/layers/net.0/a"]
    names = [c.to_dict()["name"] for c in arr.compressors]
    assert names == ["zstd", "crc32c"]  # a first chunk too small to measure: the default
    assert arr.attrs["compression"] == {"chosen": "zstd:1", "sample_bytes": 0, "measured": {}}
    assert root["epochs/00000"].attrs["lr"] == pytest.approx(0.1)
    # Every metadata document is JSON, and nothing else but chunk data lives in the store.
    for f in path.rglob("*"):
        if f.is_file():
            if f.name == "zarr.json":
                json.loads(f.read_text())
            else:
                assert "/c/" in f.as_posix(), f
            assert b"\x80\x04\x95" not in f.read_bytes()[:3]  # no pickle protocol header


def test_every_metadata_document_a_reader_can_meet_is_whole(tmp_path, monkeypatch):
    # A reader beside a training run reads whichever zarr.json is on disk at that moment, so each
    # version ever written must pass its checksum; a committed epoch is stamped in the same write.
    written: list[tuple[str, bytes]] = []
    set_value = zarr.storage.LocalStore.set

    async def recording_set(self, key, value):
        if key.endswith("zarr.json"):
            written.append((key, value.to_bytes()))
        return await set_value(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", recording_set)
    fit_store(tmp_path / "s.zarr")
    roots = [json.loads(b)["attributes"] for k, b in written if k == "zarr.json"]
    epochs = [json.loads(b)["attributes"] for k, b in written if k.count("/") == 2]  # epochs/NNNNN/zarr.json
    assert len(roots) >= 3 and any("layers" in r.get(layout.META_KEY, {}) for r in roots)
    assert [e for e in epochs if e.get("state") == layout.COMMITTED]
    for attrs in roots + epochs:
        assert not layout.crc_mismatch(attrs), attrs
    for attrs in epochs:
        assert attrs.get("state") in (layout.OPEN, layout.COMMITTED)
        assert attrs["state"] == layout.OPEN or layout.CRC_KEY in attrs


def test_restore_needs_no_model(tmp_path):
    path = tmp_path / "s.zarr"
    fit_store(path)
    import subprocess
    import sys

    code = (
        "import sys; from mstore_lightning import open_store; s = open_store(sys.argv[1]); "
        "ids = s.sample_ids(0)[:3]; g = s.restore(0, 'net.2', ids); "
        "print(sorted(g), tuple(g['weight'].shape), len(s.norms(1)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['bias', 'weight'] (3, 3, 8) 24"


@pytest.fixture
def trips(monkeypatch):
    """``{"n": round trips to zarr's event loop thread}``, counted while the test runs."""
    import zarr.core.sync

    from mstore_lightning.store import catalog, zarr_io

    counts = {"n": 0}

    def counting(sync):
        def wrapped(*args, **kwargs):
            counts["n"] += 1
            return sync(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(zarr.core.sync, "sync", counting(zarr.core.sync.sync))
    for module in (catalog, zarr_io):
        monkeypatch.setattr(module, "zarr_sync", counting(module.zarr_sync))
    return counts


def int8_store(path, epochs: int):
    torch.manual_seed(0)
    x, y = data(n=24)
    trainer([GradientCapture(path, policy={"precision": "int8"})], max_epochs=epochs).fit(
        Task(mlp()), loader(x, y)
    )
    return path


def test_self_influence_reads_in_as_many_round_trips_for_six_epochs_as_for_two(tmp_path, trips):
    # Each trip to zarr's event loop costs about a millisecond on small epochs, so the reads of every
    # epoch share a few trips instead of a few per epoch; the scores are the per-epoch sums.
    counted, totals = {}, {}
    for epochs in (2, 6):
        path = int8_store(tmp_path / f"e{epochs}.zarr", epochs)
        store = open_store(path)
        trips["n"] = 0
        scores = store.self_influence()
        counted[epochs] = trips["n"]
        by_epoch = sum(open_store(path).self_influence(epochs=[e]).scores for e in range(epochs))
        np.testing.assert_allclose(scores.scores, by_epoch, rtol=1e-12)
        totals[epochs] = len(scores.ids)
    assert totals == {2: 24, 6: 24}
    assert counted[6] == counted[2] <= 8, counted


def test_tracin_reads_in_as_many_round_trips_for_six_epochs_as_for_two(tmp_path, trips, monkeypatch):
    # Epoch after epoch, TracIn's reads of every layer's chunks share one batch (while they fit in
    # the staging bound); epochs larger than the bound are read a chunk at a time, same sums.
    from mstore_lightning.store import chunks

    counted, one_by_one = {}, {}
    queries = np.arange(0, 24, 5)
    for epochs in (2, 6):
        path = int8_store(tmp_path / f"e{epochs}.zarr", epochs)
        trips["n"] = 0
        scores = open_store(path).tracin(queries)
        counted[epochs] = trips["n"]
        by_epoch = sum(open_store(path).tracin(queries, epochs=[e]).scores for e in range(epochs))
        np.testing.assert_allclose(scores.scores, by_epoch, rtol=1e-9)
        with monkeypatch.context() as m:
            m.setattr(chunks, "STAGE_BYTES", 1)
            staged = []
            staging = chunks.ChunkReader.hold

            def recording(self, run, keys):
                staged.append(run)
                return staging(self, run, keys)

            m.setattr(chunks.ChunkReader, "hold", recording)
            trips["n"] = 0
            np.testing.assert_array_equal(open_store(path).tracin(queries).scores, scores.scores)
            one_by_one[epochs] = trips["n"]
            assert staged == []  # an epoch over the bound is never held whole
    assert counted[6] == counted[2], counted
    assert one_by_one[6] > one_by_one[2], one_by_one


def test_listing_epochs_again_reads_only_the_listing(tmp_path, trips):
    # A report lists the epochs many times; committed epoch groups never change, so only new ones
    # are opened. An epoch group that disappears is still reported.
    import shutil

    from mstore_lightning import StoreReadError

    path = int8_store(tmp_path / "s.zarr", 3)
    store = open_store(path)
    assert store.epochs == [0, 1, 2]
    trips["n"] = 0
    assert store.epochs == [0, 1, 2]
    assert trips["n"] == 1
    shutil.rmtree(path / "epochs" / "00001")
    with pytest.raises(StoreReadError, match=r"epoch\(s\) \[1\] were committed but their groups are missing"):
        store.epochs


def test_a_flipped_byte_in_a_chunk_is_detected(tmp_path):
    path = tmp_path / "s.zarr"
    fit_store(path)
    chunk = next((path / "epochs/00000/r0/layers/net.0/a/c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    store = open_store(path)
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        store.norms(0, kept=False)  # on the factors; the norms kept at capture do not need this chunk
    np.testing.assert_array_equal(np.sort(store.sample_ids(1)), np.arange(24))  # the rest still reads


def test_read_errors_name_what_is_missing(tmp_path):
    from mstore_lightning import StoreReadError

    path = tmp_path / "s.zarr"
    fit_store(path)
    store = open_store(path)
    with pytest.raises(StoreReadError, match=r"Epoch 5 is not committed in this store; committed: \[0, 1\]"):
        store.norms(5)
    with pytest.raises(
        StoreReadError, match=r"Layer 'fc' is not in this store; its layers are \['net.0', 'net.2'\]"
    ):
        store.restore(0, "fc", [0])
    with pytest.raises(StoreReadError, match=r"Sample id\(s\) \[999\] were not captured in epoch 0"):
        store.restore(0, "net.0", [1, 999])
    with pytest.raises(StoreReadError, match="No gradient store at"):
        open_store(tmp_path / "nothing.zarr")
    assert "net.0 (Linear): factors" in store.describe()
