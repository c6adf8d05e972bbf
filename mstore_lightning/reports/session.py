"""The reports of one ``fit``: run in the training process or in a worker process, as often as an
overhead limit allows."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from mstore_lightning.reports.artifacts import report_paths
from mstore_lightning.reports.loggers import LoggerSink
from mstore_lightning.reports.operators import cheap_scalars
from mstore_lightning.reports.runner import EpochReporter, item_getter, warn_about
from mstore_lightning.reports.spec import AnalyticSpec

log = logging.getLogger(__name__)

# Decoded chunks the report's reader keeps: the operators of one epoch read the same rows several
# times (norms, class sums, TracIn), and a chunk read costs far more than its bytes on small stores.
CACHE_BYTES = 64 << 20


class ReportSession:
    """Reports committed epochs of a run to the trainer's loggers and beside the store.

    With ``max_overhead``, each epoch's training time earns ``max_overhead`` times itself of report
    time. An epoch is reported when the time earned and not yet spent covers what the last report
    took, its HTML rewrite included; otherwise it is skipped, with a note in its summary. The last epoch is always reported,
    when ``fit`` ends, so the run's final state is never missing. TracIn sums over the reported
    epochs only, as TracInCP sums over its checkpoints: catching up on skipped epochs would spend
    the time the limit saved (``store.tracin`` still sums every epoch). Self-influence, read from
    the norms kept at capture, costs little and sums every epoch.

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
        max_overhead: the share of training time the reports may take, or ``None`` for every epoch.
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
        max_overhead: float | None = None,
    ) -> None:
        self._reporter = EpochReporter(specs, report_paths(store, report_dir), budget_s)
        self._store_args = (store, storage_options)
        self._dataset = dataset
        self._reader: Any = None
        self._background = None
        self.max_overhead = max_overhead
        self._earned = 0.0  # report seconds earned by training and not yet spent
        self._cost = 0.0  # what the last report took
        self._pending: tuple[int, int] | None = None  # the last skipped epoch, for the end of fit
        self._charged: list[float] = []  # estimates charged for the worker's unfinished reports
        self.reported: list[int] = []
        self.skipped: list[int] = []
        if background:
            from mstore_lightning.reports.background import BackgroundReports

            self._background = BackgroundReports(self._reporter, store, storage_options, dataset)

    def epoch_done(self, epoch: int, step: int, epoch_seconds: float, loggers: Sequence[Any]) -> None:
        """Reports ``epoch``, which must be committed, now or in the worker, or skips it.

        Either way the cheap scalars (storage, throughput, and the norms the capture kept) reach
        ``loggers``, so that every captured epoch has its point on their curves."""
        self.poll(loggers)
        if self.max_overhead is not None:
            self._earned += self.max_overhead * epoch_seconds
            if self._earned < self._cost:
                sink = LoggerSink(loggers, step, epoch)
                sink.scalars(cheap_scalars(self._open(), epoch, epoch_seconds))
                sink.flush()
                self._skip(epoch, step)
                return
        self._pending = None
        self._run(epoch, step, epoch_seconds, loggers)

    def poll(self, loggers: Sequence[Any]) -> None:
        """Sends the worker's finished reports to ``loggers``."""
        if self._background is not None:
            for summary in self._background.drain(loggers):
                self._spent(summary["total_seconds"], self._charged.pop(0))

    def close(self, loggers: Sequence[Any] = (), wait: bool = True) -> None:
        """Reports the last epoch if it was skipped, then waits for (``wait``) or abandons the
        worker's reports."""
        if wait and self._pending is not None:
            epoch, step = self._pending
            self._pending = None
            self._run(epoch, step, None, loggers)
        if self._background is not None:
            for summary in self._background.close(loggers, wait=wait):
                self._spent(summary["total_seconds"], self._charged.pop(0))
            self._background = None
        if self.skipped and wait:
            log.info(
                "mstore: reported epochs %s; skipped %d epochs to keep the reports within %.0f%% of "
                "training time",
                self.reported,
                len(self.skipped),
                100 * (self.max_overhead or 0),
            )

    def _run(self, epoch: int, step: int, epoch_seconds: float | None, loggers: Sequence[Any]) -> None:
        self.reported.append(epoch)
        if self._background is not None:
            self._earned -= self._cost  # charged at the last report's cost until its own is known
            self._charged.append(self._cost)
            self._background.submit(epoch, step, epoch_seconds, self._left_out(epoch))
            return
        dataset = self._dataset
        summary = self._reporter.report(
            self._open(),
            epoch,
            LoggerSink(loggers, step, epoch),
            step=step,
            sample_input=item_getter(dataset),
            epoch_seconds=epoch_seconds,
            left_out=self._left_out(epoch),
        )
        self._spent(summary["total_seconds"], 0.0)
        warn_about(summary)

    def _open(self) -> Any:
        if self._reader is None:  # one reader for the whole run: its caches serve later epochs
            from mstore_lightning.facade import open_store

            self._reader = open_store(*self._store_args, cache_bytes=CACHE_BYTES)
        return self._reader

    def _left_out(self, epoch: int) -> list[int]:
        return [e for e in self.skipped if e != epoch]

    def _spent(self, seconds: float, charged: float) -> None:
        self._earned += charged - seconds  # the report's own cost replaces the estimate charged
        self._cost = seconds

    def _skip(self, epoch: int, step: int) -> None:
        self.skipped.append(epoch)
        self._pending = (epoch, step)
        note = (
            f"not reported: the reports may take {100 * self.max_overhead:.0f}% of training time "
            "(analytics_max_overhead), and the last one took longer than this epoch earned"
        )
        self._reporter.paths.write_summary(
            epoch,
            {
                "epoch": epoch,
                "global_step": step,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": 0.0,
                "skipped": note,
                "analytics": [],
            },
        )
