"""The ``GradientCapture`` callback: per-sample gradient factors of a Lightning run, into a Zarr store."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from mstore_lightning.capture.finite import nonfinite_rows
from mstore_lightning.capture.hooks import HookManager
from mstore_lightning.capture.identity import (
    MISSING_IDS,
    batch_ids,
    batch_labels,
    describe_sampler,
    positional_batch_size,
)
from mstore_lightning.capture.layers import (
    LayerPlan,
    not_per_sample,
    not_per_sample_record,
    samples_seen,
    select_layers,
)
from mstore_lightning.capture.scaling import grad_multiplier
from mstore_lightning.config import CapturePolicy, PolicyError, PolicyLike
from mstore_lightning.reports.artifacts import report_paths
from mstore_lightning.reports.session import ReportSession
from mstore_lightning.reports.spec import AnalyticsLike, parse_analytics
from mstore_lightning.core import quant
from mstore_lightning.store import layout
from mstore_lightning.store.dedup import DEFAULT_DEDUP_BYTES, RowIndex, RowRefs
from mstore_lightning.capture.recompute import (
    Recomputer,
    batch_loss,
    gamma,
    layer_nbytes,
    read_seconds_per_sample,
)
from mstore_lightning.store.session import MODES, RunWriter, StoreExistsError
from mstore_lightning.store.writer import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_QUEUE_BYTES,
    Coder,
    PartSpec,
    WriterError,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

ON_ERROR = ("warn", "raise")
ON_PRESSURE = ("block", "drop")


class StoreWriteError(RuntimeError):
    """Writing the gradient store failed (``GradientCapture(on_error="raise")``)."""


def _store_io(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a hook that writes the store; a write failure is handled by ``on_error``.

    After one failure, capture is over for this run and the hook does nothing.
    """

    @functools.wraps(hook)
    def run(self: GradientCapture, *args: Any, **kwargs: Any) -> Any:
        if self._failed is not None:
            return None
        try:
            return hook(self, *args, **kwargs)
        except (WriterError, OSError) as exc:
            self._store_failed(exc)
            return None

    return run


SQNORMS = "sqnorm"  # per-row squared gradient norms of the layers where they are cheap, one column each
_ROW_FIELDS = {"ids": np.int64, "step": np.int64, "label": np.int64, "lr": np.float64, "loss": np.float32}


@dataclass
class _Step:
    """What one captured training batch has told us so far."""

    ids: np.ndarray | None
    labels: np.ndarray | None
    keep: torch.Tensor | None  # positions of kept samples; None keeps all
    amp_scale: float = 1.0
    backward_done: bool = False
    dropped: bool = False  # not stored: the writer was behind (on_pressure="drop")


