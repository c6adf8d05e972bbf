"""Where a run's reports live, and the record each epoch's analytics leave behind.

For a store at ``runs/demo.zarr`` the reports sit beside it::

    runs/demo.html                         the self-contained HTML report, rewritten each epoch
    runs/demo.report/
      epoch_00003/
        summary.json                       what ran this epoch (the schema below)
        <analytic>_<name>.png              figures, one file each
        <analytic>_<name>.csv              tables, one file each

``summary.json`` is plain JSON::

    {"epoch": 3, "global_step": 460, "written": "2026-11-23T10:00:00+00:00",
     "analytics": [
        {"name": "self_influence", "params": {"k": 20}, "status": "ok",   # ok | skipped | failed
         "seconds": 0.012, "note": null,                                   # why it was skipped or failed
         "scalars": {"self_influence/flagged_share": 0.1},
         "figures": [{"file": "self_influence_scores.png", "title": "..."}],
         "tables": [{"file": "self_influence_topk.csv", "title": "..."}]}]}

A remote store (``s3://...``) keeps its reports in the working directory, under the store's name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

SUMMARY = "summary.json"


@dataclass(frozen=True)
class ReportPaths:
    """The report locations of one run.

    Attributes:
        root: directory holding one folder of artifacts per epoch.
        html: the HTML report.
    """

    root: Path
    html: Path

    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:05d}"

    def epochs(self) -> list[int]:
        """Epochs with a summary on disk, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            name = entry.name
            if name.startswith("epoch_") and name[6:].isdigit() and (entry / SUMMARY).is_file():
                found.append(int(name[6:]))
        return sorted(found)

    def clear(self) -> None:
        """Removes the reports of a store that has been replaced, so that a new run's report never
        shows an old run's epochs. Only the HTML file and the epoch folders go; anything else a user
        put in the folder stays."""
        self.html.unlink(missing_ok=True)
        for epoch in self.epochs():
            shutil.rmtree(self.epoch_dir(epoch))
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def read_summary(self, epoch: int) -> dict[str, Any]:
        with open(self.epoch_dir(epoch) / SUMMARY, encoding="utf-8") as f:
            return json.load(f)

    def write_summary(self, epoch: int, summary: dict[str, Any]) -> Path:
        """Writes ``summary.json`` atomically, so a reader never sees half of it."""
        folder = self.epoch_dir(epoch)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SUMMARY
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=_plain), encoding="utf-8")
        os.replace(tmp, path)
        return path


def report_paths(store: str | os.PathLike, report_dir: str | os.PathLike | None = None) -> ReportPaths:
    """The report locations of the store at ``store``.

    Args:
        store: the store's path or URL.
        report_dir: where to put the reports instead of beside the store.

    Example:
        >>> report_paths("runs/demo.zarr").html.as_posix()
        'runs/demo.html'
    """
    text = os.fspath(store)
    parsed = urlparse(text)
    remote = len(parsed.scheme) > 1 and parsed.scheme != "file"
    local = Path(parsed.path if parsed.scheme == "file" else text)
    name = Path(parsed.path.rstrip("/")).name if remote else local.name
    stem = name[: -len(".zarr")] if name.endswith(".zarr") and len(name) > 5 else name
    parent = Path(report_dir) if report_dir is not None else (Path.cwd() if remote else local.parent)
    return ReportPaths(root=parent / f"{stem}.report", html=parent / f"{stem}.html")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in a summary become JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _umask() -> int:
    """The process umask: read from /proc where it can be (setting it to read it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(target: Path, text: str) -> None:
    """Writes ``text`` to ``target`` with the mode ``open()`` would give it, all at once."""
    # A unique temporary name in the target's folder: a reader never sees half a page, and two
    # writers never share a partial file.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp makes the file 0600; a report is shared like any file open() would write.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
