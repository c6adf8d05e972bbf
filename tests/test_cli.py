"""The ``mstore`` command on a real store: inspect, verify on damaged copies, queries against the Python API."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from helpers import EXACT, Task, loader, reseal, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_capture_fit import data, mlp

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.cli import main
from mstore_lightning.store.verify import verify

COMMANDS = ("inspect", "verify", "topk", "tracin", "self-influence", "report", "export")
QUERIES = [0, 3]  # query sample ids: the store captures query samples 0..3 at each epoch's end


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run.zarr"
    torch.manual_seed(0)
    x, y = data(n=24)
    qx, qy = data(n=4, seed=5)
    # Small chunks, so every array has several and damage hits one chunk among others.
    cap = GradientCapture(
        path, policy=EXACT, chunk_bytes=256, query=loader(qx, qy, batch_size=4, shuffle=False)
    )
    trainer([cap], max_epochs=3).fit(Task(mlp()), loader(x, y))
    return path


@pytest.fixture(scope="module")
def store(store_path):
    return open_store(store_path)


@pytest.fixture
def copy(store_path, tmp_path):
    """A fresh copy of the store, to damage."""
    return Path(shutil.copytree(store_path, tmp_path / "copy.zarr"))


def call(capsys, *args) -> tuple[int, str, str]:
    """Runs ``mstore`` in this process: exit status, stdout, stderr."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# Runs one command, then prints which heavy libraries it imported.
IMPORTS = (
    "import sys, json\n"
    "from mstore_lightning.cli import main\n"
    "command, store = sys.argv[1:]\n"
    "try:\n"
    "    main([command] if command == '--help' else [command, store])\n"
    "except SystemExit:\n"  # --help exits
    "    pass\n"
    "print(json.dumps([m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules]))\n"
)


def spawn(*args, script: bool = False) -> subprocess.CompletedProcess:
    """Runs ``mstore`` as a user does: the console script, or ``python -m mstore_lightning.cli``;
    ``("imports", command, store)`` runs one command and prints the heavy libraries it imported."""
    if args and args[0] == "imports":
        head, args = [sys.executable, "-c", IMPORTS], args[1:]
    elif script:
        head = [str(Path(sys.executable).parent / "mstore")]
    else:
        head = [sys.executable, "-m", "mstore_lightning.cli"]
    return subprocess.run([*head, *map(str, args)], check=False, capture_output=True, text=True, timeout=300)


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mstore: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------- subprocesses (started together)
@pytest.fixture(scope="module")
def spawned(store_path, tmp_path_factory):
    """Every subprocess run of this module, started at once: each pays the package's import time."""
    flipped = Path(shutil.copytree(store_path, tmp_path_factory.mktemp("spawn") / "flipped.zarr"))
    chunk = flipped / "epochs/00001/r0/layers/net.2/d/c/1/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    chunk.write_bytes(bytes(raw))
    runs = {
        "help": (("--help",), True),
        "verify_flipped": (("verify", flipped), False),
        "topk_json": (("topk", store_path, "--query", "0,3", "--k", "5", "--format", "json"), True),
        "bad_path": (("inspect", store_path.parent / "missing.zarr"), False),
        **{f"imports_{c}": (("imports", c, store_path), False) for c in ("inspect", "verify", "--help")},
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(spawn, *args, script=script) for name, (args, script) in runs.items()}
        return {name: f.result() for name, f in futures.items()}


def test_help_lists_every_subcommand(spawned, capsys):
    run = spawned["help"]
    assert run.returncode == 0
    for command in COMMANDS:
        assert f"    {command}" in run.stdout
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: mstore {command}" in out and "examples:" in out


@pytest.mark.parametrize("command", ["inspect", "verify", "--help"])
def test_metadata_commands_start_without_torch(spawned, command):
    """``inspect``, ``verify`` and the help read metadata only: torch, Lightning and matplotlib,
    most of a command's start-up, are never imported."""
    run = spawned[f"imports_{command}"]
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    if command != "--help":
        assert ("OK" if command == "verify" else "epochs committed: [0, 1, 2]") in run.stdout


def test_a_bad_path_is_one_line_without_traceback(spawned):
    run = spawned["bad_path"]
    assert run.returncode == 1 and run.stdout == ""
    assert_one_line_error(run.stderr, "missing.zarr", "does not exist")


