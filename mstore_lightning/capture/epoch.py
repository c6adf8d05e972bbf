"""Per-epoch bookkeeping of one rank: what its captured epoch dropped, found non-finite or left unnormed.

At the epoch's end :meth:`EpochLog.record` writes it on the rank's group of the store (readers count
dropped rows, list non-finite samples and trust the stored norms from it) and warns about it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mstore_lightning.capture.layers import LayerPlan
from mstore_lightning.core.transfer import host_array
from mstore_lightning.store.dedup import RowIndex
from mstore_lightning.store.session import RunWriter


@dataclass
class EpochLog:
    """What one captured epoch of this rank has counted so far.

    Attributes:
        epoch: the epoch.
        lr_groups: the learning rate of each optimizer's parameter groups at the epoch's start.
        recomputed: layers whose rows this epoch does not store: reads recompute them from its weights.
        positional_bs: the batch size when positions in the training loader are dataset indices.
        loader_note: how the training loader samples, for the message when batches carry no ids.
        started: ``time.perf_counter()`` at the epoch's start.
        nonfinite_masks: each step's ids, and which of its samples' factors hold NaN or Inf,
            where its rows are (on CUDA, read only at the epoch's end: see :attr:`nonfinite`).
        dropped: rows not stored because the writer was behind (``on_pressure="drop"``).
        sqnorm_gap: the stored norms miss rows, so readers compute norms from the factors.
        without_norms: layers whose norms this epoch does not keep (``policy.norms="cheap"``).
        batches: training batches in the epoch, where the loader tells (for the storage plan).
    """

    epoch: int
    lr_groups: list[list[float]]
    recomputed: set[str]
    positional_bs: int | None = None
    loader_note: str = ""
    started: float = field(default_factory=time.perf_counter)
    nonfinite_masks: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
    dropped: int = 0
    sqnorm_gap: bool = False
    without_norms: set[str] = field(default_factory=set)
    batches: float | None = None  # training batches in the epoch, where the loader tells

    @property
    def nonfinite(self) -> list[int]:
        """Ids of the samples whose factors hold NaN or Inf (one per row)."""
        out: list[int] = []
        for ids, mask in self.nonfinite_masks:
            out.extend(host_array(ids)[mask.cpu().numpy()].tolist())
        return out

    @property
    def seconds(self) -> float:
        """Seconds since the epoch started."""
        return time.perf_counter() - self.started

    def record(
        self,
        run: RunWriter,
        plans: Mapping[str, LayerPlan],
        dedup: RowIndex | None,
        own_rows: int,
        total_rows: int,
        queue_bytes: int,
    ) -> None:
        """Writes this rank's attributes of the finished epoch and warns about what went amiss.

        Args:
            run: the open store.
            plans: the captured layers (the columns of the stored norms).
            dedup: the run's deduplication index, whose statistics are taken.
            own_rows: this rank's rows of the epoch.
            total_rows: every rank's rows of the epoch.
            queue_bytes: the writer's queue bound, for the message about dropped rows.
        """
        epoch = self.epoch
        run.set_rank_attrs(epoch, rows=own_rows)
        if not self.sqnorm_gap:
            run.set_rank_attrs(
                epoch,
                sqnorms={
                    "columns": list(plans),
                    "layers": [
                        n
                        for n, p in plans.items()
                        if p.ready and n not in self.recomputed and n not in self.without_norms
                    ],
                },
            )
        if dedup is not None:
            run.set_rank_attrs(epoch, dedup=dedup.take_stats())
        if run.rank == 0 and not total_rows:
            warnings.warn(
                f"GradientCapture: epoch {epoch} captured no rows (the policy's samples or every_n_steps "
                "selected none, or no batch ran); it is committed empty.",
                stacklevel=2,
            )
        nonfinite = self.nonfinite
        if nonfinite:
            bad = sorted(set(nonfinite))
            run.set_rank_attrs(epoch, nonfinite={"rows": len(nonfinite), "ids": bad[:1000]})
            warnings.warn(
                f"GradientCapture: {len(bad)} sample(s) of epoch {epoch} have NaN or Inf gradients (ids "
                f"{bad[:10]}{' ...' if len(bad) > 10 else ''}). They are stored as they are: their norms "
                "and influence read NaN (store.nonfinite(epoch) lists them).",
                stacklevel=2,
            )
        if self.dropped:
            run.set_rank_attrs(epoch, dropped={"rows": self.dropped})
            warnings.warn(
                f"GradientCapture dropped {self.dropped} row(s) of epoch {epoch} on rank "
                f"{run.rank}: the store writer was {queue_bytes} bytes behind "
                "(on_pressure='drop'). Those samples are missing from the epoch; store.dropped(epoch) "
                "counts them. Use on_pressure='block' to keep every row, or a faster store.",
                stacklevel=2,
            )

    def commit_attrs(self, total_rows: int, world_size: int, global_step: int) -> dict[str, Any]:
        """The attributes the epoch is committed with."""
        return {
            "recomputed": sorted(self.recomputed),
            "lr": self.lr_groups[0][0] if self.lr_groups and self.lr_groups[0] else None,
            "lr_groups": self.lr_groups,
            "rows": total_rows,
            "world_size": world_size,
            "global_step_end": global_step,
        }
