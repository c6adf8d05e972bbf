"""Hostile stores and configs: a pickle payload is never executed, YAML tags never construct objects."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import yaml

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.config import CapturePolicy, PolicyError
from mstore_lightning.store import StoreReadError
from mstore_lightning.store.verify import verify
from test_store import fit_store


class _Payload:
    """Unpickling this runs ``os.system`` and leaves a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _first_chunk(array_dir: Path) -> Path:
    chunk = next((array_dir / "c").iterdir())
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    return chunk


def _read_everything(path: Path) -> None:
    store = open_store(path)
    for e in store.epochs:
        store.norms(e)
        store.restore(e, "net.0", store.sample_ids(e)[:4])


@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "s.zarr"
    fit_store(path)
    return path, tmp_path / "PWNED"


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # what a reader that unpickled would do
    assert marker.exists()


def test_a_pickle_payload_in_place_of_a_chunk_is_reported_not_run(stored):
    path, marker = stored
    _first_chunk(path / "epochs/00000/r0/layers/net.0/a").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(StoreReadError, match=r"net\.0/a"):
        _read_everything(path)
    assert not verify(path).ok
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit",
    [
        # a codec that would unpickle its chunks, and an object dtype that would need one
        lambda meta: meta.update(codecs=[{"name": "numcodecs.pickle", "configuration": {}}]),
        lambda meta: meta.update(data_type="|O"),
    ],
    ids=["pickle-codec", "object-dtype"],
)
def test_metadata_asking_for_unpickling_is_refused(stored, edit):
    path, marker = stored
    array_dir = path / "epochs/00000/r0/layers/net.0/a"
    meta_file = array_dir / "zarr.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    _first_chunk(array_dir).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(StoreReadError, match=r"net\.0/a"):
        _read_everything(path)
    assert not verify(path).ok
    assert not marker.exists()


def test_no_file_in_a_store_is_a_pickle(stored):
    path, _ = stored
    for f in path.rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:2]
            assert not (head[:1] == b"\x80" and head[1:2] in {bytes([p]) for p in range(2, 6)}), f


HOSTILE_YAML = "precision: !!python/object/apply:os.system ['touch {marker}']\n"


def test_a_yaml_policy_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "policy.yaml"
    path.write_text(HOSTILE_YAML.format(marker=marker))
    with pytest.raises((PolicyError, yaml.YAMLError)):
        CapturePolicy.from_yaml(path)
    with pytest.raises((PolicyError, yaml.YAMLError, ValueError)):
        GradientCapture(tmp_path / "s.zarr", policy=str(path))
    assert not marker.exists()


def test_a_yaml_analytics_spec_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "analytics.yaml"
    path.write_text(f"- norms: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises((ValueError, yaml.YAMLError)):
        GradientCapture(tmp_path / "s.zarr", analytics=str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("- norms\n- self_influence: !!python/object/apply:os.system ['true']\n", 2, "constructor"),
        ("- norms\n- self_influence: {k: 5\n", 3, "expected ',' or '}'"),
    ],
    ids=["python tag", "syntax error"],
)
def test_a_bad_yaml_analytics_spec_is_an_analytics_error_naming_file_and_line(tmp_path, text, line, problem):
    from mstore_lightning.reports.spec import AnalyticsError, parse_analytics

    path = tmp_path / "analytics.yaml"
    path.write_text(text)
    with pytest.raises(AnalyticsError) as info:
        parse_analytics(str(path))
    message = str(info.value)
    assert message.startswith(f"The analytics file {str(path)!r}, line {line}: "), message
    assert problem in message
    assert isinstance(info.value.__cause__, yaml.YAMLError)
