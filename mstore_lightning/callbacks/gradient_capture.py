"""The ``GradientCapture`` callback: per-sample gradient factors of a Lightning run, into a Zarr store.

The callback is the Lightning adapter of a :class:`~mstore_lightning.capture.recorder.Recorder`: each
hook hands the trainer's plain values (ranks, steps, learning rates, the AMP scale) to the recorder,
and the epoch-end reports to a :class:`~mstore_lightning.reports.session.ReportSession`.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from mstore_lightning.callbacks.options import CaptureOptions
from mstore_lightning.capture.recorder import Collectives, Recorder
from mstore_lightning.config import PolicyLike
from mstore_lightning.reports.artifacts import report_paths
from mstore_lightning.reports.session import ReportSession
from mstore_lightning.reports.spec import AnalyticsLike
from mstore_lightning.store import layout
from mstore_lightning.store.dedup import DEFAULT_DEDUP_BYTES
from mstore_lightning.store.session import StoreExistsError
from mstore_lightning.store.writer import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_BYTES, WriterError

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


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
        mode: what to do when ``store`` already holds a store: ``"error"`` refuses it, ``"overwrite"``
            replaces it (the only mode that deletes), ``"append"`` adds epochs after its committed ones
            and never rewrites or deletes a committed epoch. The store must match this run: the same
            schema version, layers (names, module types, parameter shapes) and storage policy
            (``precision``, ``layer_precision``, ``dedup``, ``representation``, ``budget``,
            ``projection_dim``, ``projection_seed``, ``pool``, ``loss_reduction``), and each layer's
            storage chosen at its first batch must match the store's spec; otherwise
            :class:`IncompatibleStoreError` names the first differing field, before any row is written.
            A fit not resumed from a checkpoint of this store runs epochs ``0 .. max_epochs - 1``: if
            its policy captures an epoch the store holds committed, it is refused before training;
            resume with ``trainer.fit(..., ckpt_path=...)`` so epochs continue, choose a policy
            ``epochs`` that leaves them out, pass ``mode="overwrite"``, or use another path. A run
            resumed from a checkpoint of this store keeps every epoch that both the store and the
            checkpoint list as committed, untouched; it redoes, and so first deletes, the checkpoint's
            open epoch (keeping the rows the checkpoint recorded) and any epoch committed after the
            checkpoint was saved. An epoch left uncommitted by a crash is always restarted clean.
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

    Per-sample losses and margins (``z_y − max_{j≠y} z_j``) are recorded by themselves for a
    cross-entropy classifier whose logit layer is captured (its rows show them). Otherwise return
    them from ``training_step``: ``{"loss": loss, "logits": logits}`` gives both,
    ``{"loss": loss, "per_sample_loss": losses.detach()}`` the losses (see ``capture.signals``).
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
        options = CaptureOptions(
            store,
            policy,
            sample_ids=sample_ids,
            labels=labels,
            mode=mode,
            queue_bytes=queue_bytes,
            chunk_bytes=chunk_bytes,
            storage_options=storage_options,
            dedup_bytes=dedup_bytes,
            loss_fn=loss_fn,
            query=query,
            analytics=analytics,
            analytics_budget_s=analytics_budget_s,
            report_dir=report_dir,
            analytics_background=analytics_background,
            analytics_max_overhead=analytics_max_overhead,
            on_error=on_error,
            on_pressure=on_pressure,
        )
        self.options = options
        self.store, self.policy, self.mode = options.store, options.policy, options.mode
        self.queue_bytes, self.chunk_bytes = options.queue_bytes, options.chunk_bytes
        self.storage_options, self.dedup_bytes = options.storage_options, options.dedup_bytes
        self.loss_fn, self.query = options.loss_fn, options.query
        self.analytics, self.analytics_budget_s = options.analytics, options.analytics_budget_s
        self.report_dir, self.analytics_background = options.report_dir, options.analytics_background
        self.analytics_max_overhead = options.analytics_max_overhead
        self.on_error, self.on_pressure = options.on_error, options.on_pressure
        self.recorder = Recorder(
            options.store, options.policy, warn=rank_zero_warn, info=rank_zero_info, **options.recorder_args()
        )
        self._failed: str | None = None  # why capture stopped, after a store write failed
        self._resume: dict[str, Any] | None = None  # the checkpoint's state, until the run resumes
        self._reports: ReportSession | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(store=self.store)

    @property
    def layers(self) -> list[str]:
        """Names of the captured modules (known after ``setup``)."""
        return list(self.recorder.plans)

    @property
    def uncovered(self) -> list[dict]:
        """Selected parameters that are not captured, each with its reason."""
        return self.recorder.uncovered

    @property
    def reports(self) -> ReportSession | None:
        """The epoch-end reports of the run (rank 0, with ``analytics``), from ``on_train_start``."""
        return self._reports

    # ------------------------------------------------------------------ set-up and tear-down
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.recorder.plan(pl_module, trainer.max_epochs)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resume = self._resume is not None and self._resume.get("store") == self.store
        self.recorder.start(_collectives(trainer))
        meta = self.recorder.run_meta(type(pl_module).__name__, lightning=lightning.__version__)
        if trainer.global_rank == 0 and self._open_store(meta, resume):
            self._clear_reports()  # a replaced store's reports would show its epochs beside this run's
        trainer.strategy.barrier("mstore_open")
        if trainer.global_rank != 0:
            self.recorder.open(meta, resume=True)
        if resume:
            self.recorder.resume(self._resume.get("committed", []), self._resume.get("open_epoch"))
        else:
            self._resume = None
        trainer.strategy.barrier("mstore_pruned")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reports is not None:  # the last epochs' reports, while the loggers still take them
            self._reports.close(trainer.loggers, wait=True)
            self._reports = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
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
        if self.recorder.epoch != trainer.current_epoch:  # else continued from a mid-epoch checkpoint
            self._start_epoch(trainer, trainer.current_epoch)

    @override
    @_store_io
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder.epoch is None:
            return
        step, lr, to_device = trainer.global_step, _lr(trainer), trainer.strategy.batch_to_device
        if self.policy.timing == "checkpoint":
            self.recorder.capture_pass(pl_module, trainer.train_dataloader, "train", step, lr, to_device)
        if self.query is not None and trainer.global_rank == 0:
            self.recorder.capture_pass(pl_module, self.query, "query", step, lr, to_device)
        epoch, seconds = self.recorder.finish_epoch(pl_module, trainer.global_step)
        if self._reports is not None:
            self._reports.epoch_done(epoch, trainer.global_step, seconds, trainer.loggers)

    # ------------------------------------------------------------------ batches
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step, why = self.recorder.plan_step(batch, batch_idx)
        self.recorder.begin_step(step)
        if step is None:
            log.debug("mstore: batch %d is not captured: %s", batch_idx, why)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.recorder.step is not None and scaler is not None and scaler.is_enabled():
            self.recorder.set_amp_scale(float(scaler.get_scale()))

    @override
    @_store_io
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder.step is None:
            return
        accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        written, why = self.recorder.record_backward(accumulation, trainer.global_step, _lr(trainer))
        if not written:
            log.debug("mstore: the rows of step %d are not stored: %s", trainer.global_step, why)

    @override
    @_store_io
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._reports is not None:
            self._reports.poll(trainer.loggers)
        per_sample = outputs.get("per_sample_loss") if isinstance(outputs, dict) else None
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.recorder.end_step(per_sample, batch, loss, logits)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "store": self.store,
            "policy": self.policy.to_dict(),
            "committed": self.recorder.committed,
            "open_epoch": None,
            "open_rows": 0,
        }
        try:  # rows flushed now survive a crash; a resume keeps exactly these and redoes the rest
            state["open_epoch"], state["open_rows"] = self.recorder.checkpoint()
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

    # ------------------------------------------------------------------ internals
    def _start_epoch(self, trainer: pl.Trainer, epoch: int) -> None:
        resume_rows = None
        if self._resume is not None and self._resume.get("open_epoch") == epoch:
            resume_rows = int(self._resume.get("open_rows", 0))
        self._resume = None
        captured, why = self.recorder.captures_epoch(epoch, trainer.max_epochs)
        if not captured:
            log.debug("mstore: epoch %d is not captured: %s", epoch, why)
            return
        lr_groups = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        self.recorder.begin_epoch(
            epoch, resume_rows, lr_groups, trainer.train_dataloader, batches=trainer.num_training_batches
        )

    def _open_store(self, meta: dict[str, Any], resume: bool) -> bool:
        """Rank 0 creates or opens the store; returns whether it was created."""
        try:
            return self.recorder.open(meta, resume)
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

    def _clear_reports(self) -> None:
        paths = report_paths(self.store, self.report_dir)
        try:
            paths.clear()
        except OSError as exc:  # the old reports stay; training need not stop for them
            rank_zero_warn(
                f"GradientCapture could not remove the replaced store's reports ({paths.root}, "
                f"{paths.html}): {exc}. This run's report may list the old run's epochs beside its own."
            )

    def _store_failed(self, exc: BaseException) -> None:
        """Stops capture after a failed store write, as ``on_error`` asks.

        The message is one line that stands alone (the last line of a traceback): what failed, the
        epochs that are intact, and the open epoch left uncommitted. The cause stays chained.
        """
        epoch = self.recorder.in_progress
        committed = ", ".join(map(str, self.recorder.committed)) or "none"
        # The writer thread's WriterError wraps the real failure (an OSError): name that one.
        cause = exc.__cause__ if isinstance(exc, WriterError) and exc.__cause__ is not None else exc
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        what = (
            f"Writing the gradient store {self.store!r} failed: {reason}. "
            f"Epochs committed before it ({committed}) are whole and readable"
            + (
                f"; epoch {epoch} is left uncommitted, so readers do not see it."
                if epoch is not None
                else "."
            )
        )
        self._failed = what
        self.recorder.stop()
        if self.on_error == "raise":
            raise StoreWriteError(what) from exc
        warnings.warn(
            f"{what} Capture stopped; training goes on (GradientCapture(on_error='warn')).", stacklevel=2
        )

    def _close(self) -> None:
        """Removes the hooks and stops the writer; an epoch still open is left uncommitted."""
        self.recorder.detach()
        if self.recorder.writer is None:
            return
        if self._reports is not None:  # an exception: pending reports are abandoned, not awaited
            self._reports.close(wait=False)
            self._reports = None
        self.recorder.close()


def _collectives(trainer: pl.Trainer) -> Collectives:
    strategy = trainer.strategy
    return Collectives(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        barrier=strategy.barrier,
        total=functools.partial(_total, strategy),
        broadcast=functools.partial(_broadcast, strategy),
    )


def _total(strategy: Any, value: float) -> float:
    return float(strategy.reduce(torch.tensor(value), reduce_op="sum").item())


def _broadcast(strategy: Any, obj: Any) -> Any:
    return strategy.broadcast(obj, src=0)


def _lr(trainer: pl.Trainer) -> float:
    """The first optimizer's first learning rate; NaN without an optimizer."""
    return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan")
