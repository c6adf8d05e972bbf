"""The self-contained HTML report of a run: its metadata, its storage, and each epoch's analytics.

The page opens from disk with no server and no network: the CSS is inline, figures are embedded as
``data:`` URIs and tables are written out, and a Content-Security-Policy forbids anything else. Every
text it shows comes from the store or the report folder (layer names, notes, CSV cells) and is
escaped; a summary's file names are followed only inside their own epoch folder.

Example::

    write_report("runs/demo.zarr")  # writes and returns runs/demo.html
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mstore_lightning.facade import GradientStore, explain_decision, open_store
from mstore_lightning.reports.artifacts import ReportPaths, report_paths, write_atomic

MAX_TABLE_ROWS = 50  # rows of a CSV table shown; the rest are counted
MAX_TABLE_COLUMNS = 30
MAX_FIGURE_BYTES = 16 << 20  # a larger figure would make the page unwieldy
# A number, with the units this page writes: right-aligned and kept on one line.
_NUMERIC = re.compile(r"[-+]?(\d[\d,]*)?\.?\d+([eE][-+]?\d+)?( ?(×|B|KiB|MiB|GiB|TiB|s))?|[-+]?(nan|inf)")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_STATUSES = ("ok", "skipped", "failed")
_FP32_BYTES = 4
_EPOCH_COLUMNS = (
    "Epoch",
    "Training rows",
    "Query rows",
    "Learning rate",
    "Recomputed layers",
    "Rows stored as references",
)
_STORAGE_COLUMNS = (
    "Layer", "Module", "Stored as", "Parameters", "Precision", "Raw B/sample", "Rows stored", "On disk",
    "Full fp32", "Smaller by", "Dedup saved", "Notes",
)  # fmt: skip


def write_report(
    store: str | os.PathLike | GradientStore,
    report_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """(Re)writes the run's HTML report, atomically, and returns its path.

    The same store and report folder give the same bytes, so rewriting after every epoch is cheap to
    diff and safe to repeat.

    Args:
        store: the store, or its path or URL.
        report_dir: the folder holding the reports, when not beside the store (see
            :func:`~mstore_lightning.reports.artifacts.report_paths`).
        out: where to write the HTML instead of the default ``report_paths(store, report_dir).html``.

    Returns:
        The path of the HTML file.

    Raises:
        ValueError: ``store`` is a :class:`GradientStore` without a URI and ``out`` is not given.
    """
    gs = store if isinstance(store, GradientStore) else open_store(store)
    if not gs.uri and out is None:
        raise ValueError("`out` is needed for a GradientStore opened without a URI.")
    paths = report_paths(gs.uri or "store", report_dir)
    target = Path(out) if out is not None else paths.html
    write_atomic(target, render_report(gs, paths))
    return target


def render_report(store: GradientStore, paths: ReportPaths) -> str:
    """The report page of ``store`` with the analytics found under ``paths.root``, as HTML text."""
    name = paths.html.stem
    epochs = store.epochs
    # The tables count every epoch's rows: its metadata in one trip for all epochs, not a few each.
    store.preload(epochs)
    store.preload(epochs, split="query")
    body = [
        _header(store, name),
        "<main>",
        _run_section(store),
        _storage_section(store),
        _analytics_section(paths),
        "</main>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # Defence in depth: even text that escaped escaping could load nothing and run nothing.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(name)} · gradient capture report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# -------------------------------------------------------------------- run metadata
def _header(store: GradientStore, name: str) -> str:
    links = " ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (("run", "Run"), ("storage", "Storage"), ("analytics", "Analytics"))
    )
    return (
        f"<header><h1>{_e(name)}</h1>"
        f'<p class="sub">Gradient capture report of <code>{_e(store.uri)}</code></p>'
        f"<nav>{links}</nav></header>"
    )


def _run_section(store: GradientStore) -> str:
    meta, epochs = store.meta, store.epochs
    versions = meta.get("versions") or {}
    facts = [
        ("Store", store.uri),
        ("Model", meta.get("model")),
        ("Created", meta.get("created")),
        ("Schema version", meta.get("schema_version")),
        ("Processes", meta.get("world_size")),
        ("Loss reduction", meta.get("loss_reduction")),
        ("Committed epochs", ", ".join(map(str, epochs)) or "none"),
        (
            "Library versions",
            ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else versions,
        ),
    ]
    out = ['<section class="card" id="run"><h2>Run</h2>', _kv_table(facts, "run-facts")]
    out.append("<h3>Epochs</h3>")
    if epochs:
        out.append(_epochs_table(store, epochs))
    else:
        out.append(_note("No epoch is committed yet: training has not finished a captured epoch."))
    out.append("<h3>Capture policy</h3>")
    out.append(_kv_grid(sorted(store.policy.items()), "policy"))
    out.append("<h3>Not captured</h3>")
    if store.uncovered:
        items = [
            f"<li><code>{_e(u.get('module'))}</code> {{{_e(', '.join(map(str, u.get('params', []))))}}} "
            f"({_e(u.get('numel'))} numbers): {_e(u.get('reason'))}</li>"
            for u in store.uncovered
        ]
        out.append(f'<ul class="uncovered">{"".join(items)}</ul>')
    else:
        out.append('<p class="muted">Every selected parameter is captured.</p>')
    out.append("</section>")
    return "\n".join(out)


def _epochs_table(store: GradientStore, epochs: Sequence[int]) -> str:
    rows = []
    for ep in epochs:
        dups = sum(d.get("duplicates", 0) for d in store.dedup_stats(ep).values())
        queries = store.row_count(ep, "query")
        recomputed = ", ".join(store.recomputed(ep)) or "—"
        rows.append([ep, store.row_count(ep), queries, f"{store.lr(ep):.4g}", recomputed, _count(dups)])
    return _table_html(_EPOCH_COLUMNS, rows, table_id="epochs")


# -------------------------------------------------------------------- storage
def _storage_section(store: GradientStore) -> str:
    dedup = _dedup_by_layer(store.dedup_saved())
    rows, stored, full, saved = [], 0, 0, 0
    for layer in store.layers:
        spec = store.layer_spec(layer)
        choice = spec.get("choice") or {}
        nrows = _rows_stored(store, layer)
        layer_stored = store.nbytes_stored(layer=layer)
        layer_full = _full_fp32_bytes(spec) * nrows
        stored, full = stored + layer_stored, full + layer_full
        saved += max(0, dedup.get(layer, {}).get("disk_bytes", 0))
        encodings = sorted({str(a.get("encoding")) for a in spec.get("arrays", {}).values()})
        rows.append(
            [
                layer,
                spec.get("module_type"),
                choice.get("kept", spec.get("representation")),
                ", ".join(spec.get("params", [])),
                "/".join(encodings),
                f"{choice.get('bytes_per_sample', 0):,}",
                f"{nrows:,}",
                _bytes(layer_stored),
                _bytes(layer_full),
                _ratio(layer_full, layer_stored),
                _dedup_text(dedup.get(layer)),
                "; ".join(_layer_notes(store, layer, spec)),
            ]
        )
    total = ["Total", *[""] * 6, _bytes(stored), _bytes(full), _ratio(full, stored)]
    total += [_bytes(saved) if saved else "—", ""]
    out = ['<section class="card" id="storage"><h2>Storage</h2>']
    if rows:
        out.append(_table_html(_STORAGE_COLUMNS, rows, table_id="storage-table", foot=total))
    else:
        out.append(_note("No layer is captured."))
    out.append(
        f'<p class="muted">Whole store on disk: {_e(_bytes(store.nbytes_stored()))} (row records, '
        "metadata and recompute weights included). “Full fp32” is what the same rows would take as "
        "uncompressed float32 per-sample gradients; “Smaller by” is its ratio to the bytes on disk; "
        "“Dedup saved” estimates the bytes on disk that rows stored as references saved (the rows times "
        "the array's bytes on disk per row stored in place, less the references), with the number of "
        "such rows.</p>"
    )
    out.append("</section>")
    return "\n".join(out)


def _rows_stored(store: GradientStore, layer: str) -> int:
    """Training and query rows of ``layer`` in the epochs that stored it (not recomputed)."""
    kept = [ep for ep in store.epochs if layer not in store.recomputed(ep)]
    return sum(store.row_count(ep) + store.row_count(ep, "query") for ep in kept)


def _full_fp32_bytes(spec: dict[str, Any]) -> int:
    """Bytes of one uncompressed float32 per-sample gradient of the layer's captured parameters."""
    shapes = spec.get("param_shapes") or {}
    return _FP32_BYTES * sum(math.prod(shapes.get(p, [0])) for p in spec.get("params", []))


