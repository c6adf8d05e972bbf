"""Which samples of a batch are captured, under which ids and labels: the policy's sample selection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mstore_lightning.capture.identity import MISSING_IDS, batch_ids, batch_labels, batch_size
from mstore_lightning.config import CapturePolicy
from mstore_lightning.core.transfer import HostCopy, host_array


@dataclass
class Step:
    """What one captured batch has told us so far."""

    ids: np.ndarray | HostCopy | None  # None: numbered by position once the batch size is seen
    labels: np.ndarray | HostCopy | None
    keep: torch.Tensor | None  # positions of kept samples; None keeps all
    batch_idx: int = 0
    amp_scale: float = 1.0
    backward_done: bool = False
    dropped: bool = False  # not stored: the writer was behind (on_pressure="drop")
    signals: Any = None  # (loss, margin) per sample, where the rows show them (see capture.signals)


class SampleSelection:
    """Finds a batch's sample ids and labels, and the samples the policy keeps.

    Args:
        policy: the capture policy (``samples``, ``sample_seed``).
        sample_ids: ``callable(batch) -> ids`` (see :func:`.identity.batch_ids`).
        labels: ``callable(batch) -> labels`` (see :func:`.identity.batch_labels`).
    """

    def __init__(
        self,
        policy: CapturePolicy,
        sample_ids: Callable[[Any], Any] | None = None,
        labels: Callable[[Any], Any] | None = None,
    ) -> None:
        self.policy = policy
        self._ids_fn, self._labels_fn = sample_ids, labels

    def step(
        self, batch: Any, batch_idx: int, positional: int | None, why_no_ids: str
    ) -> tuple[Step | None, str]:
        """The step of a training batch, or ``None`` and why when the policy keeps none of it.

        Args:
            batch: the batch.
            batch_idx: its position in the epoch.
            positional: the loader's batch size when positions in it are dataset indices.
            why_no_ids: how the loader samples, for the error when the batch carries no ids.

        Raises:
            RuntimeError: the batch carries no ids and ``positional`` is ``None``.
        """
        ids = self.ids(batch)  # None: numbered by position once the batch size is seen
        if ids is None and positional is None:
            raise RuntimeError(MISSING_IDS.format(why=why_no_ids))
        keep = None
        if ids is not None:
            keep, why = self.kept(ids)
            if why:
                return None, why
        labels = self.labels(batch, len(ids) if ids is not None else batch_size(batch))
        return Step(ids=ids, labels=labels, keep=keep, batch_idx=batch_idx), ""

    def number(self, step: Step, n: int, positional: int | None) -> str:
        """Numbers a step's ``n`` samples by position when its batch carried no ids; returns why the
        policy keeps none of them, or ``""``.

        Raises:
            RuntimeError: the batch's ids are not one per sample the model saw.
        """
        if step.ids is None:
            step.ids = step.batch_idx * positional + np.arange(n, dtype=np.int64)
            step.keep, why = self.kept(step.ids)
            if why:
                return why
        if len(step.ids) != n:
            raise RuntimeError(
                f"The batch carries {len(step.ids)} sample ids but the model saw {n} samples; "
                "ids must give one dataset index per sample in the batch."
            )
        return ""

    def ids(self, batch: Any) -> np.ndarray | HostCopy | None:
        """The batch's sample ids as int64, or ``None`` when it carries none."""
        return batch_ids(batch, self._ids_fn)

    def labels(self, batch: Any, n: int) -> np.ndarray | HostCopy | None:
        """The batch's ``n`` integer labels when they can be found, else ``None``."""
        return batch_labels(batch, n, self._labels_fn)

    def kept(self, ids: np.ndarray | HostCopy) -> tuple[torch.Tensor | None, str]:
        """Positions of the samples the policy keeps among ``ids`` (``None``: all), or why none.

        Only a policy that keeps some samples reads ids on CUDA back, and so waits for the device.
        """
        if self.policy.samples == "all" and len(ids):
            return None, ""
        mask = self.policy.sample_mask(host_array(ids))
        if not mask.any():
            return None, "the policy's samples select none of the batch"
        return (None if mask.all() else torch.from_numpy(np.nonzero(mask)[0])), ""
