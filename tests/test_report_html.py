"""The HTML report of a real run: its sections, embedded figures and tables, escaping of every text,
refused file names, atomic rewrites, and a render in headless Chromium."""

from __future__ import annotations

import base64
import csv
import html
import importlib.util
import json
import os
import shutil
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import EXACT, Task, loader, trainer
from test_capture_fit import data
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.reports import ReportPaths, report_paths
from mstore_lightning.reports.html import MAX_TABLE_ROWS, write_report
from mstore_lightning.store import layout

EVIL = "<script>alert(1)</script>\"&'"
# Module names cannot hold dots, and a slash would nest Zarr groups: the rest of the markup can.
EVIL_LAYER = "in<img src=x onerror=alert(1)>\"&'"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render_report.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    x, y = data(n=30)
    layers = OrderedDict([(EVIL_LAYER, nn.Linear(6, 8)), ("act", nn.ReLU()), ("out", nn.Linear(8, 3))])
    model = type(EVIL, (Task,), {})(nn.Sequential(layers))  # the model's class name is recorded too
    trainer([GradientCapture(path / "run.zarr", policy=EXACT)], max_epochs=2).fit(model, loader(x, y))
    store = open_store(path / "run.zarr")
    paths = report_paths(store.uri)
    # What escapes the epoch folder: embedding either would leak a file the summary does not own.
    outside = paths.root.parent / "etc" / "passwd.png"
    outside.parent.mkdir()
    _png(outside, "outside")
    (paths.root / "x.csv").parent.mkdir(parents=True)
    (paths.root / "x.csv").write_text("secret\nSECRET-CELL\n")
    summaries = {ep: write_epoch(paths, store, ep, outside) for ep in store.epochs}
    return store, paths, summaries, write_report(store)


def write_epoch(paths: ReportPaths, store, epoch: int, outside: Path) -> dict:
    """The files epoch-end analytics leave: real figures and tables, plus hostile and broken entries."""
    folder = paths.epoch_dir(epoch)
    folder.mkdir(parents=True)
    norms = np.asarray(store.norms(epoch))
    ids = store.sample_ids(epoch)
    _png(folder / "norms_hist.png", f"Gradient norms, epoch {epoch}", norms)
    order = np.argsort(norms)[::-1][:10]
    _csv(
        folder / "norms_top.csv", ["id", "norm", "label"], [[ids[i], f"{norms[i]:.6f}", EVIL] for i in order]
    )
    _csv(folder / "long.csv", ["row", "square"], [[i, i * i] for i in range(MAX_TABLE_ROWS + 70)])
    (folder / "not_png.png").write_text("not an image")
    (folder / "link.png").symlink_to(outside)
    summary = {
        "epoch": epoch,
        "global_step": 4 * (epoch + 1),
        "written": "2026-11-23T10:00:00+00:00",
        "analytics": [
            {
                "name": "norms",
                "params": {"layers": None},
                "status": "ok",
                "seconds": 0.0123,
                "note": None,
                "scalars": {"norms/mean": float(norms.mean()), "norms/max": float(norms.max())},
                "figures": [{"file": "norms_hist.png", "title": f"Gradient norms, epoch {epoch}"}],
                "tables": [
                    {"file": "norms_top.csv", "title": f"Largest norms, epoch {epoch}"},
                    {"file": "long.csv", "title": f"Long table, epoch {epoch}"},
                ],
            },
            {
                "name": EVIL,
                "params": {"label": EVIL},
                "status": "failed",
                "seconds": 0.5,
                "note": EVIL,
                "scalars": {EVIL: 1.0},
                "figures": [
                    {"file": "../../etc/passwd.png", "title": "relative escape"},
                    {"file": str(outside), "title": "absolute escape"},
                    {"file": "link.png", "title": "link escape"},
                    {"file": "missing.png", "title": "missing"},
                    {"file": "not_png.png", "title": "not a png"},
                ],
                "tables": [
                    {"file": "../x.csv", "title": "table escape"},
                    {"file": "gone.csv", "title": "gone"},
                ],
            },
            {
                "name": "cluster",
                "params": {"k": 10},
                "status": "skipped",
                "seconds": 0.0,
                "note": "needs sklearn",
            },
        ],
    }
    paths.write_summary(epoch, summary)
    return summary