@pytest.mark.parametrize(
    ("args", "status", "needles"),
    [
        (("topk", "{store}", "--query", "0", "--k", "five"), 2, ("--k", "five")),
        (("topk", "{store}", "--query", "0,x"), 2, ("--query", "0,x")),
        (("tracin", "{store}"), 2, ("--query",)),
        (("frobnicate", "{store}"), 2, ("frobnicate",)),
        (("inspect", "{store}", "--storage-options", "[1]"), 2, ("JSON object",)),
        (("tracin", "{store}", "--query", "999"), 1, ("[999]",)),
        (("topk", "{store}", "--query", "0", "--epoch", "7"), 1, ("Epoch 7",)),
        (("self-influence", "{store}", "--layers", "net.9"), 1, ("net.9",)),
        (("export", "{store}", "--output", "{tmp}/rows.txt"), 2, ("rows.txt", "--format")),
        (("inspect", "{tmp}"), 1, ("not a Zarr group",)),
        (("verify", "{tmp}"), 1, ("no Zarr group",)),
    ],
    ids=[
        "k not a number",
        "id not a number",
        "no query",
        "unknown command",
        "storage options not an object",
        "unknown id",
        "unknown epoch",
        "unknown layer",
        "unknown export format",
        "inspect a plain folder",
        "verify a plain folder",
    ],
)
def test_wrong_input_is_one_line(capsys, store_path, tmp_path, args, status, needles):
    code, out, err = call(capsys, *(a.format(store=store_path, tmp=tmp_path) for a in args))
    assert code == status and out == ""
    assert_one_line_error(err, *needles)


def test_verify_subprocess_fails_on_a_flipped_byte(spawned):
    run = spawned["verify_flipped"]
    assert run.returncode == 1
    assert_one_line_error(run.stderr, "epochs/00001/r0/layers/net.2/d", "chunk c/1/0/0", "checksum")
    assert "DAMAGED" in run.stdout


def test_topk_subprocess_json_equals_the_api(spawned, store):
    run = spawned["topk_json"]
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    want = store.topk(QUERIES, 5)
    assert [r["query"] for r in rows] == np.repeat(QUERIES, 5).tolist()
    assert [r["id"] for r in rows] == want.ids.reshape(-1).tolist()
    np.testing.assert_allclose([r["score"] for r in rows], want.scores.reshape(-1), rtol=1e-12)


# ---------------------------------------------------------------- inspect and verify
def test_inspect_prints_layers_and_epochs(capsys, store_path, store):
    code, out, _ = call(capsys, "inspect", store_path)
    assert code == 0
    assert "epochs committed: [0, 1, 2]" in out
    for layer in store.layers:
        assert f"{layer} (Linear)" in out
    table = out.split("per epoch:\n")[1].split("\n\n")[0].splitlines()
    assert table[0].split()[:4] == ["epoch", "state", "rows", "query_rows"]
    assert [line.split()[:4] for line in table[1:]] == [[str(e), "committed", "24", "4"] for e in range(3)]