def _dedup_by_layer(stats: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    # Keys are "<layer>/<array>"; module names hold dots, not slashes, so the last slash splits them.
    out: dict[str, dict[str, int]] = {}
    for key, s in stats.items():
        into = out.setdefault(key.rpartition("/")[0], {})
        for k, v in s.items():
            into[k] = into.get(k, 0) + int(v)
    return out


def _dedup_text(stats: dict[str, int] | None) -> str:
    if not stats or not stats.get("rows_as_references"):
        return "—"
    disk = stats.get("disk_bytes", -1)
    shown = f"≈{_bytes(disk)} on disk" if disk >= 0 else "not estimable on disk"
    return f"{shown} ({stats['rows_as_references']:,} rows as references)"


def _layer_notes(store: GradientStore, layer: str, spec: dict[str, Any]) -> list[str]:
    notes = []
    reason = (spec.get("choice") or {}).get("reason")
    if reason:
        notes.append(str(reason))
    approximate = store.approximate(layer)  # why its results are estimates, if they are
    if approximate:
        notes.append(f"approximate: {approximate}")
    decision = store.meta.get("recompute", {}).get(layer)
    if decision:
        try:
            notes.append(f"store or recompute: {explain_decision(decision)}")
        except (KeyError, TypeError, ValueError):
            notes.append(f"store or recompute: {json.dumps(decision, sort_keys=True, default=str)}")
    return notes


# -------------------------------------------------------------------- analytics
def _analytics_section(paths: ReportPaths) -> str:
    out = ['<section class="card" id="analytics"><h2>Analytics</h2>']
    epochs = paths.epochs()
    if not epochs:
        out.append(_note(f"No analytics summary yet in {paths.root}."))
    for i, ep in enumerate(reversed(epochs)):  # newest first, the newest unfolded
        out.append(_epoch_block(paths, ep, unfold=i == 0))
    out.append("</section>")
    return "\n".join(out)


def _epoch_block(paths: ReportPaths, epoch: int, unfold: bool) -> str:
    head = f'<details class="epoch" id="epoch-{epoch:05d}"{" open" if unfold else ""}>'
    try:
        summary = paths.read_summary(epoch)
    except (OSError, ValueError) as exc:
        return _unreadable(head, epoch, str(exc))
    if not isinstance(summary, dict):
        return _unreadable(head, epoch, "it is not a JSON object")
    records = summary.get("analytics")
    records = records if isinstance(records, list) else []
    statuses = [r.get("status") for r in records if isinstance(r, dict)]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in _STATUSES if s in statuses)
    title = [f"Epoch {epoch}"]
    if summary.get("global_step") is not None:
        title.append(f"step {summary['global_step']}")
    title.append(
        f"{len(records)} analytic{'' if len(records) == 1 else 's'}" + (f" ({counts})" if counts else "")
    )
    parts = [head, f"<summary>{_e(' · '.join(map(str, title)))}</summary>", '<div class="body">']
    if summary.get("written"):
        parts.append(f'<p class="muted">Written {_e(summary["written"])}</p>')
    if not records:
        skipped = summary.get("skipped")
        parts.append(
            _note(skipped if isinstance(skipped, str) else "This epoch's summary lists no analytics.")
        )
    folder = paths.epoch_dir(epoch)
    for i, rec in enumerate(records):
        parts.append(
            _analytic_block(folder, rec) if isinstance(rec, dict) else _note(f"Entry {i} is not a record.")
        )
    parts.append("</div></details>")
    return "\n".join(parts)