def test_sections_and_run_metadata(run):
    store, _, _, out = run
    page = Page(out.read_text(encoding="utf-8"))
    assert {"run", "storage", "analytics", "epoch-00000", "epoch-00001"} <= page.ids
    facts = dict(page.table("run-facts"))
    assert facts["Model"] == EVIL
    assert facts["Committed epochs"] == "0, 1"
    assert facts["Schema version"] == str(store.meta["schema_version"])
    assert "mstore_lightning" in facts["Library versions"]
    epochs = page.table("epochs")[1:]
    assert [r[:4] for r in epochs] == [[str(e), "30", "0", f"{store.lr(e):.4g}"] for e in store.epochs]
    assert "Every selected parameter is captured." in page.text


def test_storage_has_one_row_per_layer_and_a_total(run):
    store, _, _, out = run
    rows = Page(out.read_text(encoding="utf-8")).table("storage-table")
    head, body, total = rows[0], rows[1:-1], rows[-1]
    assert [r[0] for r in body] == store.layers
    col = {name: i for i, name in enumerate(head)}
    for row, layer in zip(body, store.layers):
        spec = store.layer_spec(layer)
        assert row[col["Stored as"]] == spec["choice"]["kept"] == "factors"
        assert row[col["Precision"]] == "float32"
        numel = sum(int(np.prod(spec["param_shapes"][p])) for p in spec["params"])
        full = 4 * numel * sum(len(store.sample_ids(e)) for e in store.epochs)
        assert row[col["Smaller by"]] == f"{full / store.nbytes_stored(layer=layer):,.1f}×"
    # The first layer sees the same inputs each epoch: the second epoch stores them as references.
    assert body[0][col["Dedup saved"]] != "—" and body[1][col["Dedup saved"]] == "—"
    assert total[0] == "Total"


def test_epochs_newest_first_with_status_scalars_figures_and_tables(run):
    _, paths, summaries, out = run
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    starts = [a["id"] for tag, a in page.tags if tag == "details"]
    assert starts == ["epoch-00001", "epoch-00000"]
    assert "open" in page.attrs_of("details", "epoch-00001") and "open" not in page.attrs_of(
        "details", "epoch-00000"
    )
    assert [t for t, a in page.tags if t == "span" and "status" in a.get("class", "")]
    images = {a["alt"]: a["src"] for tag, a in page.tags if tag == "img"}
    assert len(images) == len(summaries)  # only the genuine figure of each epoch
    for ep, summary in summaries.items():
        fig = summary["analytics"][0]["figures"][0]
        src = images[fig["title"]]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data == (paths.epoch_dir(ep) / fig["file"]).read_bytes()
        with open(paths.epoch_dir(ep) / "norms_top.csv", newline="") as f:
            expected = list(csv.reader(f))
        # The page shows floats at 6 significant digits; the CSV file keeps them all.
        shown = [t for t in page.tables if [r[0] for r in t] == [r[0] for r in expected]]
        assert len(shown) == 1 and len(shown[0]) == len(expected)
        for got, want in zip(shown[0][1:], expected[1:]):
            assert got[0] == want[0] and got[2] == want[2]
            assert float(got[1]) == pytest.approx(float(want[1]), rel=1e-5) and len(got[1]) <= 8
        long = [["row", "square"], *[[str(i), str(i * i)] for i in range(MAX_TABLE_ROWS)]]
        assert long in page.tables
        assert (
            "norms/mean" in page.text
            and f"{summary['analytics'][0]['scalars']['norms/max']:.4g}" in page.text
        )
    assert "70 more rows of 'long.csv' are not shown" in page.text
    assert "needs sklearn" in page.text


def test_every_text_is_escaped_and_nothing_loads_or_runs(run):
    _, _, _, out = run
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert "<script" not in text.lower() and "onerror" not in {k for _, a in page.tags for k in a}
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    assert html_escaped(EVIL) in text and html_escaped(EVIL_LAYER) in text
    assert page.text.count(EVIL) >= 6  # model, analytic name, params, note, scalar, CSV cells
    assert EVIL_LAYER in page.text
    for tag, attrs in page.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs
        if "src" in attrs:
            assert tag == "img" and attrs["src"].startswith("data:image/png;base64,"), attrs
    assert "url(" not in page.style and "@import" not in page.style


