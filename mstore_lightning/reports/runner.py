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

from mstore_lightning.reports import operators
from mstore_lightning.reports.artifacts import ReportPaths
from mstore_lightning.reports.figures import to_png
from mstore_lightning.reports.loggers import LoggerSink
from mstore_lightning.reports.spec import AnalyticSpec

log = logging.getLogger(__name__)


class EpochReporter:
    """Reports each committed epoch; keeps running influence sums from one epoch to the next.

    Args:
        specs: the analytics to run, in order.
        paths: where the report files go.
        budget_s: seconds one epoch's analytics may take; operators that would start later are
            skipped. An operator already running is not interrupted.
        write_html: ``(store, paths) -> None`` rewriting the HTML report, or ``None`` for none.
    """

    def __init__(
        self,
        specs: Sequence[AnalyticSpec],
        paths: ReportPaths,
        budget_s: float | None = None,
        write_html: Callable[[Any, ReportPaths], Any] | None = None,
    ) -> None:
        self.specs, self.paths, self.budget_s = list(specs), paths, budget_s
        self.write_html = write_html
        self.sums: dict[str, operators.RunningSum] = {}

    def report(
        self,
        store: Any,
        epoch: int,
        *,
        loggers: Sequence[Any] = (),
        step: int = 0,
        sample_input: Callable[[int], Any] | None = None,
        epoch_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Runs every analytic on ``epoch`` of ``store``; returns the epoch's summary."""
        start = time.perf_counter()
        folder = self.paths.epoch_dir(epoch)
        folder.mkdir(parents=True, exist_ok=True)
        sink = LoggerSink(loggers, step, epoch)
        ctx = operators.Context(store, epoch, self.sums, sample_input, epoch_seconds)
        records = []
        for spec in self.specs:
            spent = time.perf_counter() - start
            if self.budget_s is not None and spent >= self.budget_s:
                note = f"skipped: the analytics budget of {self.budget_s:g} s was spent ({spent:.2f} s)"
                log.warning("mstore epoch %d: %s %s", epoch, spec.name, note)
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
        if self.write_html is not None:
            try:
                self.write_html(store, self.paths)
            except Exception as exc:  # noqa: BLE001 - the report is a view; the store and training matter more
                log.warning("mstore epoch %d: the HTML report could not be written: %s", epoch, exc)
        return summary

    def _run_one(self, spec: AnalyticSpec, ctx: operators.Context, sink: LoggerSink, folder: Any) -> dict:
        t0 = time.perf_counter()
        try:
            out = operators.OPERATORS[spec.name](ctx, **spec.params)
        except operators.Skipped as why:
            return _record(spec, "skipped", time.perf_counter() - t0, str(why))
        except Exception as exc:  # noqa: BLE001 - one failing analytic must not stop the others, or training
            log.warning(
                "mstore epoch %d: analytic %s failed: %s: %s", ctx.epoch, spec.name, type(exc).__name__, exc
            )
            return _record(spec, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        record = _record(spec, "ok", 0.0, out.note)
        record["scalars"] = {k: float(v) for k, v in out.scalars.items()}
        sink.scalars(out.scalars)
        sink.histograms(out.histograms)
        for name, title, fig in out.figures:
            file = f"{spec.name}_{name}.png"
            png = to_png(fig)
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
