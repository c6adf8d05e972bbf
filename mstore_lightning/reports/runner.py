"""Runs the configured analytics on a committed epoch and sends their results everywhere.

For each operator, within the time budget: compute on the store, render each figure once to PNG,
write figures and tables beside the store, send scalars, histograms, figures and tables to the
trainer's loggers, and record it all in the epoch's ``summary.json``; then rewrite the HTML report.
An operator that fails is recorded and warned about; training goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from mstore_lightning.analytics.ranking import RunningSum
from mstore_lightning.reports import operators
from mstore_lightning.reports.artifacts import ReportPaths
from mstore_lightning.reports.figures import Figures
from mstore_lightning.reports.loggers import LoggerSink, RecordingSink
from mstore_lightning.reports.spec import AnalyticSpec

log = logging.getLogger(__name__)


class EpochReporter:
    """Reports each committed epoch; keeps running influence sums and figures from one epoch to the
    next.

    Args:
        specs: the analytics to run, in order.
        paths: where the report files go.
        budget_s: seconds one epoch's analytics may take; operators that would start later are
            skipped. An operator already running is not interrupted.
        html: whether to rewrite the HTML report after each epoch.
    """

    def __init__(
        self,
        specs: Sequence[AnalyticSpec],
        paths: ReportPaths,
        budget_s: float | None = None,
        html: bool = True,
    ) -> None:
        self.specs, self.paths, self.budget_s, self.html = list(specs), paths, budget_s, html
        self.sums: dict[str, RunningSum] = {}
        self.plots = Figures()  # drawn once, then only their changing parts each epoch

    def report(
        self,
        store: Any,
        epoch: int,
        sink: LoggerSink | RecordingSink,
        *,
        step: int = 0,
        sample_input: Callable[[int], Any] | None = None,
        epoch_seconds: float | None = None,
        left_out: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Runs every analytic on ``epoch`` of ``store``, sending results to ``sink``; returns the
        epoch's summary. Call :func:`warn_about` on it where warnings reach the user.

        ``left_out`` are earlier epochs skipped to keep the reports within their share of training
        time; TracIn's running sum leaves them out.
        """
        start = time.perf_counter()
        folder = self.paths.epoch_dir(epoch)
        folder.mkdir(parents=True, exist_ok=True)
        ctx = operators.Context(
            store,
            epoch,
            self.sums,
            self.plots,
            sample_input=sample_input,
            epoch_seconds=epoch_seconds,
            left_out=frozenset(left_out),
        )
        # The cheap scalars first: an operator's own value of the same name (storage) replaces them.
        sink.scalars(operators.cheap_scalars(store, epoch, epoch_seconds))
        records = []
        for spec in self.specs:
            spent = time.perf_counter() - start
            if self.budget_s is not None and spent >= self.budget_s:
                note = f"the analytics budget of {self.budget_s:g} s was spent ({spent:.2f} s)"
                records.append(_record(spec, "skipped", 0.0, note))
                continue
            records.append(self._run_one(spec, ctx, sink, folder))
        elapsed = time.perf_counter() - start
        sink.scalars(
            {
                "analytics/seconds": elapsed,
                "analytics/skipped": float(sum(r["status"] == "skipped" for r in records)),
                "analytics/failed": float(sum(r["status"] == "failed" for r in records)),
            }
        )
        sink.flush()
        summary = {
            "epoch": epoch,
            "global_step": step,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": elapsed,
            "analytics": records,
        }
        self.paths.write_summary(epoch, summary)
        if self.html:
            try:
                from mstore_lightning.reports.html import write_report

                write_report(store, report_dir=self.paths.root.parent, out=self.paths.html)
            except Exception as exc:  # noqa: BLE001 - the report is a view; the store and training matter more
                summary["html_error"] = f"{type(exc).__name__}: {exc}"
        # What the report cost training, HTML included; "seconds" are the analytics' alone.
        summary["total_seconds"] = time.perf_counter() - start
        self.paths.write_summary(epoch, summary)
        return summary

    def _run_one(
        self, spec: AnalyticSpec, ctx: operators.Context, sink: LoggerSink | RecordingSink, folder: Any
    ) -> dict:
        t0 = time.perf_counter()
        try:
            out = operators.OPERATORS[spec.name](ctx, **spec.params)
        except operators.Skipped as why:
            return _record(spec, "skipped", time.perf_counter() - t0, str(why))
        except Exception as exc:  # noqa: BLE001 - one failing analytic must not stop the others, or training
            return _record(spec, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        record = _record(spec, "ok", 0.0, out.note)
        record["scalars"] = {k: float(v) for k, v in out.scalars.items()}
        sink.scalars(out.scalars)
        sink.histograms(out.histograms)
        for name, title, png in out.figures:
            file = f"{spec.name}_{name}.png"
            (folder / file).write_bytes(png)
            sink.figure(f"{spec.name}/{name}", png, folder / file)
            record["figures"].append({"file": file, "title": title})
        for name, title, frame in out.tables:
            file = f"{spec.name}_{name}.csv"
            frame.to_csv(folder / file, index=False)
            sink.table(f"{spec.name}/{name}", frame)
            record["tables"].append({"file": file, "title": title, "rows": len(frame)})
        record["seconds"] = time.perf_counter() - t0
        return record


def item_getter(dataset: Any) -> Callable[[int], Any] | None:
    """``id -> dataset[id]`` for image grids, when the dataset is indexable."""
    return dataset.__getitem__ if dataset is not None and hasattr(dataset, "__getitem__") else None


def warn_about(summary: dict[str, Any]) -> None:
    """Logs a warning for each analytic of ``summary`` that was skipped or failed."""
    for r in summary["analytics"]:
        if r["status"] == "failed":
            log.warning("mstore epoch %d: analytic %s failed: %s", summary["epoch"], r["name"], r["note"])
        elif r["status"] == "skipped":
            log.warning("mstore epoch %d: analytic %s skipped: %s", summary["epoch"], r["name"], r["note"])
    if "html_error" in summary:
        log.warning(
            "mstore epoch %d: the HTML report could not be written: %s",
            summary["epoch"],
            summary["html_error"],
        )


def _record(spec: AnalyticSpec, status: str, seconds: float, note: str | None) -> dict[str, Any]:
    return {
        "name": spec.name,
        "params": dict(spec.params),
        "status": status,
        "seconds": seconds,
        "note": note,
        "scalars": {},
        "figures": [],
        "tables": [],
    }