def test_file_names_outside_the_epoch_folder_are_refused(run):
    _, paths, _, out = run
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    outside = base64.b64encode((paths.root.parent / "etc" / "passwd.png").read_bytes()).decode()
    assert outside not in text and "SECRET-CELL" not in page.text
    for name in (
        "'../../etc/passwd.png'",
        "'../x.csv'",
        f"{str(paths.root.parent / 'etc' / 'passwd.png')!r}",
    ):
        assert f"{name} is not shown: its name leads outside the epoch folder" in page.text
    assert "'link.png' is not shown: it links outside the epoch folder" in page.text
    assert "'missing.png' is not shown: the file is missing" in page.text
    assert "'gone.csv' is not shown: the file is missing" in page.text
    assert "'not_png.png' is not shown: it is not a PNG file" in page.text


def test_rewrite_is_atomic_and_idempotent(run, monkeypatch):
    store, _, _, out = run
    first = out.read_bytes()
    real_replace, moves = os.replace, []

    def replace(src, dst):
        assert Path(dst).read_bytes() == first  # the old page stays whole until the rename
        moves.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert write_report(store.uri) == out
    assert out.read_bytes() == first
    [(src, dst)] = moves
    assert dst == out and src.parent == out.parent and src != out and not src.exists()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(store)
    assert out.read_bytes() == first
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_out_and_report_dir(run, tmp_path):
    store, _, _, _ = run
    target = write_report(store, out=tmp_path / "nested" / "page.html")
    assert target == tmp_path / "nested" / "page.html" and target.is_file()
    elsewhere = write_report(store, report_dir=tmp_path)
    assert elsewhere == tmp_path / "run.html"
    assert "No analytics summary yet" in Page(elsewhere.read_text(encoding="utf-8")).text


def test_a_store_without_committed_epochs(run, tmp_path):
    store, _, _, _ = run
    empty = tmp_path / "empty.zarr"
    shutil.copytree(store.uri, empty)
    for group in (empty / "epochs").iterdir():
        if group.is_dir():
            shutil.rmtree(group)
    # As a run that has not committed an epoch yet leaves it: no epochs in its committed list either.
    root_json = empty / "zarr.json"
    root = json.loads(root_json.read_text())
    meta = {k: v for k, v in root["attributes"][layout.META_KEY].items() if k != "committed"}
    root["attributes"] = layout.with_crc({layout.META_KEY: meta})
    root_json.write_text(json.dumps(root))
    assert open_store(empty).epochs == []
    page = Page(write_report(empty).read_text(encoding="utf-8"))
    assert "No epoch is committed yet" in page.text and "No analytics summary yet" in page.text
    assert [r[0] for r in page.table("storage-table")[1:-1]] == store.layers


def test_renders_in_headless_chromium(run, tmp_path):
    render = _load_script()
    if render.find_chromium() is None:
        pytest.skip("Chromium is not installed; install it with `apt-get install -y chromium`.")
    png = render.render_png(run[3], tmp_path / "page.png", width=1280, height=2000)
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert pixels.std() > 0.05
    assert 1 - counts.max() / counts.sum() > 0.02  # more than 2% of the page is not background


# -------------------------------------------------------------------- helpers
class Page(HTMLParser):
    """Start tags, visible text and table cells of an HTML page, entities decoded."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.tables: list[list[list[str]]] = []
        self._table_ids: dict[str, int] = {}
        self._text: list[str] = []
        self._style: list[str] = []
        self._in: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    @property
    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def style(self) -> str:
        return "".join(self._style)

    def table(self, table_id: str) -> list[list[str]]:
        return self.tables[self._table_ids[table_id]]

    def attrs_of(self, tag: str, element_id: str) -> dict[str, str]:
        return next(a for t, a in self.tags if t == tag and a.get("id") == element_id)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "table":
            if "id" in attrs:
                self._table_ids[attrs["id"]] = len(self.tables)
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "style":
            self._in = "style"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "style":
            self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self._style.append(data)
            return
        self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def html_escaped(text: str) -> str:
    return html.escape(text, quote=True)


def _png(path: Path, title: str, values: np.ndarray | None = None) -> None:
    fig, ax = plt.subplots(figsize=(4, 3), dpi=60)
    ax.hist(values if values is not None else np.arange(10), bins=10)
    ax.set_title(title)
    fig.savefig(path, format="png")
    plt.close(fig)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _load_script():
    spec = importlib.util.spec_from_file_location("render_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_is_written_with_the_process_umask(tmp_path):
    import os
    import stat

    from mstore_lightning.reports.artifacts import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "r.html", "<html></html>")
        assert stat.S_IMODE((tmp_path / "r.html").stat().st_mode) == 0o644
        os.umask(0o077)
        write_atomic(tmp_path / "s.html", "<html></html>")
        assert stat.S_IMODE((tmp_path / "s.html").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob("*.partial"))
