"""One captured batch into the open epoch: each planned layer's rows, their norms and the row fields;
and whole loaders captured outside training steps (queries, ``timing="checkpoint"``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from mstore_lightning.capture import signals
from mstore_lightning.capture.decision import module_device, random_state_kept
from mstore_lightning.capture.epoch import EpochLog
from mstore_lightning.capture.finite import nonfinite_samples
from mstore_lightning.capture.identity import MISSING_IDS
from mstore_lightning.capture.layerset import LayerSet
from mstore_lightning.capture.plan import StoragePlan, rows_per_epoch, storage_plan
from mstore_lightning.capture.recompute import batch_loss
from mstore_lightning.capture.rows import RowSink, select_rows, zero_rows
from mstore_lightning.capture.scaling import grad_multiplier
from mstore_lightning.capture.selection import SampleSelection, Step
from mstore_lightning.config import CapturePolicy


class BatchWriter:
    """Writes captured batches of the open epoch through a :class:`~.rows.RowSink`.

    Args:
        layers: the captured layers; a layer found not to see one row per sample leaves them.
        selection: the policy's sample selection.
        sink: the open store's row sink.
        warn: ``warn(message)`` for layers that never receive a gradient.
        info: ``info(message)`` for the storage plan.
        loss_fn: ``callable(module, batch) -> loss`` for the passes outside training steps.
    """

    def __init__(
        self,
        layers: LayerSet,
        selection: SampleSelection,
        sink: RowSink,
        warn: Callable[[str], Any],
        info: Callable[[str], Any],
        loss_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.layers, self.selection, self.sink = layers, selection, sink
        self.policy: CapturePolicy = selection.policy
        self._warn, self._loss_fn, self._info = warn, loss_fn, info
        self.plan: StoragePlan | None = None  # made once, when the first layers are ready
        # The layer whose rows are softmax(z) - onehot(y), found on the first captured step with
        # labels ("": none); with it (or logits from training_step) each row gets a loss and margin.
        self.logit_layer: str | None = None
        self.margins: bool | None = None  # whether rows/margin is kept: decided by the first step

    def write(
        self,
        log: EpochLog,
        uses: dict[str, list],
        step: Step,
        multiplier: float,
        global_step: int,
        lr: float,
        split: str = "train",
        check_finite: bool = False,
    ) -> None:
        """Appends the rows of a batch whose ids are known; with ``check_finite``, samples whose
        factors hold NaN or Inf are counted in ``log``."""
        if split == "train":
            step.signals = self._signals(uses, step, multiplier)
        flagged = self._write_layers(log, uses, multiplier, step, split)
        if check_finite:
            bad = nonfinite_samples(uses, len(step.ids), flagged, step.keep)
            if bad is not None:  # read at the epoch's end: reading it now would wait for the device
                log.nonfinite_masks.append((step.ids, bad))
        without_loss = split == "query" or self.policy.timing == "checkpoint"  # no per-sample loss here
        self.sink.append_row_fields(
            log.epoch, step.ids, step.labels, step.keep, global_step, lr, without_loss, split
        )

    def write_losses(self, epoch: int, step: Step, per_sample_loss: Any, logits: Any = None) -> None:
        """Appends a training step's per-sample losses and margins.

        The loss is ``per_sample_loss`` (a tensor of one per sample) where given, else cross-entropy on
        ``logits``, else what the logit layer's rows show (see :mod:`.signals`), else NaN. Margins
        come from ``logits`` or those rows, and are stored when the run's first step had them.
        """
        n = len(step.ids)
        derived = step.signals
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == n:
            labels = signals.as_labels(step.labels, logits.device)
            if labels is not None:
                derived = signals.from_logits(logits, labels)
        if self.margins is None:  # the first step decides whether this run keeps margins
            self.margins = derived is not None
        if isinstance(per_sample_loss, torch.Tensor) and per_sample_loss.numel() == n:
            losses = per_sample_loss.detach().reshape(-1).float()  # handed over where it is
        elif derived is not None:
            losses = derived[0]
        else:
            losses = torch.full((n,), float("nan"), dtype=torch.float32)
        self.sink.append_row_field(epoch, "loss", select_rows(losses, step.keep))
        if self.margins:
            margins = derived[1] if derived is not None else torch.full((n,), float("nan"))
            self.sink.append_margins(epoch, select_rows(margins.float(), step.keep))

    def _signals(self, uses: dict[str, list], step: Step, multiplier: float) -> tuple[Any, Any] | None:
        """``(loss, margin)`` of the step's samples from the logit layer's rows, where there is one."""
        if self.logit_layer == "" or step.labels is None:
            return None
        if self.logit_layer is None:
            found = []
            for name, calls in uses.items():
                if len(calls) == 1 and calls[0][1].dim() == 2:
                    d = calls[0][1].float() * multiplier
                    if signals.is_softmax_gradient(d, signals.as_labels(step.labels, d.device)):
                        found.append(name)
            self.logit_layer = found[0] if len(found) == 1 else ""
            if not self.logit_layer:
                return None
        calls = uses.get(self.logit_layer)
        if not calls:
            return None
        d = calls[0][1].float() * multiplier
        return signals.from_softmax_gradient(d, signals.as_labels(step.labels, d.device))

    def capture_pass(
        self,
        module: nn.Module,
        loader: Iterable[Any],
        log: EpochLog,
        split: str,
        positional: int | None,
        global_step: int,
        lr: float,
        to_device: Callable[[Any], Any] | None = None,
    ) -> None:
        """Captures the rows of ``loader``'s samples with the current weights, in eval mode.

        ``positional`` is the loader's batch size when positions in it are dataset indices;
        ``to_device`` moves a batch to the model's device.
        """
        hooks = self.layers.hooks
        params = [
            p for plan in self.layers.plans.values() for p in plan.module.parameters() if p.requires_grad
        ]
        with self._outside_training(module):
            for batch_idx, batch in enumerate(loader):
                batch = to_device(batch) if to_device is not None else batch
                ids = self.selection.ids(batch)
                if ids is None and positional is None:
                    raise RuntimeError(
                        MISSING_IDS.format(why=f" (in the {split} loader of the end-of-epoch pass)")
                    )
                hooks.batch_rows = len(ids) if ids is not None else None
                hooks.active = True
                with torch.enable_grad():
                    loss = batch_loss(module, batch, self._loss_fn)
                    torch.autograd.grad(loss, params, allow_unused=True)  # fires the hooks; .grad untouched
                hooks.active = False
                uses = hooks.take()
                if not any(uses.values()):
                    continue
                n = self.layers.samples(uses, self.sink.run)
                if ids is None:
                    ids = batch_idx * positional + np.arange(n, dtype=np.int64)
                keep = None
                if split == "train":  # the policy's sample selection holds in this pass too
                    keep, why = self.selection.kept(ids)
                    if why:
                        continue
                labels = self.selection.labels(batch, n)
                step = Step(ids=ids, labels=labels, keep=keep, backward_done=True)
                multiplier = grad_multiplier(self.policy.loss_reduction, n)
                self.write(log, uses, step, multiplier, global_step, lr, split)

    @contextlib.contextmanager
    def _outside_training(self, module: nn.Module) -> Iterator[None]:
        """Eval mode and the global random state kept, for a pass that is not a training step.

        Iterating a loader draws from the global random generators (a shuffling sampler's seed, every
        DataLoader's base seed), so they are saved and restored: training goes on exactly as it would
        without this pass.
        """
        was_training = module.training
        module.eval()
        # Rows of these passes are never dropped (on_pressure="drop" is for training steps): the
        # writer's queue bounds their memory by making the pass wait.
        writer = self.sink.run.writer
        blocking, writer.block = writer.block, True
        try:
            with random_state_kept(module_device(module)):
                yield
        finally:
            writer.block = blocking
            self.layers.hooks.active = False
            self.layers.hooks.discard()
            module.train(was_training)

    def _write_layers(
        self, log: EpochLog, uses: dict[str, list], mult: float, step: Step, split: str
    ) -> dict[str, torch.Tensor]:
        """Appends the batch's rows of every planned layer, and (train rows) their exact squared
        norms where the policy keeps them, one column per planned layer.

        Returns:
            ``{layer: mask}`` of the layers whose encoding flagged their appended rows that hold NaN
            or Inf (see :meth:`RowSink.append_layer`): they need no check of their own.
        """
        epoch, sink, plans = log.epoch, self.sink, self.layers.plans
        # Every layer's choice before any row is written.
        newly_ready = self.layers.finalize(uses, sink.run.writer.write_rate)
        flagged: dict[str, torch.Tensor] = {}
        if newly_ready and self.plan is None and split == "train":
            self._plan(log, len(step.ids))  # before any row is written: it may refuse the epoch
        rows_before = sink.run.rows_written(epoch, split)
        norms: dict[int, torch.Tensor] = {}  # {column: squared norms}, on the rows' device
        for column, (name, plan) in enumerate(plans.items()):
            layer_uses = uses.get(name, [])
            if not plan.ready:
                continue  # it has not run yet
            if name in log.recomputed:
                continue  # its rows are recomputed from the epoch's weights when read
            if rows_before and not sink.has_layer(epoch, plan, split):  # rows before it first ran
                sink.append_layer(epoch, plan, zero_rows(plan, rows_before), None, split)
            rows = plan.rows(layer_uses, mult) if layer_uses else zero_rows(plan, len(step.ids))
            if split == "train" and (self.policy.norms == "all" or plan.sqnorm_is_cheap):
                norms[column] = plan.sqnorms(rows)
            elif split == "train":
                log.without_norms.add(name)
            flags = sink.append_layer(epoch, plan, rows, step.keep, split)
            if flags is not None and layer_uses:
                flagged[name] = flags
        if split == "train":
            sqnorms = _columns(norms, len(step.ids), len(plans))
            if sink.append_sqnorms(epoch, sqnorms, step.keep, rows_before):
                log.sqnorm_gap = True  # this epoch's stored norms miss rows: readers use the factors
        if newly_ready:
            never = [n for n, p in plans.items() if not p.ready]
            sink.run.update_meta(layers=self.layers.specs())
            if never:
                self._warn(
                    f"GradientCapture: selected layers {never} produced no output gradient in the first "
                    "captured batch (applied functionally, unused, or frozen upstream); they are not captured "
                    "until they do."
                )
        return flagged

    def _plan(self, log: EpochLog, batch_size: int) -> None:
        """Logs the storage plan once, records it in the store, and refuses an epoch that cannot fit.

        Raises:
            DiskSpaceError: the epoch's rows would exceed the local store's free space.
        """
        rows = rows_per_epoch(log.batches, batch_size, self.policy)
        self.plan = storage_plan(self.layers.ready(), rows, self.sink.run.uri)
        self._info(self.plan.describe())
        self.sink.run.update_meta(plan=self.plan.to_json())
        self.plan.check_fits(self.policy)


def _columns(norms: dict[int, torch.Tensor], n: int, width: int) -> torch.Tensor:
    """A batch's ``(n, width)`` float64 squared norms from ``{column: norms}``; zeros elsewhere."""
    device = next(iter(norms.values())).device if norms else None
    out = torch.zeros(n, width, dtype=torch.float64, device=device)
    for column, values in norms.items():
        out[:, column] = values
    return out
