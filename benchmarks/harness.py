"""What several benchmark scripts share: timing a call, and running another version of the package.

Example::

    wall, cpu, result = timed(lambda: store.topk([3], k=10))
    with tempfile.TemporaryDirectory() as tmp:
        before = unpack(ROOT, "762d107", Path(tmp))       # that commit's package under tmp
        done = run_python(Path(tmp), ["-c", "import mstore_lightning"], check=True)
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and process CPU seconds of ``fn()`` and its result.

    Garbage is collected first so none lands inside. CPU time (all threads, zarr's included) is kept
    beside the wall time because the machine is shared: other work slows the wall clock more.
    """
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def git(*args: str, cwd: Path = ROOT, check: bool = True) -> str:
    """``git`` in ``cwd``; its standard output, stripped."""
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True).stdout.strip()


def unpack(repo: Path, commit: str, into: Path) -> str:
    """The package at ``commit`` of ``repo``, unpacked under ``into``; returns the commit's short hash."""
    short = git("rev-parse", "--short", commit, cwd=repo)
    archive = into / "tree.tar"
    git("archive", "-o", str(archive), short, "mstore_lightning", cwd=repo)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return short


def run_python(package_root: Path, argv: list[str], check: bool = False) -> subprocess.CompletedProcess:
    """A fresh Python process on ``argv`` that imports the package under ``package_root``.

    It runs from ``package_root``: ``python -c`` puts the working directory first on ``sys.path``.
    """
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run(
        [sys.executable, *argv], env=env, cwd=package_root, capture_output=True, text=True, check=check
    )