def _unreadable(head: str, epoch: int, why: str) -> str:
    note = _note(f"summary.json of epoch {epoch} could not be read: {why}")
    return f'{head}<summary>Epoch {epoch}</summary><div class="body">{note}</div></details>'


def _analytic_block(folder: Path, rec: dict[str, Any]) -> str:
    status = rec.get("status")
    badge = status if status in _STATUSES else "unknown"
    seconds = rec.get("seconds")
    timing = f' <span class="muted secs">{seconds:.3g} s</span>' if _is_real(seconds) else ""
    name = _e(rec.get("name", "(unnamed)"))
    out = [f'<div class="analytic"><h3>{name} <span class="status {badge}">{_e(status)}</span>{timing}</h3>']
    if rec.get("params"):
        out.append(f'<p class="params">Parameters: <code>{_e(_plain(rec["params"]))}</code></p>')
    if rec.get("note"):
        out.append(_note(rec["note"]))
    scalars = rec.get("scalars")
    if isinstance(scalars, dict) and scalars:
        out.append(
            _table_html(["Scalar", "Value"], [[k, _number(v)] for k, v in scalars.items()], css="scalars")
        )
    for fig in _entries(rec.get("figures")):
        out.append(_figure(folder, fig))
    for tab in _entries(rec.get("tables")):
        out.append(_csv_table(folder, tab))
    out.append("</div>")
    return "\n".join(out)


