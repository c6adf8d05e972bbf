"""Epoch-end reports in a worker process, so training does not wait for them.

Rendering figures and reading the store are CPU work in Python; in a thread they would hold the
GIL that the training loop needs. One spawned worker process (spawned, not forked: the trainer
has threads, and a forked copy of a held lock never comes free) opens the store read-only, runs
the analytics on each committed epoch in order, and writes the report files. What goes to the
loggers comes back as a :class:`~mstore_lightning.reports.loggers.RecordingSink` and is replayed
in the training process, at the step the epoch ended on, the next time the callback looks.

A spawned process imports the main script again before it runs anything. A script whose training
is not under ``if __name__ == "__main__":`` would train again in the worker (and overwrite the
store); for such a script the worker is started without it, and what is defined only there (a
dataset class, for image grids) is left out of the reports, with a warning.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import multiprocessing
import pickle
import sys
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mstore_lightning.reports.loggers import LoggerSink, RecordingSink
from mstore_lightning.reports.runner import EpochReporter, item_getter, warn_about

log = logging.getLogger(__name__)

_WORKER: dict[str, Any] = {}  # the worker process's reporter, store and dataset


class BackgroundReports:
    """Runs an :class:`EpochReporter` in a worker process.

    Args:
        reporter: the reporter to run there (it travels once, at start).
        store: the store's URL or path.
        storage_options: fsspec options of a URL store.
        dataset: the training dataset, for image grids; left behind if it does not pickle.
    """

    def __init__(
        self, reporter: EpochReporter, store: str, storage_options: dict | None, dataset: Any = None
    ) -> None:
        try:
            sent = pickle.dumps(dataset) if dataset is not None else None
        except Exception:  # noqa: BLE001 - any unpicklable dataset just means no image grid
            sent = None
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(reporter, store, storage_options, sent),
        )
        self._pending: deque[tuple[int, int, Future]] = deque()
        # The worker starts now, while the first epoch trains (a spawning pool starts it at a submit).
        unguarded = main_script_runs_on_import()
        if unguarded:
            warnings.warn(
                f"The main script {unguarded} runs its training when imported (it has no "
                '`if __name__ == "__main__":` block), so the report worker is started without importing '
                "it: anything defined only there (a dataset class, for image grids) is left out of the "
                "reports. Put the training under that block to keep it.",
                stacklevel=2,
            )
        with _main_hidden() if unguarded else contextlib.nullcontext():
            self._pool.submit(_warm_up)

    def submit(self, epoch: int, step: int, epoch_seconds: float, left_out: list[int]) -> None:
        try:
            job = self._pool.submit(_report, epoch, step, epoch_seconds, left_out)
        except Exception as exc:  # noqa: BLE001 - a worker that died: this report is lost, not training
            job = Future()
            job.set_exception(exc)
        self._pending.append((epoch, step, job))

    def drain(self, loggers: Any, wait: bool = False) -> list[dict[str, Any]]:
        """Sends finished reports to ``loggers``, oldest first; with ``wait``, all of them.

        Returns one summary per finished report, a lost one included (with a ``failed`` entry)."""
        done = []
        while self._pending and (wait or self._pending[0][2].done()):
            epoch, step, future = self._pending.popleft()
            try:
                summary, recording = future.result()
            except Exception as exc:  # noqa: BLE001 - a lost report must not stop training
                log.warning(
                    "mstore epoch %d: the report process failed: %s: %s", epoch, type(exc).__name__, exc
                )
                done.append(
                    {
                        "epoch": epoch,
                        "seconds": 0.0,
                        "total_seconds": 0.0,
                        "analytics": [],
                        "failed": str(exc),
                    }
                )
                continue
            recording.replay(LoggerSink(loggers, step, epoch))
            warn_about(summary)
            done.append(summary)
        return done

    def close(self, loggers: Any = None, wait: bool = True) -> list[dict[str, Any]]:
        """Finishes (``wait``) or abandons the pending reports and stops the worker."""
        done = self.drain(loggers or [], wait=True) if wait else []
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        return done


def main_script_runs_on_import() -> str | None:
    """The path of the main script when importing it runs its top level unguarded (no module-level
    ``if __name__ == "__main__":``), as a spawned process would; ``None`` otherwise."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path is None:  # an interactive session or a notebook: nothing to import again
        return None
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    return None if any(isinstance(n, ast.If) and _is_main_test(n.test) for n in tree.body) else path


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = {s.id for s in sides if isinstance(s, ast.Name)}
    values = {s.value for s in sides if isinstance(s, ast.Constant)}
    return names == {"__name__"} and values == {"__main__"}


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Processes spawned inside do not import the main module (spawn finds it by these two names)."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _start(reporter: EpochReporter, store: str, storage_options: dict | None, dataset: bytes | None) -> None:
    import torch

    # One thread: the trainer's threads already fill the cores, and OpenMP threads spinning against
    # them make each small operation here tens of times slower.
    torch.set_num_threads(1)
    _WORKER.update(reporter=reporter, uri=store, options=storage_options, store=None, dataset=None)
    with contextlib.suppress(Exception):  # e.g. its class lives in a module the worker cannot import
        _WORKER["dataset"] = pickle.loads(dataset) if dataset is not None else None  # else no image grids


def _warm_up() -> None:
    # Imports and the font cache cost seconds once; pay them before the first epoch ends.
    from mstore_lightning.reports import figures, html  # noqa: F401

    figures.Figures().conflict_heatmap([[1.0]], [0], 0)


def _report(
    epoch: int, step: int, epoch_seconds: float, left_out: list[int]
) -> tuple[dict[str, Any], RecordingSink]:
    from mstore_lightning.facade import open_store
    from mstore_lightning.reports.session import CACHE_BYTES

    if _WORKER["store"] is None:  # one reader for the whole run: its caches serve later epochs
        _WORKER["store"] = open_store(_WORKER["uri"], _WORKER["options"], cache_bytes=CACHE_BYTES)
    dataset = _WORKER["dataset"]
    sink = RecordingSink()
    summary = _WORKER["reporter"].report(
        _WORKER["store"],
        epoch,
        sink,
        step=step,
        sample_input=item_getter(dataset),
        epoch_seconds=epoch_seconds,
        left_out=left_out,
    )
    return summary, sink