class GradientCapture(Callback):
    """Captures per-sample gradient factors of the selected layers during ``Trainer.fit``.

    Forward hooks keep each selected layer's input and output-gradient hooks its output gradient,
    scaled to each sample's own loss. A background thread writes them, compressed, into a Zarr v3
    store; an epoch becomes visible to readers once all of it is written.

    Args:
        store: path or fsspec URL of the store to write.
        policy: a :class:`~mstore_lightning.CapturePolicy`, a dict of its fields, or a YAML file path.
        sample_ids: ``callable(batch) -> ids`` for batches that are not dicts with an ``"index"`` entry.
        labels: ``callable(batch) -> labels``; by default a dict's ``label``/``y``/``target`` entry or
            the second item of an ``(x, y)`` batch, when it holds one integer per sample.
        mode: what to do when ``store`` already holds a store: ``"error"``, ``"overwrite"`` or ``"append"``.
        queue_bytes: most bytes of captured rows waiting for the writer; training waits beyond it.
        chunk_bytes: target uncompressed size of one stored chunk. Rows wait for the writer in
            chunk buffers as the training thread hands them over (float32 for int8 and k-bit
            codes), so each captured array holds up to 4 × ``chunk_bytes`` of buffer beside the
            queue; smaller chunks use less memory and cost more time per row.
        storage_options: fsspec options for URL stores, e.g. ``{"endpoint_url": "http://minio:9000",
            "key": ..., "secret": ...}`` for an S3-compatible server; without them s3fs reads the
            standard AWS environment variables and configuration files.
        dedup_bytes: most bytes of stored input rows kept in memory to find later duplicates
            (``policy.dedup``); rows beyond it are stored in full.
        loss_fn: ``callable(pl_module, batch) -> loss`` for passes outside training (queries, measuring
            the recompute cost); by default ``training_step``'s loss.
        query: a loader of query samples (for TracIn): at each captured epoch's end their rows are
            captured with the end-of-epoch weights, in eval mode, and read with ``split="query"``.
            Batches carry ids like training batches do.
        analytics: operators run after each captured epoch is committed, on rank 0, whose results go
            to ``trainer.loggers``, to PNG/CSV files and to an HTML report beside the store: a list of
            names and ``{name: params}`` mappings, or a YAML path (see
            :mod:`mstore_lightning.reports.spec`), e.g. ``["norms", {"self_influence": {"k": 20}}]``.
        analytics_budget_s: seconds the analytics of one epoch may take; operators that would start
            after it are skipped, with a note in the logs and the report.
        report_dir: where the report files go instead of beside the store.
        analytics_background: run the analytics in a worker process while the next epoch trains;
            their results reach the loggers, at the step their epoch ended on, as they finish, and
            the last ones before ``fit`` returns. Worth it where cores sit idle (GPU training); with
            every core busy the worker only competes for them, and its start costs seconds. By
            default they run in the training process, which waits for them.
        analytics_max_overhead: the share of training time the reports may take (``0.1``: 10%).
            Epochs are then reported as often as that allows, the last one always; the others are
            skipped with a note. ``None`` reports every captured epoch.
        on_error: what a failed store write (a full disk, an I/O error) does. ``"warn"``: capture
            stops with one warning and training goes on; ``"raise"``: training stops with a
            :class:`StoreWriteError`. Either way the epochs committed before stay whole and readable,
            and the epoch being written is left uncommitted, so readers never see it.
        on_pressure: what a training step does when the writer is ``queue_bytes`` behind.
            ``"block"``: it waits, and every row is kept. ``"drop"``: that step's rows are not stored,
            so training never waits on the store; the dropped rows are counted per epoch
            (``store.dropped(epoch)``), warned about at the epoch's end, and logged by the
            ``storage`` report as ``mstore/capture/dropped_rows``. The end-of-epoch passes (queries,
            ``timing="checkpoint"``) always wait, so their rows are never dropped.

    Example:
        >>> capture = GradientCapture("runs/demo.zarr", policy={"layers": ["*"], "precision": "fp16"})
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[capture])     # doctest: +SKIP
        >>> trainer.fit(model, train_loader)                            # doctest: +SKIP

    To record per-sample losses, return them from ``training_step`` as
    ``{"loss": loss, "per_sample_loss": losses.detach()}``.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        policy: PolicyLike = None,
        *,
        sample_ids: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Any] | None = None,
        mode: str = "error",
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        storage_options: dict[str, Any] | None = None,
        dedup_bytes: int = DEFAULT_DEDUP_BYTES,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        query: Iterable[Any] | None = None,
        analytics: AnalyticsLike = None,
        analytics_budget_s: float | None = None,
        report_dir: str | os.PathLike | None = None,
        analytics_background: bool = False,
        analytics_max_overhead: float | None = None,
        on_error: str = "warn",
        on_pressure: str = "block",
    ) -> None:
        if not isinstance(store, (str, os.PathLike)) or not os.fspath(store):
            raise ValueError(f"`store` must be a non-empty path or URL, got {store!r}.")
        if on_error not in ON_ERROR:
            raise ValueError(f"`on_error` can be {', '.join(repr(m) for m in ON_ERROR)}; got {on_error!r}.")
        if on_pressure not in ON_PRESSURE:
            raise ValueError(
                f"`on_pressure` can be {', '.join(repr(m) for m in ON_PRESSURE)}; got {on_pressure!r}."
            )
        if mode not in MODES:
            raise ValueError(f"`mode` can be {', '.join(repr(m) for m in MODES)}; got {mode!r}.")
        for name, value in (
            ("queue_bytes", queue_bytes),
            ("chunk_bytes", chunk_bytes),
            ("dedup_bytes", dedup_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number of bytes, got {value!r}.")
        if query is not None and not hasattr(query, "__iter__"):
            raise ValueError(
                f"`query` must be a DataLoader (or an iterable of batches), got {type(query).__name__}."
            )
        for name, fn in (("sample_ids", sample_ids), ("labels", labels), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be a callable taking a batch, got {type(fn).__name__}.")
        if analytics_budget_s is not None and (
            isinstance(analytics_budget_s, bool)
            or not isinstance(analytics_budget_s, (int, float))
            or analytics_budget_s <= 0
        ):
            raise ValueError(
                f"`analytics_budget_s` must be a positive number of seconds, got {analytics_budget_s!r}."
            )
        self.store = os.fspath(store)
        self.policy = CapturePolicy.coerce(policy)
        self.analytics = parse_analytics(analytics)
        self.analytics_budget_s = analytics_budget_s
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        self.analytics_background = bool(analytics_background)
        if analytics_max_overhead is not None and (
            isinstance(analytics_max_overhead, bool)
            or not isinstance(analytics_max_overhead, (int, float))
            or analytics_max_overhead <= 0
        ):
            raise ValueError(
                "`analytics_max_overhead` must be a positive share of training time (0.1 for 10%), "
                f"got {analytics_max_overhead!r}."
            )
        self.analytics_max_overhead = analytics_max_overhead
        self.on_error, self.on_pressure = on_error, on_pressure
        self._dropped = 0  # rows of this epoch not stored because the writer was behind
        self._failed: str | None = None  # why capture stopped, after a store write failed
        self._in_progress: int | None = None  # the epoch being written, from its start to its commit
        self._nonfinite: list[int] = []
        self._sqnorm_gap = False  # this epoch's stored norms miss rows: readers compute norms from factors  # ids of this epoch's samples with NaN or Inf factors
        self.mode = mode
        self.queue_bytes, self.chunk_bytes = queue_bytes, chunk_bytes
        self.storage_options = storage_options
        self._sample_ids_fn, self._labels_fn = sample_ids, labels
        self._hooks = HookManager()
        self._plans: dict[str, LayerPlan] = {}
        self._uncovered: list[dict] = []
        self._run: RunWriter | None = None
        self._epoch: int | None = None  # the epoch being captured
        self._step: _Step | None = None
        self._committed: list[int] = []
        self._resume: dict[str, Any] | None = None
        self._positional_bs: int | None = None  # batch size, when positions are dataset indices
        self._loader_note = ""
        self._epoch_lr: list[list[float]] = []
        self._batch_idx = 0
        self._chunk_rows: dict[str, int] = {}
        self.dedup_bytes = dedup_bytes
        self.loss_fn = loss_fn
        self.query = query
        self._dedup: RowIndex | None = None
        self._recompute: dict[str, dict[str, Any]] = {}  # store-or-recompute decisions by layer
        self._epoch_recomputed: set[str] = set()
        self._probe: Any = None
        self._decided = False  # whether the measured store-or-recompute decision was made
        self._rank = 0
        self._epoch_started = 0.0
        self._reports: ReportSession | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(store=self.store)

    @property
    def layers(self) -> list[str]:
        """Names of the captured modules (known after ``setup``)."""
        return list(self._plans)

    @property
    def uncovered(self) -> list[dict]:
        """Selected parameters that are not captured, each with its reason."""
        return list(self._uncovered)

    # ------------------------------------------------------------------ set-up and tear-down
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_compiled(pl_module)
        if self.policy.epochs == "last" and (trainer.max_epochs is None or trainer.max_epochs < 0):
            raise PolicyError("`epochs='last'` needs Trainer(max_epochs=...) to know which epoch is last.")
        self._plans, self._uncovered = select_layers(pl_module, self.policy)
        for u in self._uncovered:
            rank_zero_warn(
                f"GradientCapture does not capture {u['module']} ({u['type']}) parameters {u['params']} "
                f"({u['numel']} numbers): {u['reason']}. They are recorded as uncovered in the store."
            )
        if not self._plans:
            raise PolicyError(
                f"The policy's layers {list(self.policy.layers)} select no layer that can be captured; "
                "see the warnings above for why."
            )
        self._hooks.detach()  # a second fit with the same callback attaches afresh
        self._hooks.attach(self._plans)
        self._recompute = {
            n: {"decision": "recompute", "why": "policy recompute.layers"}
            for n, p in self._plans.items()
            if self.policy.always_recomputed(n, type(p.module).__name__)
        }

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resume = self._resume is not None and self._resume.get("store") == self.store
        self._run = RunWriter(
            self.store,
            mode=self.mode,
            rank=trainer.global_rank,
            queue_bytes=self.queue_bytes,
            chunk_bytes=self.chunk_bytes,
            storage_options=self.storage_options,
            # Rows are dropped when the writer falls behind: it keeps normal priority to fall behind less.
            low_priority=self.on_pressure == "block",
        )
        self._run.writer.block = self.on_pressure == "block"
        self._rank = trainer.global_rank
        self._dedup = RowIndex(self.dedup_bytes) if self.policy.dedup else None
        if trainer.global_rank == 0:
            try:
                created = self._run.open(self._run_meta(trainer, pl_module), resume=resume)
            except StoreExistsError:
                raise  # its own message says what to do
            except OSError as exc:  # before any training: nothing to keep, so always an error
                fix = (
                    "Check that the bucket (or folder) exists and that `storage_options` (or the "
                    "environment) give credentials that may write there."
                    if layout.is_url(self.store)
                    else "Choose a path in a writable directory."
                )
                raise StoreWriteError(
                    f"Cannot write the gradient store at {self.store!r}: {exc.strerror or exc}. {fix}"
                ) from exc
            if created:  # a replaced store's reports would show its epochs beside this run's
                self._clear_reports()
        trainer.strategy.barrier("mstore_open")
        if trainer.global_rank != 0:
            self._run.open(self._run_meta(trainer, pl_module), resume=True)
        if resume:
            self._recompute.update(self._run.meta().get("recompute", {}))
            self._decided = any("gamma_s_per_gb" in d for d in self._recompute.values())
            self._committed = sorted(self._resume.get("committed", []))
            keep = set(self._committed)
            if self._resume.get("open_epoch") is not None:
                keep.add(int(self._resume["open_epoch"]))
            self._run.prune_epochs(keep)
        else:
            self._resume = None
        trainer.strategy.barrier("mstore_pruned")

    def _clear_reports(self) -> None:
        paths = report_paths(self.store, self.report_dir)
        try:
            paths.clear()
        except OSError as exc:  # the old reports stay; training need not stop for them
            rank_zero_warn(
                f"GradientCapture could not remove the replaced store's reports ({paths.root}, "
                f"{paths.html}): {exc}. This run's report may list the old run's epochs beside its own."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reports is not None:  # the last epochs' reports, while the loggers still take them
            self._reports.close(trainer.loggers, wait=True)
            self._reports = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.detach()
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._hooks.detach()
        self._close()

    # ------------------------------------------------------------------ epochs
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.analytics and trainer.global_rank == 0 and self._reports is None:
            self._reports = ReportSession(
                self.analytics,
                self.store,
                self.storage_options,
                self.report_dir,
                self.analytics_budget_s,
                background=self.analytics_background,
                dataset=getattr(trainer.train_dataloader, "dataset", None),
                max_overhead=self.analytics_max_overhead,
            )
        # A run resumed from a mid-epoch checkpoint continues that epoch without on_train_epoch_start.
        resumes_here = self._resume is not None and self._resume.get("open_epoch") == trainer.current_epoch
        if resumes_here and trainer.fit_loop.epoch_loop.batch_progress.current.ready > 0:
            self._start_epoch(trainer, trainer.current_epoch)

    @override
    @_store_io
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch == trainer.current_epoch:
            return  # already continued from a mid-epoch checkpoint
        self._start_epoch(trainer, trainer.current_epoch)

    def _start_epoch(self, trainer: pl.Trainer, epoch: int) -> None:
        self._epoch = None
        resume_rows = None
        if self._resume is not None and self._resume.get("open_epoch") == epoch:
            resume_rows = int(self._resume.get("open_rows", 0))
        self._resume = None
        if not self.policy.captures_epoch(epoch, trainer.max_epochs):
            return
        self._in_progress = epoch
        if trainer.global_rank == 0:
            self._run.begin_epoch(epoch, resume_rows)
        trainer.strategy.barrier("mstore_epoch_start")
        if trainer.global_rank != 0:
            self._run.begin_epoch(epoch, resume_rows if resume_rows is not None else 0)
        self._epoch = epoch
        self._nonfinite = []
        self._dropped = 0
        self._sqnorm_gap = False
        self._epoch_started = time.perf_counter()
        self._epoch_recomputed = {n for n, d in self._recompute.items() if d["decision"] == "recompute"}
        self._epoch_lr = _learning_rates(trainer)
        loader = trainer.train_dataloader
        self._positional_bs = positional_batch_size(loader)
        self._loader_note = describe_sampler(loader)

    @override
    @_store_io
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch is None:
            return
        if self.policy.timing == "checkpoint":
            self._capture_pass(trainer, pl_module, trainer.train_dataloader, "train", self._positional_bs)
        if self.query is not None and trainer.global_rank == 0:
            self._capture_pass(trainer, pl_module, self.query, "query", positional_batch_size(self.query))
        epoch, self._epoch = self._epoch, None
        rows = self._run.finish_epoch(epoch)
        own_rows = int(rows.get(f"{layout.ROWS}/ids", 0))
        # Every process's count: the commit records the epoch's total, which readers check.
        total_rows = int(trainer.strategy.reduce(torch.tensor(float(own_rows)), reduce_op="sum").item())
        self._run.set_rank_attrs(epoch, rows=own_rows)
        if not self._sqnorm_gap:
            self._run.set_rank_attrs(
                epoch,
                sqnorms={
                    "columns": list(self._plans),
                    "layers": [
                        n
                        for n, p in self._plans.items()
                        if p.ready and p.sqnorm_at_capture and n not in self._epoch_recomputed
                    ],
                },
            )
        if self._dedup is not None:
            self._run.set_rank_attrs(epoch, dedup=self._dedup.take_stats())
        if trainer.global_rank == 0 and not total_rows:
            warnings.warn(
                f"GradientCapture: epoch {epoch} captured no rows (the policy's samples or every_n_steps "
                "selected none, or no batch ran); it is committed empty.",
                stacklevel=2,
            )
        if self._nonfinite:
            bad = sorted(set(self._nonfinite))
            self._run.set_rank_attrs(epoch, nonfinite={"rows": len(self._nonfinite), "ids": bad[:1000]})
            warnings.warn(
                f"GradientCapture: {len(bad)} sample(s) of epoch {epoch} have NaN or Inf gradients (ids "
                f"{bad[:10]}{' ...' if len(bad) > 10 else ''}). They are stored as they are: their norms "
                "and influence read NaN (store.nonfinite(epoch) lists them).",
                stacklevel=2,
            )
        if self._dropped:
            self._run.set_rank_attrs(epoch, dropped={"rows": self._dropped})
            warnings.warn(
                f"GradientCapture dropped {self._dropped} row(s) of epoch {epoch} on rank "
                f"{trainer.global_rank}: the store writer was {self.queue_bytes} bytes behind "
                "(on_pressure='drop'). Those samples are missing from the epoch; store.dropped(epoch) "
                "counts them. Use on_pressure='block' to keep every row, or a faster store.",
                stacklevel=2,
            )
        trainer.strategy.barrier("mstore_epoch_flushed")
        recomputed = sorted(self._epoch_recomputed)
        if recomputed and trainer.global_rank == 0:
            self._run.save_weights(epoch, pl_module)
        if self._probe is not None or self._wants_decision():
            self._decide_store_or_recompute(trainer, pl_module, epoch)
        self._run.commit_epoch(
            epoch,
            {
                "recomputed": recomputed,
                "lr": self._epoch_lr[0][0] if self._epoch_lr and self._epoch_lr[0] else None,
                "lr_groups": self._epoch_lr,
                "rows": total_rows,
                "world_size": trainer.world_size,
                "global_step_end": trainer.global_step,
            },
        )
        self._committed.append(epoch)
        self._in_progress = None
        if self._reports is not None:
            self._reports.epoch_done(
                epoch, trainer.global_step, time.perf_counter() - self._epoch_started, trainer.loggers
            )

    # ------------------------------------------------------------------ batches
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = None
        if (
            self._epoch is None
            or not self.policy.captures_step(batch_idx)
            or self.policy.timing == "checkpoint"
        ):
            return
        ids = batch_ids(batch, self._sample_ids_fn)  # None: numbered by position once the batch size is seen
        if ids is None and self._positional_bs is None:
            raise RuntimeError(MISSING_IDS.format(why=self._loader_note))
        keep = None
        if ids is not None:
            mask = self.policy.sample_mask(ids)
            if not mask.any():
                return
            if not mask.all():
                keep = torch.from_numpy(np.nonzero(mask)[0])
        labels = batch_labels(batch, len(ids) if ids is not None else _batch_len(batch), self._labels_fn)
        self._step = _Step(ids=ids, labels=labels, keep=keep)
        self._batch_idx = batch_idx
        self._hooks.active = True

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._step is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self._step.amp_scale = float(scaler.get_scale())

    @override
    @_store_io
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._step
        if step is None or step.backward_done:
            return
        self._hooks.active = False
        uses = self._hooks.take()
        step.backward_done = True
        fired = [u for u in uses.values() if u]
        if not fired:
            self._step = None  # nothing to record for this batch, not even its loss
            return
        n = self._per_sample_uses(uses)
        if step.ids is None:
            step.ids = self._batch_idx * self._positional_bs + np.arange(n, dtype=np.int64)
            mask = self.policy.sample_mask(step.ids)
            if not mask.any():
                self._step = None
                return
            step.keep = None if mask.all() else torch.from_numpy(np.nonzero(mask)[0])
        if len(step.ids) != n:
            raise RuntimeError(
                f"The batch carries {len(step.ids)} sample ids but the model saw {n} samples; "
                "ids must give one dataset index per sample in the batch."
            )
        if self.on_pressure == "drop" and self._run.writer.behind:
            step.dropped = True
            self._dropped += len(step.ids) if step.keep is None else len(step.keep)
            return
        accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        mult = grad_multiplier(self.policy.loss_reduction, n, accumulation, step.amp_scale)
        sqnorms, covers = self._write_layers(uses, mult, step)
        self._note_nonfinite(uses, step, sqnorms, covers)
        self._write_rows(trainer, step)

    @override
    @_store_io
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._reports is not None:
            self._reports.poll(trainer.loggers)
        step, self._step = self._step, None
        self._hooks.active = False
        if step is None or not step.backward_done or step.dropped or self._epoch is None:
            self._hooks.discard()  # e.g. training_step returned None and backward never ran
            return
        n = len(step.ids)
        losses = np.full(n, np.nan, dtype=np.float32)
        per_sample = outputs.get("per_sample_loss") if isinstance(outputs, dict) else None
        if isinstance(per_sample, torch.Tensor) and per_sample.numel() == n:
            losses = per_sample.detach().float().reshape(-1).cpu().numpy()
        self._append_row_field("loss", self._select(torch.from_numpy(losses), step.keep))
        if self._wants_decision():
            self._probe = batch  # measures the recompute cost at the epoch's end, then is dropped

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "store": self.store,
            "policy": self.policy.to_dict(),
            "committed": list(self._committed),
            "open_epoch": None,
            "open_rows": 0,
        }
        if self._run is not None and self._epoch is not None:
            # Rows flushed now survive a crash; a resume keeps exactly these and redoes the rest.
            epoch = self._epoch
            try:
                self._run.flush()
                state["open_epoch"], state["open_rows"] = epoch, self._run.rows_written(epoch)
            except (WriterError, OSError) as exc:
                self._store_failed(exc)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
        if state_dict.get("policy") not in (None, self.policy.to_dict()):
            rank_zero_warn(
                "Resuming GradientCapture with a policy different from the checkpoint's; epochs already "
                "committed keep the old policy's data."
            )

    # ------------------------------------------------------------------ queries
    def _capture_pass(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: Any,
        split: str,
        positional: int | None,
    ) -> None:
        """Captures the rows of ``loader``'s samples with the end-of-epoch weights, in eval mode."""
        params = [p for plan in self._plans.values() for p in plan.module.parameters() if p.requires_grad]
        with self._outside_training(pl_module):
            for batch_idx, batch in enumerate(loader):
                batch = trainer.strategy.batch_to_device(batch)
                ids = batch_ids(batch, self._sample_ids_fn)
                if ids is None and positional is None:
                    raise RuntimeError(
                        MISSING_IDS.format(why=f" (in the {split} loader of the end-of-epoch pass)")
                    )
                self._hooks.active = True
                with torch.enable_grad():
                    loss = batch_loss(pl_module, batch, self.loss_fn)
                    torch.autograd.grad(loss, params, allow_unused=True)  # fires the hooks; .grad untouched
                self._hooks.active = False
                uses = self._hooks.take()
                fired = [u for u in uses.values() if u]
                if not fired:
                    continue
                n = self._per_sample_uses(uses)
                if ids is None:
                    ids = batch_idx * positional + np.arange(n, dtype=np.int64)
                keep = None
                if split == "train":  # the policy's sample selection holds in this pass too
                    mask = self.policy.sample_mask(ids)
                    if not mask.any():
                        continue
                    keep = None if mask.all() else torch.from_numpy(np.nonzero(mask)[0])
                step = _Step(
                    ids=ids, labels=batch_labels(batch, n, self._labels_fn), keep=keep, backward_done=True
                )
                self._write_layers(uses, grad_multiplier(self.policy.loss_reduction, n), step, split)
                self._write_rows(trainer, step, split)

    @contextlib.contextmanager
    def _outside_training(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Eval mode and the global random state kept, for a pass that is not a training step.

        Iterating a loader draws from the global random generators (a shuffling sampler's seed, every
        DataLoader's base seed), so they are saved and restored: training goes on exactly as it would
        without this pass.
        """
        was_training = pl_module.training
        pl_module.eval()
        # Rows of these passes are never dropped (on_pressure="drop" is for training steps): the
        # writer's queue bounds their memory by making the pass wait.
        writer = self._run.writer
        blocking, writer.block = writer.block, True
        try:
            with _random_state_kept(pl_module.device):
                yield
        finally:
            writer.block = blocking
            self._hooks.active = False
            self._hooks.discard()
            pl_module.train(was_training)

    # ------------------------------------------------------------------ store or recompute
    def _wants_decision(self) -> bool:
        rule = self.policy.recompute or {}
        return "threshold_s_per_gb" in rule and not self._decided

    def _decide_store_or_recompute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> None:
        """Measures read and recompute costs of each stored layer and decides per layer (rank 0)."""
        probe, self._probe = self._probe, None
        decisions: dict[str, dict[str, Any]] = {}
        if trainer.global_rank == 0 and probe is not None:
            rule = self.policy.recompute
            ready = {n: p for n, p in self._plans.items() if p.ready}
            recomputer = Recomputer(pl_module, None, ready, self.policy.loss_reduction, loss_fn=self.loss_fn)
            with _random_state_kept(pl_module.device):
                t_recompute = recomputer.seconds_per_sample(probe)
            rows = self._run.rows_in_epoch(epoch)
            for name, plan in ready.items():
                if name in self._recompute:
                    continue
                group = self._run.layer_group(epoch, name)
                nbytes = layer_nbytes(group) / max(1, rows)
                t_read = read_seconds_per_sample(group, plan.spec())
                g = gamma(t_recompute, t_read, rule["expected_queries"], nbytes)
                decisions[name] = {
                    "decision": "store" if g >= rule["threshold_s_per_gb"] else "recompute",
                    "gamma_s_per_gb": g,
                    "t_read_s": t_read,
                    "t_recompute_s": t_recompute,
                    "bytes_per_sample": nbytes,
                    "threshold_s_per_gb": rule["threshold_s_per_gb"],
                    "expected_queries": rule["expected_queries"],
                    "decided_after_epoch": epoch,
                }
        decisions = trainer.strategy.broadcast(decisions, src=0)
        self._recompute.update(decisions)
        self._decided = True
        self._run.update_meta(recompute=self._recompute)

    # ------------------------------------------------------------------ internals
    def _run_meta(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        import lightning
        import numcodecs
        import zarr

        return {
            "schema_version": layout.SCHEMA_VERSION,
            "policy": self.policy.to_dict(),
            "loss_reduction": self.policy.loss_reduction,
            "model": type(pl_module).__name__,
            "model_layers": {n: type(p.module).__name__ for n, p in self._plans.items()},
            "layers": {n: p.spec() for n, p in self._plans.items() if p.ready},
            "uncovered": self._uncovered,
            "recompute": self._recompute,
            "world_size": trainer.world_size,
            "versions": {
                "mstore_lightning": _version(),
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "zarr": zarr.__version__,
                "numcodecs": numcodecs.__version__,
            },
        }

    def _per_sample_uses(self, uses: dict[str, list]) -> int:
        """The batch's sample count; layers that did not see it row by row leave ``uses`` and the plans.

        Such a layer (an input shared by the batch, broadcast after the layer) is reported as uncovered
        the first time; one that was captured per sample before cannot be dropped without holes.
        """
        n = samples_seen(uses)
        for name, rows in not_per_sample(uses, n).items():
            del uses[name]
            plan = self._plans.get(name)
            if plan is None:
                continue  # dropped at an earlier batch
            if plan.ready:
                raise RuntimeError(
                    f"Layer {name!r} saw {rows} row(s) in a batch of {n} samples, but one row per sample in "
                    "earlier batches; capture needs every batch to feed it one row per sample."
                )
            del self._plans[name]
            self._recompute.pop(name, None)
            record = not_per_sample_record(plan, rows, n)
            self._uncovered.append(record)
            rank_zero_warn(
                f"GradientCapture does not capture {name} ({record['type']}) parameters {record['params']} "
                f"({record['numel']} numbers): {record['reason']}. They are recorded as uncovered in the "
                "store."
            )
            self._run.update_meta(uncovered=self._uncovered)
        return n

    def _write_layers(
        self, uses: dict[str, list], mult: float, step: _Step, split: str = "train"
    ) -> tuple[torch.Tensor | None, dict[str, int]]:
        """Appends the batch's rows of every planned layer.

        Returns:
            The batch's exact squared norms (train rows; ``None`` otherwise), one column per planned
            layer, and ``{layer: column}`` of the layers whose norm every element of their factors
            enters: a NaN or Inf factor shows there, so those need no check of their own.
        """
        newly_ready = []
        covers: dict[str, int] = {}
        rows_before = self._run.rows_written(self._epoch, split)
        group = self._run.rank_group(self._epoch, split)
        # Exact squared norms of the layers where they are cheap, one column per planned layer.
        sqnorms = (
            torch.zeros(len(step.ids), len(self._plans), dtype=torch.float64) if split == "train" else None
        )
        for column, (name, plan) in enumerate(self._plans.items()):
            layer_uses = uses.get(name, [])
            if not plan.ready:
                if not layer_uses:
                    continue
                plan.finalize(layer_uses, self.policy, not self._hooks.input_requires_grad.get(name, True))
                newly_ready.append(plan)
            if name in self._epoch_recomputed:
                continue  # its rows are recomputed from the epoch's weights when read
            if rows_before and not self._run.writer.has_array(group, _array_path(plan)):
                # rows before it first ran
                self._append_layer(plan, _zero_rows(plan, rows_before), None, 0, split)
            rows = plan.rows(layer_uses, mult) if layer_uses else _zero_rows(plan, len(step.ids))
            if sqnorms is not None and plan.sqnorm_at_capture:
                sqnorms[:, column] = plan.sqnorms(rows).cpu()
                if layer_uses and plan.norm_covers_factors:
                    covers[name] = column
            self._append_layer(plan, rows, step.keep, rows_before, split)
        if sqnorms is not None:
            self._append_sqnorms(sqnorms, step.keep, rows_before)
        if newly_ready:
            never = [n for n, p in self._plans.items() if not p.ready]
            self._run.update_meta(layers={n: p.spec() for n, p in self._plans.items() if p.ready})
            if never:
                rank_zero_warn(
                    f"GradientCapture: selected layers {never} produced no output gradient in the first "
                    "captured batch (applied functionally, unused, or frozen upstream); they are not captured "
                    "until they do."
                )
        return sqnorms, covers

    def _append_sqnorms(self, sqnorms: torch.Tensor, keep: torch.Tensor | None, rows_before: int) -> None:
        group, name = self._run.rank_group(self._epoch), f"{layout.ROWS}/{SQNORMS}"
        if rows_before and not self._run.writer.has_array(group, name):
            # Rows from before these norms were kept (a resumed run of an older version): none count.
            self._sqnorm_gap = True
            self._run.append(self._epoch, name, torch.zeros(rows_before, sqnorms.shape[1]), np.float32)
        self._run.append(self._epoch, name, self._select(sqnorms.float(), keep), np.float32)

    def _append_layer(
        self,
        plan: LayerPlan,
        rows: dict[str, torch.Tensor],
        keep: torch.Tensor | None,
        first_row: int,
        split: str = "train",
    ) -> None:
        # Only copies here: the writer thread quantizes and deduplicates (see _coding).
        chunk_rows = self._layer_chunk_rows(plan)
        for array, values in rows.items():
            spec = plan.arrays[array]
            self._run.append(
                self._epoch,
                f"{layout.LAYERS}/{plan.name}/{array}",
                quant.buffered(spec, self._select(values, keep)),
                quant.buffer_dtype(spec),
                chunk_rows,
                coding=functools.partial(self._coding, plan, array, split),
                split=split,
            )

    def _coding(self, plan: LayerPlan, array: str, split: str) -> tuple[list[PartSpec], Coder]:
        """The stored parts of one of a layer's arrays, and the writer-side coder that makes them:
        quantization, then (for rows that can repeat) deduplication against the run's index."""
        spec, prefix = plan.arrays[array], f"{layout.LAYERS}/{plan.name}/"
        dedup = array in plan.dedup_arrays()
        parts = []
        for part, info in spec["parts"].items():
            if info.get("per", "row") != "row":
                continue  # a chunk codec's tables: the writer makes them with the codes
            codec = quant.chunk_codec(spec, array, part)
            shape, dtype = (
                (codec.row_shape, np.float32) if codec else (tuple(info["row_shape"]), info["dtype"])
            )
            # Only training rows are references; and a reference to (epoch 0, rank 0, row 0) is zeros
            # too, so reference chunks are always written: a missing one is damage.
            parts.append(PartSpec(prefix + part, shape, np.dtype(dtype), dedup and split == "train", codec))
        refs = None
        if dedup:  # query rows are stored in full: references point only at training rows
            ref = f"{prefix}{array}_ref"
            parts.append(PartSpec(ref, (3,), np.dtype(np.int32)))
            index = self._dedup if split == "train" else None
            refs = RowRefs(index, f"{plan.name}/{array}", ref, self._epoch, self._rank)

        def coder(rows: np.ndarray, first_row: int) -> dict[str, np.ndarray]:
            coded = quant.encode(spec, prefix + array, rows)
            return refs(coded, first_row) if refs is not None else coded

        return parts, coder

    def _layer_chunk_rows(self, plan: LayerPlan) -> int:
        if plan.name not in self._chunk_rows:
            stored = sum(quant.row_nbytes(spec) for spec in plan.arrays.values())
            buffered = sum(quant.buffered_nbytes(spec) for spec in plan.arrays.values())
            self._chunk_rows[plan.name] = self._run.writer.chunk_rows_for(stored, buffered)
        return self._chunk_rows[plan.name]

    def _write_rows(self, trainer: pl.Trainer, step: _Step, split: str = "train") -> None:
        n = len(step.ids)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan")
        fields = {
            "ids": torch.from_numpy(step.ids),
            "step": torch.full((n,), trainer.global_step, dtype=torch.int64),
            "label": torch.from_numpy(step.labels) if step.labels is not None else torch.full((n,), -1),
            "lr": torch.full((n,), lr, dtype=torch.float64),
        }
        if split == "query" or self.policy.timing == "checkpoint":  # no per-sample loss from this pass
            fields["loss"] = torch.full((n,), float("nan"), dtype=torch.float32)
        for name, values in fields.items():
            self._append_row_field(name, self._select(values, step.keep), split)

    def _append_row_field(self, name: str, values: torch.Tensor, split: str = "train") -> None:
        chunk_rows = self._run.writer.chunk_rows_for(8 * len(_ROW_FIELDS))
        self._run.append(
            self._epoch, f"{layout.ROWS}/{name}", values, _ROW_FIELDS[name], chunk_rows, split=split
        )

    @staticmethod
    def _select(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return values if keep is None else values.index_select(0, keep.to(values.device))

    def _note_nonfinite(
        self, uses: dict[str, list], step: _Step, sqnorms: torch.Tensor | None, covers: dict[str, int]
    ) -> None:
        """Remembers the samples whose captured factors hold NaN or Inf; they are stored as they are
        (their norms and influence read NaN), counted in the store and warned about at the epoch's end.

        The layers in ``covers`` are checked through their squared norms, already computed: a
        non-finite factor makes the norm non-finite. Only rows whose norm is not finite (NaN, Inf,
        or finite values whose squares overflowed) get the exact check.
        """
        bad = nonfinite_rows(
            [t for name, layer_uses in uses.items() if name not in covers for t in _floats(layer_uses)]
        )
        if covers and sqnorms is not None:
            columns = sqnorms if len(covers) == sqnorms.shape[1] else sqnorms[:, list(covers.values())]
            finite = torch.isfinite(columns)
            suspect = None if bool(finite.all()) else (~finite.all(dim=1)).nonzero().squeeze(1)
            if suspect is not None:
                own = [
                    t.index_select(0, suspect.to(t.device)) for name in covers for t in _floats(uses[name])
                ]
                exact = nonfinite_rows(own)
                if exact is not None:
                    bad = torch.zeros(len(step.ids), dtype=torch.bool) if bad is None else bad.cpu()
                    bad[suspect[exact.cpu()]] = True
        if bad is not None:
            self._nonfinite.extend(step.ids[bad.cpu().numpy()].tolist())

    def _store_failed(self, exc: BaseException) -> None:
        """Stops capture after a failed store write, as ``on_error`` asks."""
        epoch = self._in_progress
        committed = ", ".join(map(str, self._committed)) or "none"
        what = (
            f"Writing the gradient store {self.store!r} failed: {type(exc).__name__}: {exc}. "
            f"Epochs committed before it ({committed}) are whole and readable"
            + (
                f"; epoch {epoch} is left uncommitted, so readers do not see it."
                if epoch is not None
                else "."
            )
        )
        self._failed = what
        self._hooks.detach()
        self._step = None
        run, open_epoch = self._run, self._epoch
        self._run = self._epoch = self._in_progress = None
        if run is not None:
            with contextlib.suppress(Exception):  # the writer re-raises what broke it; it is reported here
                if open_epoch is not None:
                    run.abandon_epoch(open_epoch)
                run.close()
        if self.on_error == "raise":
            raise StoreWriteError(what) from exc
        warnings.warn(
            f"{what} Capture stopped; training goes on (GradientCapture(on_error='warn')).", stacklevel=2
        )

    def _close(self) -> None:
        """Stops the writer; an epoch still open is left uncommitted, so readers never see it."""
        if self._run is None:
            return
        if self._epoch is not None:
            self._run.abandon_epoch(self._epoch)
        self._epoch = None
        self._dedup = None
        self._probe = None
        if self._reports is not None:  # an exception: pending reports are abandoned, not awaited
            self._reports.close(wait=False)
            self._reports = None
        self._run.close()
        self._run = None


@contextlib.contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _floats(layer_uses: list) -> list[torch.Tensor]:
    """The floating-point tensors of a layer's captured uses (its factors)."""
    return [
        t
        for use in layer_uses
        for t in use
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0
    ]


def _array_path(plan: LayerPlan) -> str:
    return f"{layout.LAYERS}/{plan.name}/{next(iter(plan.arrays))}"


def _zero_rows(plan: LayerPlan, n: int) -> dict[str, torch.Tensor]:
    # A layer that did not run in a batch has zero gradient there; zeros keep rows aligned.
    out = {}
    for name, info in plan.arrays.items():
        dtype = torch.int64 if info["dtype"] == "int64" else torch.float32
        out[name] = torch.zeros((n, *info["row_shape"]), dtype=dtype)
    return out


def _learning_rates(trainer: pl.Trainer) -> list[list[float]]:
    return [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return first.shape[0] if first is not None else -1
    return -1


def _refuse_compiled(pl_module: torch.nn.Module) -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = getattr(pl_module, "_compiler_ctx", None) is not None or any(
        isinstance(m, OptimizedModule) for m in pl_module.modules()
    )
    if compiled:
        raise RuntimeError(
            "GradientCapture cannot capture a torch.compile'd model: hooks added after compilation are "
            "ignored and output-gradient hooks break graphs, so captured gradients could be wrong or "
            "missing. Train without torch.compile while capturing."
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mstore-lightning")
    except PackageNotFoundError:
        return "unknown"