def _figure(folder: Path, entry: dict[str, Any]) -> str:
    name = entry.get("file")
    title = entry.get("title") or name
    path, why = _resolve(folder, name)
    if path is None:
        return _note(f"Figure {name!r} is not shown: {why}.")
    try:
        if path.stat().st_size > MAX_FIGURE_BYTES:
            return _note(f"Figure {name!r} is not shown: it is larger than {_bytes(MAX_FIGURE_BYTES)}.")
        data = path.read_bytes()
    except OSError as exc:
        return _note(f"Figure {name!r} is not shown: {_os_reason(exc)}.")
    if not data.startswith(_PNG_MAGIC):
        return _note(f"Figure {name!r} is not shown: it is not a PNG file.")
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{src}" alt="{_e(title)}"><figcaption>{_e(title)}</figcaption></figure>'


def _csv_table(folder: Path, entry: dict[str, Any]) -> str:
    name = entry.get("file")
    title = entry.get("title") or name
    heading = f"<h4>{_e(title)}</h4>"
    path, why = _resolve(folder, name)
    if path is None:
        return heading + _note(f"Table {name!r} is not shown: {why}.")
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(itertools.islice(reader, MAX_TABLE_ROWS))
            left_out = sum(1 for _ in reader)
    except (OSError, csv.Error) as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else f"it is not valid CSV ({exc})"
        return heading + _note(f"Table {name!r} is not shown: {reason}.")
    if header is None:
        return heading + _note(f"Table {name!r} is empty.")
    out = [heading]
    width = max(len(r) for r in [header, *rows])
    if width > MAX_TABLE_COLUMNS:
        header, rows = header[:MAX_TABLE_COLUMNS], [r[:MAX_TABLE_COLUMNS] for r in rows]
        out.append(_note(f"Only the first {MAX_TABLE_COLUMNS} of {width} columns of {name!r} are shown."))
    rows = [[_short(cell) for cell in row] for row in rows]
    out.append(f'<div class="tall">{_table_html(header, rows, css="data")}</div>')
    if left_out:
        out.append(_note(f"{left_out:,} more rows of {name!r} are not shown (first {MAX_TABLE_ROWS} above)."))
    return "\n".join(out)


def _short(cell: str) -> str:
    """A CSV float at 6 significant digits (the file keeps them all); anything else as it is."""
    if ("." in cell or "e" in cell.lower()) and _looks_numeric(cell):
        try:
            return f"{float(cell):.6g}"
        except ValueError:
            return cell
    return cell


def _resolve(folder: Path, name: Any) -> tuple[Path | None, str]:
    """``folder / name`` when it stays inside ``folder``; otherwise ``None`` and why not."""
    if not isinstance(name, str) or not name:
        return None, "the summary gives no file name"
    rel = Path(name)
    if "\x00" in name or "\\" in name or rel.is_absolute() or ".." in rel.parts:
        return None, "its name leads outside the epoch folder, so it was refused"
    path = folder / rel
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        return None, "it links outside the epoch folder, so it was refused"
    return path, ""


def _entries(value: Any) -> list[dict[str, Any]]:
    """A summary's figure or table list; a bare file name stands for ``{"file": name}``."""
    if not isinstance(value, list):
        return []
    return [v if isinstance(v, dict) else {"file": v} for v in value]


# -------------------------------------------------------------------- HTML pieces
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _kv_table(items: Iterable[tuple[Any, Any]], table_id: str) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_plain(v))}</td></tr>" for k, v in items)
    return f'<table class="kv" id="{table_id}"><tbody>{rows}</tbody></table>'


def _kv_grid(items: Iterable[tuple[Any, Any]], element_id: str) -> str:
    """Many short facts, flowed into columns."""
    cells = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(_plain(v))}</dd></div>" for k, v in items)
    return f'<dl class="grid" id="{element_id}">{cells}</dl>'


