"""The reports of one ``fit``: run in the training process or in a worker process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mstore_lightning.reports.artifacts import report_paths
from mstore_lightning.reports.loggers import LoggerSink
from mstore_lightning.reports.runner import EpochReporter, warn_about
from mstore_lightning.reports.spec import AnalyticSpec

# Decoded chunks the report's reader keeps: the operators of one epoch read the same rows several
# times (norms, class sums, TracIn), and a chunk read costs far more than its bytes on small stores.
CACHE_BYTES = 64 << 20


class ReportSession:
    """Reports each committed epoch of a run to the trainer's loggers and beside the store.

    Args:
        specs: the analytics to run.
        store: the store's path or URL.
        storage_options: fsspec options of a URL store.
        report_dir: where the report files go instead of beside the store.
        budget_s: seconds one epoch's analytics may take.
        background: run them in a worker process while training goes on (see
            :mod:`~mstore_lightning.reports.background`); otherwise in the training process, which
            waits for them.
        dataset: the training dataset, indexed by sample id, for image grids.
    """

    def __init__(
        self,
        specs: Sequence[AnalyticSpec],
        store: str,
        storage_options: dict | None,
        report_dir: str | os.PathLike | None,
        budget_s: float | None,
        background: bool,
        dataset: Any = None,
    ) -> None:
        self._reporter = EpochReporter(specs, report_paths(store, report_dir), budget_s)
        self._store_args = (store, storage_options)
        self._dataset = dataset
        self._reader: Any = None
        self._background = None
        if background:
            from mstore_lightning.reports.background import BackgroundReports

            self._background = BackgroundReports(self._reporter, store, storage_options, dataset)

    def epoch_done(self, epoch: int, step: int, epoch_seconds: float, loggers: Sequence[Any]) -> None:
        """Reports ``epoch``, which must be committed, now or in the worker."""
        if self._background is not None:
            self._background.drain(loggers)
            self._background.submit(epoch, step, epoch_seconds)
            return
        if self._reader is None:  # one reader for the whole run: its caches serve later epochs
            from mstore_lightning.store.reader import open_store

            self._reader = open_store(*self._store_args, cache_bytes=CACHE_BYTES)
        dataset = self._dataset
        summary = self._reporter.report(
            self._reader,
            epoch,
            LoggerSink(loggers, step, epoch),
            step=step,
            sample_input=dataset.__getitem__ if hasattr(dataset, "__getitem__") else None,
            epoch_seconds=epoch_seconds,
        )
        warn_about(summary)

    def poll(self, loggers: Sequence[Any]) -> None:
        """Sends the worker's finished reports to ``loggers``."""
        if self._background is not None:
            self._background.drain(loggers)

    def close(self, loggers: Sequence[Any] = (), wait: bool = True) -> None:
        """Waits for (``wait``) or abandons the worker's reports."""
        if self._background is not None:
            self._background.close(loggers, wait=wait)
            self._background = None