def test_verify_passes_on_a_clean_store(capsys, store_path):
    code, out, err = call(capsys, "verify", store_path)
    assert code == 0 and err == ""
    assert ": OK" in out
    seen = []
    report = verify(store_path, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and report.problems == [] and report.notes == []
    assert seen == [(i + 1, report.chunks_checked) for i in range(report.chunks_checked)]
    assert report.epochs_committed == [0, 1, 2] and report.epochs_open == []
    chunk_files = [p for p in store_path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    arrays = [p for p in store_path.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "array"]
    assert report.arrays_checked == len(arrays)
    # every chunk file is decoded, and the unwritten chunks of deduplicated inputs are counted too
    assert report.chunks_checked > len(chunk_files)


def _flip(root: Path) -> None:
    chunk = root / "epochs/00000/r0/layers/net.0/d/c/2/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x01
    chunk.write_bytes(bytes(raw))


def _truncate(root: Path) -> None:
    chunk = root / "epochs/00002/r0/rows/loss/c/1"
    chunk.write_bytes(chunk.read_bytes()[:-5])


def _delete_metadata(root: Path) -> None:
    (root / "epochs/00001/r0/layers/net.2/a/zarr.json").unlink()


def _lie_about_shape(root: Path) -> None:
    edit_json(root / "epochs/00001/r0/layers/net.2/d/zarr.json", lambda m: m["shape"].__setitem__(0, 30))


def _drop_commit(root: Path) -> None:
    # What a crash between an epoch's data and its commit leaves: the attributes the epoch began with.
    edit_json(root / "epochs/00001/zarr.json", lambda m: m.update(attributes={"state": "open", "epoch": 1}))


def _break_reference(root: Path) -> None:
    refs = zarr.open_array(root / "epochs/00002/r0/layers/net.0/a_ref", mode="r+")
    refs[5] = [7, 0, 3]  # epoch 7 does not exist
    reseal(root, "epochs/00002/r0/layers/net.0/a_ref/c/1/0")  # as a faulty writer would have stored it


def _swap_epochs(root: Path) -> None:
    shutil.copyfile(root / "epochs/00002/r0/rows/ids/c/0", root / "epochs/00001/r0/rows/ids/c/0")


def _swap_arrays(root: Path) -> None:
    shutil.copyfile(root / "epochs/00001/r0/rows/step/c/1", root / "epochs/00001/r0/rows/ids/c/1")


def _delete_chunk(root: Path) -> None:
    (root / "epochs/00000/r0/layers/net.0/a/c/1/0/0").unlink()  # epoch 0 stores every input in place


DAMAGE = {
    "flipped byte": (_flip, "epochs/00000/r0/layers/net.0/d", "c/2/0/0", "checksum"),
    "truncated chunk": (_truncate, "epochs/00002/r0/rows/loss", "c/1", "checksum"),
    "deleted zarr.json": (_delete_metadata, "epochs/00001/r0/layers/net.2/a", None, "zarr.json is missing"),
    "shape lie": (_lie_about_shape, "epochs/00001/r0/layers/net.2/d", None, "30 rows where"),
    "missing commit": (_drop_commit, "epochs/00001", None, "missing commit"),
    "broken reference": (
        _break_reference,
        "epochs/00002/r0/layers/net.0/a_ref",
        "c/1/0",
        "epoch 7 does not exist",
    ),
    "deleted chunk": (_delete_chunk, "epochs/00000/r0/layers/net.0/a", "c/1/0/0", "missing"),
    "chunk from another epoch": (_swap_epochs, "epochs/00001/r0/rows/ids", "c/0", "copied from another"),
    "chunk from another array": (_swap_arrays, "epochs/00001/r0/rows/ids", "c/1", "copied from another"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_the_damage(capsys, copy, damage):
    harm, array, chunk, what = DAMAGE[damage]
    harm(copy)
    code, out, err = call(capsys, "verify", copy)
    assert code == 1
    where = f"{array}, chunk {chunk}" if chunk else f"{array}:"
    assert_one_line_error(err, where, what)
    assert "DAMAGED, 1 problem(s)" in out
    report = verify(copy)
    assert [(p.array, p.chunk) for p in report.problems] == [(array, chunk)]


def _as_if_still_running(root: Path) -> None:
    """Epoch 2 as a capture still writing it leaves it: open, and not yet in the run's committed list."""
    from mstore_lightning.store import layout

    edit_json(root / "epochs/00002/zarr.json", lambda m: m.update(attributes={"state": "open", "epoch": 2}))

    def unlist(m):
        meta = dict(m["attributes"][layout.META_KEY], committed=[0, 1])
        m["attributes"] = layout.with_crc({layout.META_KEY: meta})

    edit_json(root / "zarr.json", unlist)


def test_an_open_last_epoch_is_a_note_not_damage(capsys, copy):
    _as_if_still_running(copy)
    code, out, err = call(capsys, "verify", copy)
    assert code == 0 and err == ""
    report = verify(copy)
    assert report.ok and report.epochs_committed == [0, 1] and report.epochs_open == [2]
    assert "epoch 2 is open" in report.notes[0] and "note: epoch 2 is open" in out
    code, out, _ = call(capsys, "inspect", copy)
    assert code == 0 and "epochs committed: [0, 1]" in out
    states = [line.split()[:3] for line in out.split("per epoch:\n")[1].splitlines()[1:4]]
    assert states == [["0", "committed", "24"], ["1", "committed", "24"], ["2", "open", "-"]]


def test_queries_on_a_damaged_chunk_fail_in_one_line(capsys, copy):
    _flip(copy)
    # Each chunk read is checked against its manifest, so the error names the damaged chunk itself.
    code, _, err = call(capsys, "topk", copy, "--query", "0", "--k", "3", "--epoch", "0")
    assert code == 1
    assert_one_line_error(err, "Chunk epochs/00000/r0/layers/net.0/d/c/2/0/0: crc32c checksum mismatch")
    # Self-influence reads the squared norms kept at capture, not the damaged factor chunk.
    code, out, err = call(capsys, "self-influence", copy)
    assert (
        code == 0 and err == "self-influence: showing the top 20 of 24 (--top N or --all for more)\n" and out
    )


@pytest.fixture(scope="module")
def scratch(store_path, tmp_path_factory):
    return Path(shutil.copytree(store_path, tmp_path_factory.mktemp("flips") / "s.zarr"))


@settings(max_examples=12, deadline=None)
@given(pick=st.integers(0, 10**6), at=st.integers(0, 10**6), bits=st.integers(1, 255))
def test_any_flipped_byte_is_found_in_its_chunk(scratch, pick, at, bits):
    chunks = sorted(
        p for p in scratch.rglob("*") if p.is_file() and p.name != "zarr.json" and "/c/" in p.as_posix()
    )
    target = chunks[pick % len(chunks)]
    original = target.read_bytes()
    raw = bytearray(original)
    raw[at % len(raw)] ^= bits
    target.write_bytes(bytes(raw))
    try:
        report = verify(scratch)
    finally:
        target.write_bytes(original)
    array, chunk = target.relative_to(scratch).as_posix().split("/c/")
    assert [(p.array, p.chunk) for p in report.problems] == [(array, "c/" + chunk)]


# ---------------------------------------------------------------- queries against the Python API
def _read(out: str, fmt: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.DataFrame(json.loads(out))


def _labels(store, epoch: int, ids, split: str = "train") -> list[int]:
    have = store.sample_ids(epoch, split).tolist()
    return [int(store.row_field(epoch, "label", split)[have.index(i)]) for i in ids]


@pytest.mark.parametrize("fmt", ["csv", "json"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_topk_equals_the_api(capsys, store_path, store, fmt, metric):
    code, out, _ = call(
        capsys,
        "topk",
        store_path,
        "--query",
        "0,3",
        "--k",
        4,
        "--epoch",
        1,
        "--metric",
        metric,
        "--format",
        fmt,
    )
    assert code == 0
    got, want = _read(out, fmt), store.topk(QUERIES, 4, epoch=1, metric=metric)
    assert (
        got["query"].tolist() == np.repeat(QUERIES, 4).tolist() and got["rank"].tolist() == [1, 2, 3, 4] * 2
    )
    assert got["id"].tolist() == want.ids.reshape(-1).tolist()
    np.testing.assert_allclose(got["score"], want.scores.reshape(-1), rtol=1e-12)
    assert got["label"].tolist() == _labels(store, 1, got["id"])
    assert got["query_label"].tolist() == _labels(store, 1, got["query"], "query")
    have = store.sample_ids(1).tolist()
    np.testing.assert_allclose(got["loss"], [store.row_field(1, "loss")[have.index(i)] for i in got["id"]])


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_tracin_equals_the_api(capsys, store_path, store, fmt, tmp_path):
    out_file = tmp_path / f"tracin.{fmt}"
    code, _, err = call(capsys, "tracin", store_path, "--query", "1", "2", "--output", out_file)
    assert code == 0 and f"wrote 40 rows to {out_file}" in err  # the top 20 of each query by default
    assert "tracin: showing the top 20 of 24 (--top N or --all for more)" in err
    code, _, err = call(capsys, "tracin", store_path, "--query", "1", "2", "--all", "--output", out_file)
    assert code == 0 and f"wrote 48 rows to {out_file}" in err and "showing every one" in err
    got = _read(out_file.read_text(), fmt)
    want = store.tracin([1, 2])  # one call over every epoch; the command sums epoch by epoch
    for q, query in enumerate([1, 2]):
        mine = got[got["query"] == query]
        assert mine["rank"].tolist() == list(range(1, 25))
        assert (np.diff(mine["score"]) <= 0).all()
        scores = dict(zip(want.ids.tolist(), want.scores[q]))
        np.testing.assert_allclose(mine["score"], [scores[i] for i in mine["id"]], rtol=1e-12)
        assert mine["label"].tolist() == _labels(store, 2, mine["id"])
    code, out, _ = call(
        capsys,
        "tracin",
        store_path,
        "--query",
        "1",
        "--epochs",
        "0,2",
        "--layers",
        "net.2",
        "--top",
        3,
        "--format",
        fmt,
    )
    part, want = _read(out, fmt), store.tracin([1], epochs=[0, 2], layers=["net.2"])
    top = np.argsort(-want.scores[0], kind="stable")[:3]
    assert part["id"].tolist() == want.ids[top].tolist()
    np.testing.assert_allclose(part["score"], want.scores[0][top], rtol=1e-12)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_self_influence_equals_the_api(capsys, store_path, store, fmt):
    code, out, err = call(capsys, "self-influence", store_path, "--format", fmt)
    assert code == 0 and "showing the top 20 of 24" in err
    assert len(_read(out, fmt)) == 20
    code, out, _ = call(capsys, "self-influence", store_path, "--format", fmt, "--all")
    assert code == 0
    got, want = _read(out, fmt), store.self_influence()
    order = np.argsort(-want.scores, kind="stable")
    assert got["id"].tolist() == want.ids[order].tolist()
    np.testing.assert_allclose(got["score"], want.scores[order], rtol=1e-12)
    assert got["label"].tolist() == _labels(store, 2, got["id"])
    code, out, _ = call(
        capsys,
        "self-influence",
        store_path,
        "--epochs",
        "1",
        "--layers",
        "net.0",
        "--top",
        5,
        "--format",
        fmt,
    )
    got, want = _read(out, fmt), store.self_influence(epochs=[1], layers=["net.0"])
    order = np.argsort(-want.scores, kind="stable")[:5]
    assert got["id"].tolist() == want.ids[order].tolist()
    np.testing.assert_allclose(got["score"], want.scores[order], rtol=1e-12)


# ---------------------------------------------------------------- export and report
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("split", ["train", "query"])
def test_export_round_trips(capsys, store_path, store, tmp_path, fmt, split):
    path = tmp_path / f"rows.{fmt}"
    code, _, err = call(capsys, "export", store_path, "--epoch", 1, "--split", split, "--output", path)
    assert code == 0 and "wrote" in err
    got = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
    np.testing.assert_array_equal(got["id"], store.sample_ids(1, split))
    for name in ("step", "label"):
        np.testing.assert_array_equal(got[name], store.row_field(1, name, split))
    np.testing.assert_allclose(got["loss"], store.row_field(1, "loss", split), equal_nan=True)
    np.testing.assert_allclose(got["norm"], store.norms(1, split=split), rtol=1e-12)
    for layer in store.layers:
        np.testing.assert_allclose(got[f"norm[{layer}]"], store.norms(1, [layer], split=split), rtol=1e-12)


def test_export_factors_to_parquet(capsys, store_path, store, tmp_path):
    path = tmp_path / "factors.parquet"
    code, _, _ = call(
        capsys, "export", store_path, "--epoch", 2, "--layers", "net.0", "--factors", "--output", path
    )
    assert code == 0
    got = pd.read_parquet(path)
    ids = store.sample_ids(2)
    assert "norm[net.2]" not in got
    for name, values in store.factors(2, "net.0", ids).items():
        np.testing.assert_array_equal(np.stack(got[f"net.0/{name}"]), values.reshape(len(ids), -1).numpy())
    code, _, err = call(capsys, "export", store_path, "--factors", "--output", tmp_path / "f.csv")
    assert code == 2
    assert_one_line_error(err, "--factors needs --format parquet")


def test_report_writes_the_html_report(capsys, store_path, tmp_path):
    out = tmp_path / "report.html"
    code, printed, _ = call(capsys, "report", store_path, "--output", out)
    assert code == 0 and printed.strip() == str(out)
    assert "<html" in out.read_text().lower() and "net.0" in out.read_text()


def test_verify_names_altered_attributes(copy):
    meta_path = copy / "epochs/00001/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["lr"] = meta["attributes"]["lr"] * 10
    meta_path.write_text(json.dumps(meta))
    report = verify(str(copy))
    assert not report.ok
    assert any(p.array == "epochs/00001" and "crc32c" in p.what for p in report.problems), report.summary()


# ---------------------------------------------------------------- pipes and existing files
def test_a_closed_pipe_ends_quietly(store_path):
    """`mstore inspect STORE | head -1`: the reader leaves before the output is written; no
    BrokenPipeError traceback, exit status 141 (128 + SIGPIPE), as for any tool a closed pipe stops.

    The pipe is closed before the command prints (it is still importing): all of inspect's output
    fits in the pipe's buffer, so a reader that first took a line would leave too late to break it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "mstore_lightning.cli", "inspect", str(store_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    status = proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Broken pipe" not in err, err
    assert err == "", err
    assert status == 141  # only the BrokenPipeError handler returns 141: the pipe did break


def test_export_refuses_an_existing_file_without_force(capsys, store_path, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("keep me\n")
    code, out, err = call(capsys, "export", store_path, "--epoch", 1, "--output", path)
    assert code == 2 and out == ""
    assert_one_line_error(err, str(path), "exists", "--force")
    assert path.read_text() == "keep me\n"
    code, _, err = call(capsys, "export", store_path, "--epoch", 1, "--output", path, "--force")
    assert code == 0 and "wrote" in err
    assert pd.read_csv(path)["id"].tolist() == open_store(store_path).sample_ids(1).tolist()
