"""Stores on object storage: capture, commits, reads, verify and the CLI against a real S3-compatible
server (moto's, on loopback), checked against the same run written to a local directory."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import logging
import socket
from pathlib import Path

import boto3
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_capture_fit import assert_matches_reference, data, mlp
from test_resume import Crash, SimulatedCrash, StepLog, rows_by_step

from mstore_lightning import GradientCapture, StoreWriteError, open_store
from mstore_lightning.cli import main
from mstore_lightning.store import StoreExistsError, StoreReadError
from mstore_lightning.store.verify import epoch_states, verify

moto_server = pytest.importorskip("moto.server")

BUCKET = "grads"
KEY, SECRET, REGION = "testing", "testing", "us-east-1"
N = 16  # training samples: every request goes through a server in this process, so runs are tiny


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module", autouse=True)
def offline():
    """Fake credentials, no AWS config files, no instance metadata, and no connection to anything but
    loopback: a request meant for real AWS fails loudly instead of leaving the machine."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    own_names = ("localhost", socket.gethostname(), None)

    def loopback(host) -> bool:
        if host in own_names:
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
            raise ConnectionRefusedError(f"test_s3 allows loopback connections only, not {address!r}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not loopback(host):
            raise socket.gaierror(f"test_s3 resolves loopback names only, not {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws/config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws/credentials")
        mp.setenv("AWS_ACCESS_KEY_ID", KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        yield


@pytest.fixture(scope="module")
def endpoint(offline):
    """A moto S3 server on a free loopback port, with an empty bucket; stopped at the end."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client(url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def client(url: str):
    return boto3.client(
        "s3", endpoint_url=url, region_name=REGION, aws_access_key_id=KEY, aws_secret_access_key=SECRET
    )


@pytest.fixture(scope="module")
def s3(endpoint):
    return client(endpoint)


@pytest.fixture(scope="module")
def options(endpoint):
    """What a user passes for MinIO or any S3-compatible server."""
    return {"key": KEY, "secret": SECRET, "endpoint_url": endpoint, "client_kwargs": {"region_name": REGION}}


def objects(s3, prefix: str) -> dict[str, dict]:
    """Every object under ``prefix/``, by key below it: its listing entry (``Size``, ``ETag``)."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix) + 1 :]] = item
    return out


def local_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def md5(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'  # an S3 ETag of a single-part upload


# ---------------------------------------------------------------- one run, written twice
def fit_run(store, options=None):
    """Two epochs of a tiny MLP (fp32, small chunks so that arrays have several, deduplicated inputs);
    the torch.func reference of every training batch."""
    torch.manual_seed(0)
    x, y = data(n=N)
    ref = Reference()
    capture = GradientCapture(store, policy=EXACT, chunk_bytes=256, storage_options=options)
    trainer([ref, capture], max_epochs=2).fit(Task(mlp()), loader(x, y))
    return ref


@pytest.fixture(scope="module")
def runs(tmp_path_factory, options):
    """The same seeded run, captured to a local directory and to ``s3://grads/run.zarr``."""
    local = tmp_path_factory.mktemp("local") / "run.zarr"
    fit_run(local)
    url = f"s3://{BUCKET}/run.zarr"
    ref = fit_run(url, options)
    return {"local": local, "url": url, "ref": ref}


def test_s3_store_holds_the_local_store_bytes_and_torch_func_gradients(runs, options, s3):
    remote, local = open_store(runs["url"], options), open_store(runs["local"])
    assert remote.epochs == local.epochs == [0, 1]
    assert remote.layers == local.layers == ["net.0", "net.2"]
    assert_matches_reference(remote, runs["ref"])
    for epoch in remote.epochs:
        ids = remote.sample_ids(epoch)
        assert sorted(ids.tolist()) == list(range(N))
        np.testing.assert_array_equal(ids, local.sample_ids(epoch))
        for layer in remote.layers:
            got, want = remote.restore(epoch, layer, ids), local.restore(epoch, layer, ids)
            assert got.keys() == want.keys() == {"weight", "bias"}
            for p in got:
                assert torch.equal(got[p], want[p]), (epoch, layer, p)
    assert remote.dedup_stats(1)["net.0/a"]["duplicates"] == N  # epoch 1's inputs are references
    # Every chunk object in the bucket holds the bytes of the local chunk file of the same key.
    in_bucket, on_disk = objects(s3, "run.zarr"), local_files(runs["local"])
    assert in_bucket.keys() == on_disk.keys()
    chunks = [k for k in in_bucket if "/c/" in k]
    assert len(chunks) > 30
    assert all(in_bucket[k]["ETag"] == md5(on_disk[k]) for k in chunks)
    # Bytes stored, from the store's own listing, against boto3's.
    assert remote.nbytes_stored() == sum(o["Size"] for o in in_bucket.values())
    assert remote.nbytes_stored(1) == sum(
        o["Size"] for k, o in in_bucket.items() if k.startswith("epochs/00001/")
    )
    for layer in remote.layers:
        assert remote.nbytes_stored(layer=layer) == local.nbytes_stored(layer=layer) > 0
    report = verify(runs["url"], options)
    assert report.ok, report.summary()
    assert report.epochs_committed == [0, 1] and report.chunks_checked >= len(chunks)


def test_damaged_and_missing_chunk_objects_are_found_by_verify_and_reads(runs, options, s3):
    copy = "damaged.zarr"
    for key in objects(s3, "run.zarr"):
        s3.copy_object(
            Bucket=BUCKET, Key=f"{copy}/{key}", CopySource={"Bucket": BUCKET, "Key": f"run.zarr/{key}"}
        )
    url = f"s3://{BUCKET}/{copy}"
    flipped = sorted(k for k in objects(s3, copy) if k.startswith("epochs/00000/r0/layers/net.2/d/c/"))[1]
    deleted = min(k for k in objects(s3, copy) if k.startswith("epochs/00001/r0/layers/net.0/d/c/"))
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=f"{copy}/{flipped}")["Body"].read())
    body[len(body) // 2] ^= 0x40
    s3.put_object(Bucket=BUCKET, Key=f"{copy}/{flipped}", Body=bytes(body))
    s3.delete_object(Bucket=BUCKET, Key=f"{copy}/{deleted}")

    report = verify(url, options)
    found = {(p.array, p.chunk): p.what for p in report.problems}
    assert len(found) == 2, report.summary()
    assert "crc32c checksum mismatch" in found[("epochs/00000/r0/layers/net.2/d", flipped.split("/d/", 1)[1])]
    assert "chunk file is missing" in found[("epochs/00001/r0/layers/net.0/d", deleted.split("/d/", 1)[1])]

    store = open_store(url, options)
    ids = store.sample_ids(0)
    with pytest.raises(StoreReadError, match=f"Chunk {re.escape(flipped)}: crc32c checksum mismatch"):
        store.restore(0, "net.2", ids)
    assert store.restore(0, "net.2", ids[:1])["weight"].shape == (1, 3, 8)  # its chunk 0 is intact
    with pytest.raises(StoreReadError, match=f"Chunk {re.escape(deleted)}: chunk file is missing"):
        store.norms(1, kept=False)
    assert store.restore(0, "net.0", ids)["weight"].shape == (N, 8, 6)  # the rest still reads


def test_cli_on_the_s3_url_answers_as_on_the_local_store(
    runs, options, endpoint, tmp_path, capsys, monkeypatch
):
    opts = ["--storage-options", json.dumps(options)]

    def call(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    text = call("inspect", runs["url"], *opts)
    assert (
        "epochs committed: [0, 1]" in text
        and f"bytes on disk: {open_store(runs['url'], options).nbytes_stored():,}" in text
    )
    for command in (("topk", "--query", "0,3", "--k", "5"), ("self-influence", "--top", "10")):
        remote = call(command[0], runs["url"], *command[1:], *opts, "--format", "csv")
        assert remote == call(command[0], runs["local"], *command[1:], "--format", "csv")
        assert len(remote.splitlines()) > 5
    for where, args in (("remote", [runs["url"], *opts]), ("local", [runs["local"]])):
        call("export", *args, "--epoch", "1", "--output", tmp_path / f"{where}.parquet", "--quiet")
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "remote.parquet"), pd.read_parquet(tmp_path / "local.parquet")
    )
    # The standard AWS environment variables, which s3fs reads, stand in for --storage-options.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert "OK" in call("verify", runs["url"], "--quiet")
    assert main(["verify", runs["url"], "--storage-options", "{endpoint"]) == 2  # not JSON: a usage error
    assert "--storage-options: not JSON" in capsys.readouterr().err


# ---------------------------------------------------------------- commits
def test_an_epoch_stopped_mid_way_is_hidden_and_resuming_completes_it(tmp_path, options, s3):
    torch.manual_seed(0)
    x, y = data(n=10)
    url, ckpts = f"s3://{BUCKET}/resume.zarr", tmp_path / "ckpt"
    policy = {"precision": "int8"}
    log = StepLog()
    # 2 batches an epoch; a checkpoint after step 3 (epoch 1, batch 0); the run dies right after it.
    first = trainer(
        [GradientCapture(url, policy, storage_options=options), log,
         ModelCheckpoint(dirpath=ckpts, every_n_train_steps=3, save_last=True), Crash(at_step=3)],
        max_epochs=2, enable_checkpointing=True,
    )  # fmt: skip
    with pytest.raises(SimulatedCrash):
        first.fit(Task(mlp()), loader(x, y, batch_size=5, shuffle=False))
    # Epoch 1's chunks are in the bucket (the checkpoint at step 3 flushed them), its commit is not.
    assert any("/c/" in k for k in objects(s3, "resume.zarr/epochs/00001"))
    assert epoch_states(url, options) == {0: "committed", 1: "open"}
    store = open_store(url, options)
    assert store.epochs == [0]
    with pytest.raises(StoreReadError, match="Epoch 1 is not committed"):
        store.sample_ids(1)
    report = verify(url, options)
    assert report.ok and report.epochs_open == [1] and "epoch 1 is open" in report.notes[0]

    resumed_at = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    assert resumed_at == 3
    log2 = StepLog()
    second = trainer([GradientCapture(url, policy, storage_options=options), log2], max_epochs=2)
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
        second.fit(Task(mlp()), loader(x, y, batch_size=5, shuffle=False), ckpt_path=ckpts / "last.ckpt")
    store = open_store(url, options)
    assert store.epochs == [0, 1]
    trained = {**{s: ids for s, ids in log.ids.items() if s < resumed_at}, **log2.ids}
    assert {**rows_by_step(store, 0), **rows_by_step(store, 1)} == trained  # every step once
    assert np.isfinite(np.asarray(store.norms(1))).all()
    assert verify(url, options).ok


def test_epochs_appended_by_another_writer_are_seen_by_open_readers(options):
    url = f"s3://{BUCKET}/append.zarr"
    torch.manual_seed(0)
    x, y = data(n=N)
    trainer([GradientCapture(url, {**EXACT, "epochs": [0]}, storage_options=options)], max_epochs=1).fit(
        Task(mlp()), loader(x, y)
    )
    reader = open_store(url, options)
    assert reader.epochs == [0]
    # Another writer, with its own connection and caches, as another process would have.
    own = {**options, "skip_instance_cache": True}
    ref = Reference()
    capture = GradientCapture(url, {**EXACT, "epochs": [1]}, mode="append", storage_options=own)
    trainer([ref, capture], max_epochs=2).fit(Task(mlp()), loader(x, y))
    assert reader.epochs == [0, 1]
    again = open_store(url, options)
    assert again.epochs == [0, 1]
    ids = again.sample_ids(1).tolist()
    torch.testing.assert_close(again.restore(1, "net.2", ids)["weight"], ref.stacked(1, ids, "net.2.weight"))


# ---------------------------------------------------------------- refusals
class Steps(L.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_start(self, *args) -> None:
        self.count += 1


def test_a_prefix_holding_other_objects_is_refused_and_kept(options, s3):
    s3.put_object(Bucket=BUCKET, Key="data/keep.txt", Body=b"precious")
    x, y = data(n=8)
    for mode in ("error", "overwrite", "append"):
        steps = Steps()
        cap = GradientCapture(f"s3://{BUCKET}/data", EXACT, mode=mode, storage_options=options)
        with pytest.raises(StoreExistsError, match="exists and is not a gradient store"):
            trainer([cap, steps]).fit(Task(mlp()), loader(x, y))
        assert steps.count == 0
    assert s3.get_object(Bucket=BUCKET, Key="data/keep.txt")["Body"].read() == b"precious"


def test_a_missing_bucket_fails_before_training(options):
    x, y = data(n=8)
    steps = Steps()
    cap = GradientCapture("s3://no-such-bucket/run.zarr", EXACT, storage_options=options)
    with pytest.raises(
        StoreWriteError,
        match=r"no-such-bucket.*bucket does not exist.*Check that the bucket \(or folder\) exists",
    ):
        trainer([cap, steps]).fit(Task(mlp()), loader(x, y))
    assert steps.count == 0
    for missing in ("s3://no-such-bucket/run.zarr", f"s3://{BUCKET}/nothing-here.zarr"):
        with pytest.raises(StoreReadError, match="is not a Zarr group"):
            open_store(missing, options)


# ---------------------------------------------------------------- reports and Dask
def test_reports_of_an_s3_store_are_written_to_the_working_directory(options, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = data(n=16)
    url = f"s3://{BUCKET}/reported.zarr"
    cap = GradientCapture(url, EXACT, storage_options=options, analytics=["norms"])
    trainer([cap]).fit(Task(mlp()), loader(x, y))
    summary = json.loads((tmp_path / "reported.report" / "epoch_00000" / "summary.json").read_text())
    assert [a["status"] for a in summary["analytics"]] == ["ok"]
    assert url in (tmp_path / "reported.html").read_text(encoding="utf-8")
    in_bucket = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="reported")["Contents"]]
    assert in_bucket and all(k.startswith("reported.zarr/") for k in in_bucket)  # no report files there


@pytest.mark.filterwarnings("ignore:Couldn't detect a suitable IP address:RuntimeWarning")  # the guard
def test_dask_workers_open_the_s3_store_by_url(runs, options):
    distributed = pytest.importorskip("distributed")
    from mstore_lightning.analytics import dask_engine

    store = open_store(runs["url"], options)
    dask_engine._open.cache_clear()
    # Workers in threads, to keep the test quick: each task still opens the store from its URL and
    # storage options (test_dask.py runs worker processes on a local store).
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as dask,
    ):
        np.testing.assert_allclose(store.norms(1, client=dask), store.norms(1), rtol=1e-12)
        ids = store.sample_ids(1)
        np.testing.assert_allclose(
            store.dot(1, ids[:3], ids, client=dask), store.dot(1, ids[:3], ids), rtol=1e-5, atol=1e-7
        )
    assert dask_engine._open.cache_info().misses >= 1  # the tasks opened the store from its URL


def test_a_file_url_is_the_same_store_as_its_path(tmp_path):
    """fsspec's ``file://`` goes through the URL path of the library, folders made as needed."""
    torch.manual_seed(0)
    x, y = data(n=8)
    path = tmp_path / "deep" / "run.zarr"
    ref = Reference()
    trainer([ref, GradientCapture(path.as_uri(), EXACT)]).fit(Task(mlp()), loader(x, y))
    by_url, by_path = open_store(path.as_uri()), open_store(path)
    assert by_url.epochs == by_path.epochs == [0]
    assert by_url.nbytes_stored() == by_path.nbytes_stored() == sum(map(len, local_files(path).values()))
    ids = by_url.sample_ids(0).tolist()
    torch.testing.assert_close(by_url.restore(0, "net.0", ids)["weight"], ref.stacked(0, ids, "net.0.weight"))
    assert verify(path.as_uri()).ok