def _table_html(
    head: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    table_id: str | None = None,
    css: str | None = None,
    foot: Sequence[Any] | None = None,
) -> str:
    def row(cells: Sequence[Any], tag: str = "td") -> str:
        return "<tr>" + "".join(_cell(c, tag) for c in cells) + "</tr>"

    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{css}"' if css else "")
    body = "".join(row(r) for r in rows)
    tfoot = f"<tfoot>{row(foot)}</tfoot>" if foot is not None else ""
    return (
        f'<div class="scroll"><table{attrs}><thead>{row(head, "th")}</thead>'
        f"<tbody>{body}</tbody>{tfoot}</table></div>"
    )


def _cell(value: Any, tag: str) -> str:
    text = _plain(value)
    numeric = tag == "td" and _looks_numeric(text)
    css = ' class="num"' if numeric else ""
    return f"<{tag}{css}>{_e(text)}</{tag}>"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "—"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=isinstance(value, dict), default=str)
    return str(value)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not _is_real(value):
        return _plain(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _looks_numeric(text: str) -> bool:
    return _NUMERIC.fullmatch(text.strip()) is not None


def _bytes(n: float) -> str:
    if n < 10_000:
        return f"{int(n):,} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
    return f"{n} B"  # unreachable: TiB returns above


def _count(n: int) -> str:
    return f"{n:,}" if n else "—"


def _ratio(full: int, stored: int) -> str:
    return f"{full / stored:,.1f}×" if stored > 0 and full > 0 else "—"


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file is missing"
    return f"it could not be read ({exc.strerror or exc})"


_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #f6f8fa; color: #1f2328;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif; }
header { background: #24292f; color: #fff; padding: 20px 32px 12px; }
header h1 { margin: 0; font-size: 26px; word-break: break-word; }
header .sub { margin: 4px 0 10px; color: #c9d1d9; font-size: 14px; }
header code { background: #32383f; color: #e6edf3; }
nav a { color: #9ecbff; margin-right: 18px; text-decoration: none; font-weight: 600; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 32px 48px; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 12px 24px 16px;
  margin: 20px 0; }
h2 { font-size: 21px; margin: 4px 0 12px; padding-bottom: 6px; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 17px; margin: 18px 0 6px; }
h4 { font-size: 15px; margin: 14px 0 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top;
  overflow-wrap: break-word; }
thead th { background: #eaeef2; font-weight: 600; }
tbody tr:nth-child(even) { background: #f6f8fa; }
tfoot td { background: #eaeef2; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tall .scroll { max-height: 32em; overflow-y: auto; }  /* a long table scrolls, not the page */
.tall thead th { position: sticky; top: 0; }
table.kv th { background: #f6f8fa; width: 12em; }
table.kv td { font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", monospace; font-size: 13px; }
#storage-table td:last-child { min-width: 12em; color: #57606a; font-size: 13px; }
dl.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(15em, 1fr)); gap: 6px 16px;
  margin: 6px 0 12px; }
dl.grid > div { border-left: 3px solid #d0d7de; padding: 0 0 0 8px; }
dl.grid dt { color: #57606a; font-size: 12.5px; }
dl.grid dd { margin: 0; font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", monospace;
  font-size: 13px; overflow-wrap: anywhere; }
code { font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", monospace; font-size: 13px;
  background: #f6f8fa; padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
.muted { color: #57606a; }
.note { background: #fff8c5; border: 1px solid #eedc82; border-radius: 6px; color: #4d3c00;
  padding: 6px 10px; margin: 8px 0; overflow-wrap: anywhere; }
details.epoch { border: 1px solid #d0d7de; border-radius: 8px; margin: 12px 0; background: #fff; }
details.epoch > summary { cursor: pointer; padding: 10px 16px; font-size: 16px; font-weight: 600;
  background: #f6f8fa; border-radius: 8px; }
details.epoch > .body { padding: 4px 24px 12px; }
.analytic { border-top: 1px solid #eaeef2; margin-top: 8px; }
.status { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px; font-weight: 600;
  vertical-align: middle; }
.status.ok { background: #dafbe1; color: #116329; }
.status.skipped { background: #eaeef2; color: #57606a; }
.status.failed { background: #ffebe9; color: #a40e26; }
.status.unknown { background: #fff8c5; color: #4d3c00; }
.secs { font-size: 13px; font-weight: normal; }
figure { margin: 12px 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 4px; }
figcaption { color: #57606a; font-size: 13px; margin-top: 4px; }
"""
