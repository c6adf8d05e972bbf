"""The capture of one training run, without Lightning: which samples, which layers, and their rows.

A :class:`Recorder` owns the hooks on the selected layers, the open store and the state of the epoch
and the step being captured. Whoever drives training (the Lightning callback, or a plain loop) calls
it around each step and epoch with plain values: the global step, the learning rate, the AMP scale,
and a :class:`Collectives` of small callables for a distributed run. Its decisions come back as
``(value, why not)``, for the caller to apply.

Example::

    recorder = Recorder("runs/demo.zarr", CapturePolicy(precision="fp32"))
    recorder.plan(model, max_epochs=1)
    recorder.start()
    recorder.open(recorder.run_meta(type(model).__name__), resume=False)
    recorder.begin_epoch(0, lr_groups=[[0.1]], loader=train_loader)
    for batch_idx, batch in enumerate(train_loader):
        step, why = recorder.plan_step(batch, batch_idx)
        recorder.begin_step(step)
        loss_of(model, batch).backward()
        recorder.record_backward(accumulation=1, global_step=batch_idx, lr=0.1)
        recorder.end_step()
    recorder.finish_epoch(model, global_step=len(train_loader))
    recorder.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from mstore_lightning.capture.batch import BatchWriter
from mstore_lightning.capture.collectives import Collectives
from mstore_lightning.capture.decision import decide
from mstore_lightning.capture.epoch import EpochLog
from mstore_lightning.capture.identity import describe_sampler, positional_batch_size
from mstore_lightning.capture.layers import LayerPlan
from mstore_lightning.capture.layerset import LayerSet
from mstore_lightning.capture.rows import RowSink
from mstore_lightning.capture.scaling import grad_multiplier, reduction_mismatch
from mstore_lightning.capture.selection import SampleSelection, Step
from mstore_lightning.config import CapturePolicy, PolicyError
from mstore_lightning.store import layout
from mstore_lightning.store.dedup import DEFAULT_DEDUP_BYTES, RowIndex
from mstore_lightning.store.session import RunWriter
from mstore_lightning.store.writer import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_BYTES, BackgroundWriter

__all__ = ["Collectives", "Recorder", "Step"]

Decision = tuple[bool, str]  # whether, and why not when not


_LOG = logging.getLogger("mstore_lightning")


class Recorder:
    """Captures per-sample gradient factors of a model's selected layers into a store.

    Args:
        store: path or fsspec URL of the store.
        policy: what to capture.
        sample_ids: ``callable(batch) -> ids`` for batches that are not dicts with an ``"index"`` entry.
        labels: ``callable(batch) -> labels``; by default found in the batch where it can be.
        loss_fn: ``callable(module, batch) -> loss`` for the passes outside training steps; by default
            ``module.training_step``'s loss.
        mode: ``"error"``, ``"overwrite"`` or ``"append"`` when the store exists.
        queue_bytes: most bytes of rows waiting for the writer.
        chunk_bytes: target uncompressed size of one stored chunk.
        storage_options: fsspec options of a URL store.
        dedup_bytes: most bytes of stored input rows kept to find later duplicates.
        on_pressure: ``"block"`` waits for a writer that is behind; ``"drop"`` drops the step's rows.
        warn: ``warn(message)`` for what the user should know (once per run under DDP).
        info: ``info(message)`` for the storage plan, logged once after the first captured batch.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        policy: CapturePolicy,
        *,
        sample_ids: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Any] | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        mode: str = "error",
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        storage_options: dict[str, Any] | None = None,
        dedup_bytes: int = DEFAULT_DEDUP_BYTES,
        on_pressure: str = "block",
        warn: Callable[[str], Any] = warnings.warn,
        info: Callable[[str], Any] = _LOG.info,
    ) -> None:
        self.store, self.policy = os.fspath(store), policy
        self._selection = SampleSelection(policy, sample_ids, labels)
        self._loss_fn = loss_fn
        self._mode, self._storage_options = mode, storage_options
        self._queue_bytes, self._chunk_bytes, self._dedup_bytes = queue_bytes, chunk_bytes, dedup_bytes
        self._block = on_pressure == "block"
        self._warn, self._info = warn, info
        self._layers = LayerSet(warn)
        self._decided = False  # whether the measured store-or-recompute decision was made
        self._reduction_checked = False  # the loss_reduction check runs on the first captured step
        self._chunk_rows: dict[str, int] = {}
        self._committed: list[int] = []
        self._max_epochs: int | None = None
        self._dist = Collectives()
        self._run: RunWriter | None = None
        self._batches: BatchWriter | None = None
        self._dedup: RowIndex | None = None
        self._epoch: int | None = None  # the epoch being captured
        self._in_progress: int | None = None  # the epoch being written, from its start to its commit
        self._log: EpochLog | None = None
        self._step: Step | None = None
        self._probe: Any = None  # a batch that measures the recompute cost at the epoch's end

    @property
    def plans(self) -> dict[str, LayerPlan]:
        """The captured layers by module name (known after :meth:`plan`)."""
        return dict(self._layers.plans)

    @property
    def uncovered(self) -> list[dict]:
        """Selected parameters that are not captured, each with its reason."""
        return list(self._layers.uncovered)

    @property
    def writer(self) -> BackgroundWriter | None:
        """The open store's background writer (its queue, its waits); ``None`` when none is open."""
        return self._run.writer if self._run is not None else None

    @property
    def dedup(self) -> RowIndex | None:
        """The run's index of stored input rows (``policy.dedup``), from :meth:`start`."""
        return self._dedup

    @property
    def epoch(self) -> int | None:
        """The epoch being captured, or ``None``."""
        return self._epoch

    @property
    def in_progress(self) -> int | None:
        """The epoch being written, from its start to its commit, or ``None``."""
        return self._in_progress

    @property
    def committed(self) -> list[int]:
        """Epochs committed by this run (and the run it resumes)."""
        return list(self._committed)

    @property
    def step(self) -> Step | None:
        """The training step being captured, or ``None``."""
        return self._step

    # ------------------------------------------------------------------ set-up and tear-down
    def plan(self, model: nn.Module, max_epochs: int | None) -> None:
        """Selects ``model``'s layers by the policy and attaches hooks to them (afresh each time).

        Raises:
            PolicyError: the policy selects no layer that can be captured, or captures the last epoch
                of a run of unknown length.
            RuntimeError: ``model`` is compiled.
        """
        if self.policy.epochs == "last" and (max_epochs is None or max_epochs < 0):
            raise PolicyError("`epochs='last'` needs Trainer(max_epochs=...) to know which epoch is last.")
        self._max_epochs = max_epochs
        self._layers.select(model, self.policy)

    def start(self, collectives: Collectives | None = None) -> None:
        """Starts this process's store writer; :meth:`open` then opens the store."""
        self._dist = collectives or Collectives()
        self._run = RunWriter(
            self.store,
            mode=self._mode,
            rank=self._dist.rank,
            queue_bytes=self._queue_bytes,
            chunk_bytes=self._chunk_bytes,
            storage_options=self._storage_options,
            # Rows are dropped when the writer falls behind: it keeps normal priority to fall behind less.
            low_priority=self._block,
        )
        self._run.writer.block = self._block
        self._dedup = RowIndex(self._dedup_bytes) if self.policy.dedup else None
        sink = RowSink(self._run, self._dist.rank, self._dedup, self._chunk_rows)
        self._batches = BatchWriter(
            self._layers, self._selection, sink, self._warn, self._info, self._loss_fn
        )

    def run_meta(self, model_name: str, **versions: str) -> dict[str, Any]:
        """The run's metadata; ``versions`` adds the driving framework's (``lightning="2.4.0"``)."""
        return self._layers.run_meta(self.policy, model_name, self._dist.world_size, versions)

    def open(self, meta: dict[str, Any], resume: bool) -> bool:
        """Creates or opens the store (rank 0 first); returns whether it was created.

        ``resume``: the run continues from a checkpoint of this store. Otherwise an existing store
        (``mode="append"``) must not hold committed any epoch this run's policy would capture in a
        run of epochs ``0 .. max_epochs - 1``: that is refused here, before anything is written.

        Raises:
            StoreExistsError: the store exists and the mode does not allow touching it.
            IncompatibleStoreError: the store holds another schema, other layers or another storage
                policy, or (not resumed) committed epochs this run would capture again.
            OSError: the store cannot be written.
        """
        created = self._run.open(
            meta, resume=resume, layers=self._layers.open_fields(), captures=self._would_capture
        )
        self._layers.use_store(self.store, {} if created else self._run.meta().get("layers") or {})
        self._layers.route_by_cost = self._dist.world_size == 1
        return created

    def _would_capture(self, epoch: int) -> bool:
        """Whether a run from epoch 0 to ``max_epochs`` captures ``epoch`` (any epoch: unbounded)."""
        bounded = self._max_epochs is not None and self._max_epochs >= 0
        return (not bounded or epoch < self._max_epochs) and self.policy.captures_epoch(
            epoch, self._max_epochs
        )

    def resume(self, committed: Iterable[int], open_epoch: int | None) -> None:
        """Continues a run from a checkpoint of this store: keeps its ``committed`` epochs and the rows
        of ``open_epoch`` it recorded, and drops every other epoch (work this run redoes). An epoch
        both the store and the checkpoint list as committed is never touched."""
        recompute = self._layers.recompute
        recompute.update(self._run.meta().get("recompute", {}))
        self._decided = any("gamma_s_per_gb" in d for d in recompute.values())
        self._committed = sorted(committed)
        keep = set(self._committed)
        if open_epoch is not None:
            keep.add(int(open_epoch))
        self._run.prune_epochs(keep)

    def detach(self) -> None:
        """Removes the hooks from the model."""
        self._layers.hooks.detach()

    def stop(self) -> None:
        """Stops capture after a failed store write: hooks off, the open epoch left uncommitted."""
        self._layers.hooks.detach()
        self._step = None
        run, open_epoch = self._run, self._epoch
        self._run = self._batches = self._epoch = self._in_progress = None
        if run is not None:
            with contextlib.suppress(Exception):  # the writer re-raises what broke it; it is reported
                if open_epoch is not None:
                    run.abandon_epoch(open_epoch)
                run.close()

    def close(self) -> None:
        """Stops the writer; an epoch still open is left uncommitted, so readers never see it."""
        if self._run is None:
            return
        if self._epoch is not None:
            self._run.abandon_epoch(self._epoch)
        self._epoch = self._dedup = self._probe = None
        self._run.close()
        self._run = self._batches = None

    def checkpoint(self) -> tuple[int | None, int]:
        """Flushes the open epoch's rows; returns that epoch and its rows, which survive a crash."""
        if self._run is None or self._epoch is None:
            return None, 0
        epoch = self._epoch
        self._run.flush()
        return epoch, self._run.rows_written(epoch)

    # ------------------------------------------------------------------ epochs
    def captures_epoch(self, epoch: int, max_epochs: int | None) -> Decision:
        """Whether the policy captures ``epoch`` (0-based) of a run of ``max_epochs``, and why not."""
        if self.policy.captures_epoch(epoch, max_epochs):
            return True, ""
        return False, f"the policy's epochs {self.policy.epochs!r} leave out epoch {epoch}"

    def begin_epoch(
        self,
        epoch: int,
        resume_rows: int | None = None,
        lr_groups: list[list[float]] | None = None,
        loader: Any = None,
        batches: float | None = None,
    ) -> None:
        """Opens ``epoch`` in the store: fresh, or with the ``resume_rows`` a checkpoint kept.

        Args:
            epoch: the epoch.
            resume_rows: rows of this epoch a checkpoint recorded, when resuming within it.
            lr_groups: each optimizer's learning rates by parameter group, recorded with the epoch.
            loader: the training loader (whether positions in it are dataset indices).
            batches: training batches in the epoch (the storage plan's rows); by default the
                loader's length where it has one.
        """
        self._epoch = None
        self._in_progress = epoch
        if self._dist.rank == 0:
            self._run.begin_epoch(epoch, resume_rows)
        self._dist.barrier("mstore_epoch_start")
        if self._dist.rank != 0:
            self._run.begin_epoch(epoch, resume_rows if resume_rows is not None else 0)
        self._epoch = epoch
        recomputed = self._layers.recomputed()
        self._log = EpochLog(
            epoch, lr_groups or [], recomputed, positional_batch_size(loader), describe_sampler(loader)
        )
        self._log.batches = batches if batches is not None else _length(loader)

    def capture_pass(
        self,
        module: nn.Module,
        loader: Iterable[Any],
        split: str,
        global_step: int,
        lr: float,
        to_device: Callable[[Any], Any] | None = None,
    ) -> None:
        """Captures ``loader``'s samples with the epoch's end weights, in eval mode, before
        :meth:`finish_epoch`: the queries (``split="query"``, read with ``split="query"``) or, with
        ``timing="checkpoint"``, the training samples (``split="train"``)."""
        positional = self._log.positional_bs if split == "train" else positional_batch_size(loader)
        self._batches.capture_pass(module, loader, self._log, split, positional, global_step, lr, to_device)

    def finish_epoch(self, module: nn.Module, global_step: int) -> tuple[int, float]:
        """Writes the rest of the epoch, records what it counted, and commits it (rank 0, once every
        process finished it).

        Returns:
            The epoch and its seconds from its start to its commit.
        """
        epoch, self._epoch = self._epoch, None
        log, run = self._log, self._run
        rows = run.finish_epoch(epoch)
        own_rows = int(rows.get(f"{layout.ROWS}/ids", 0))
        # Every process's count: the commit records the epoch's total, which readers check.
        total_rows = int(self._dist.total(float(own_rows)))
        log.record(run, self._layers.plans, self._dedup, own_rows, total_rows, self._queue_bytes)
        self._dist.barrier("mstore_epoch_flushed")
        if log.recomputed and self._dist.rank == 0:
            run.save_weights(epoch, module)
        if self._probe is not None or self.wants_decision():
            probe, self._probe = self._probe, None
            decide(module, probe, self._layers, run, epoch, self.policy, self._dist, self._loss_fn)
            self._decided = True
        run.commit_epoch(epoch, log.commit_attrs(total_rows, self._dist.world_size, global_step))
        self._committed.append(epoch)
        self._in_progress = None
        return epoch, log.seconds

    def wants_decision(self) -> bool:
        """Whether the policy asks for a measured store-or-recompute decision not made yet."""
        return "threshold_s_per_gb" in (self.policy.recompute or {}) and not self._decided

    # ------------------------------------------------------------------ steps
    def plan_step(self, batch: Any, batch_idx: int) -> tuple[Step | None, str]:
        """The step of the epoch's ``batch_idx``-th batch when it is captured, else ``None`` and why.

        Raises:
            RuntimeError: the batch carries no sample ids and positions are not dataset indices.
        """
        if self._epoch is None:
            return None, "the epoch is not captured"
        if not self.policy.captures_step(batch_idx):
            return None, f"every_n_steps={self.policy.every_n_steps} leaves out batch {batch_idx}"
        if self.policy.timing == "checkpoint":
            return None, "timing='checkpoint' captures the epoch at its end"
        return self._selection.step(batch, batch_idx, self._log.positional_bs, self._log.loader_note)

    def begin_step(self, step: Step | None) -> None:
        """Makes ``step`` the one being captured (``None``: none) and turns the hooks on for it."""
        self._step = step
        if step is not None:
            self._layers.hooks.batch_rows = len(step.ids) if step.ids is not None else None
            self._layers.hooks.active = True

    def set_amp_scale(self, scale: float) -> None:
        """The AMP GradScaler's scale of the step's loss, which its output gradients carry."""
        if self._step is not None:
            self._step.amp_scale = scale

    def record_backward(self, accumulation: int, global_step: int, lr: float) -> Decision:
        """Writes the step's rows after its backward pass.

        Args:
            accumulation: the divisor of the loss for gradient accumulation (1 without).
            global_step: the optimizer steps taken so far.
            lr: the first parameter group's learning rate.

        Returns:
            Whether rows were written, and why not.
        """
        step, hooks = self._step, self._layers.hooks
        if step is None or step.backward_done:
            return False, "no step is being captured"
        hooks.active = False
        uses = hooks.take()
        step.backward_done = True
        if not any(uses.values()):
            self._step = None  # nothing to record for this batch, not even its loss
            return False, "no captured layer received a gradient"
        n = self._layers.samples(uses, self._run)
        why = self._selection.number(step, n, self._log.positional_bs)
        if why:
            self._step = None
            return False, why
        if not self._block and self._run.writer.behind:
            step.dropped = True
            self._log.dropped += len(step.ids) if step.keep is None else len(step.keep)
            return False, f"the store writer is {self._queue_bytes} bytes behind (on_pressure='drop')"
        mult = grad_multiplier(self.policy.loss_reduction, n, accumulation, step.amp_scale)
        self._batches.write(self._log, uses, step, mult, global_step, lr, check_finite=True)
        return True, ""

    def end_step(
        self, per_sample_loss: Any = None, batch: Any = None, loss: Any = None, logits: Any = None
    ) -> None:
        """Ends the step: stores its per-sample losses and margins (see ``BatchWriter.write_losses``;
        ``logits`` as ``training_step`` returned them, if it did) and keeps ``batch`` when the
        store-or-recompute decision is to measure on it.

        On the first captured step, the batch ``loss`` (as ``training_step`` returned it) is checked
        against the per-sample losses for the policy's ``loss_reduction``.

        Raises:
            PolicyError: the loss was reduced the other way (every row would be off by the batch size).
        """
        if not self._reduction_checked and self._step is not None and self._step.backward_done:
            self._reduction_checked = True
            shown = reduction_mismatch(self.policy.loss_reduction, loss, per_sample_loss)
            if shown is not None:
                n = per_sample_loss.numel()
                raise PolicyError(
                    f"GradientCapture: the policy says loss_reduction={self.policy.loss_reduction!r}, but the "
                    f"first captured step's loss is the {shown} of its {n} per-sample losses, so every stored "
                    f"gradient and norm would be off by a factor of {n}. Set "
                    f"CapturePolicy(loss_reduction={shown!r}). Nothing of this epoch was committed."
                )
        step, self._step = self._step, None
        self._layers.hooks.active = False
        if step is None or not step.backward_done or step.dropped or self._epoch is None:
            self._layers.hooks.discard()  # e.g. training_step returned None and backward never ran
            return
        self._batches.write_losses(self._epoch, step, per_sample_loss, logits)
        if self.wants_decision():
            self._probe = batch  # measures the recompute cost at the epoch's end, then is dropped


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
