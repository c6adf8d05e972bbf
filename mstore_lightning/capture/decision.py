"""The measured store-or-recompute decision of each stored layer (see :mod:`.recompute`), and the
random state kept around the passes that are not training steps."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mstore_lightning.capture.collectives import Collectives
from mstore_lightning.capture.layers import LayerPlan
from mstore_lightning.capture.layerset import LayerSet
from mstore_lightning.capture.recompute import Recomputer, gamma, layer_nbytes, read_seconds_per_sample
from mstore_lightning.config import CapturePolicy
from mstore_lightning.store.session import RunWriter


def decide(
    module: nn.Module,
    probe: Any,
    layers: LayerSet,
    run: RunWriter,
    epoch: int,
    policy: CapturePolicy,
    collectives: Collectives,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """Rank 0 measures, on ``probe``, the costs of each stored layer not decided yet; every process
    records the decisions in ``layers.recompute`` and rank 0 in the run metadata."""
    decisions: dict[str, dict[str, Any]] = {}
    if collectives.rank == 0 and probe is not None:
        decisions = store_or_recompute(
            module,
            probe,
            layers.ready(),
            run,
            epoch,
            policy.recompute,
            policy.loss_reduction,
            loss_fn,
            decided=layers.recompute,
        )
    layers.recompute.update(collectives.broadcast(decisions))
    run.update_meta(recompute=layers.recompute)


def store_or_recompute(
    module: nn.Module,
    probe: Any,
    plans: Mapping[str, LayerPlan],
    run: RunWriter,
    epoch: int,
    rule: Mapping[str, Any],
    loss_reduction: str,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    decided: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Measures read and recompute costs of each of ``plans`` after ``epoch`` and decides per layer.

    Args:
        module: the model, with the epoch's weights.
        probe: a training batch, whose forward and backward pass is timed.
        plans: the captured layers whose representation is chosen; one pass recomputes them all.
        run: the open store holding the finished ``epoch``.
        epoch: the epoch whose stored rows are read back.
        rule: the policy's ``recompute`` rule (``threshold_s_per_gb``, ``expected_queries``).
        loss_reduction: the policy's loss reduction.
        loss_fn: ``callable(module, batch) -> loss``; by default ``training_step``'s loss.
        decided: layers decided before (or by the policy), left out of the result.

    Returns:
        ``{layer: decision}``: ``"store"`` or ``"recompute"`` with the measurements behind it.
    """
    recomputer = Recomputer(module, None, dict(plans), loss_reduction, loss_fn=loss_fn)
    with random_state_kept(module_device(module)):
        t_recompute = recomputer.seconds_per_sample(probe)
    rows = run.rows_in_epoch(epoch)
    decisions = {}
    for name, plan in plans.items():
        if name in decided:
            continue
        group = run.layer_group(epoch, name)
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
    return decisions


@contextlib.contextmanager
def random_state_kept(device: torch.device) -> Iterator[None]:
    """Restores Python's, NumPy's and torch's global random state (``device``'s too, on CUDA) after
    the block: training goes on as it would without what ran inside."""
    devices = [device] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` is: its own ``device`` (a LightningModule's), else its first parameter's."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
