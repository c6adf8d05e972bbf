"""The storage plan, made once every captured layer's form is known (after the first captured batch):
what each layer stores a sample, what an epoch will take, and whether it fits where the store is.

Sizes are bytes before compression, which int8 codes barely shrink: an upper bound on disk.

Example::

    plan = storage_plan(layers.ready(), rows_per_epoch=60_000, store="runs/s.zarr")
    info(plan.describe())
    plan.check_fits(policy)  # raises DiskSpaceError when the first epoch cannot fit
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from mstore_lightning.capture.layers import LayerPlan
from mstore_lightning.config import CapturePolicy
from mstore_lightning.core import quant
from mstore_lightning.store import layout


class DiskSpaceError(RuntimeError):
    """The first captured epoch would not fit in the store's free space; nothing of it is written."""


@dataclass
class StoragePlan:
    """What the capture will store.

    Attributes:
        layers: ``{layer: {"representation", "precision", "bytes_per_sample", "error"}}``.
        bytes_per_sample: every layer's bytes and the row fields (ids, step, label, loss, lr, norms).
        rows_per_epoch: rows an epoch will capture on this process, when the loader tells.
        free_bytes: free space where a local store lives (``None`` for a remote one).
        store: the store's path or URL.
    """

    layers: dict[str, dict[str, Any]]
    bytes_per_sample: int
    rows_per_epoch: int | None
    free_bytes: int | None
    store: str

    @property
    def bytes_per_epoch(self) -> int | None:
        return None if self.rows_per_epoch is None else self.rows_per_epoch * self.bytes_per_sample

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "bytes_per_sample": self.bytes_per_sample,
            "rows_per_epoch": self.rows_per_epoch,
            "bytes_per_epoch": self.bytes_per_epoch,
            "free_bytes": self.free_bytes,
        }

    def describe(self) -> str:
        """The plan as a few lines: the largest layers, the totals and the free space."""
        lines = [f"GradientCapture storage plan for {self.store} (before compression):"]
        ranked = sorted(self.layers.items(), key=lambda kv: -kv[1]["bytes_per_sample"])
        for name, layer in ranked[:12]:
            lines.append(
                f"  {name}: {layer['representation']}, {layer['precision']}, "
                f"{_size(layer['bytes_per_sample'])}/sample, {layer['error']}"
            )
        if len(ranked) > 12:
            rest = sum(v["bytes_per_sample"] for _, v in ranked[12:])
            lines.append(f"  ... {len(ranked) - 12} more layers: {_size(rest)}/sample")
        total = f"  total {_size(self.bytes_per_sample)}/sample"
        if self.rows_per_epoch is not None:
            total += f"; {self.rows_per_epoch:,} rows an epoch: {_size(self.bytes_per_epoch)} an epoch"
        if self.free_bytes is not None:
            total += f"; {_size(self.free_bytes)} free"
        lines.append(total)
        return "\n".join(lines)

    def check_fits(self, policy: CapturePolicy) -> None:
        """Raises :class:`DiskSpaceError` when one epoch's rows exceed the free space."""
        need = self.bytes_per_epoch
        if need is None or self.free_bytes is None or need <= self.free_bytes:
            return
        fit = max(1, int(self.free_bytes // max(1, self.rows_per_epoch)))
        largest = sorted(self.layers, key=lambda n: -self.layers[n]["bytes_per_sample"])[:3]
        share = self.free_bytes / need
        raise DiskSpaceError(
            f"GradientCapture: the first epoch would not fit in {self.store}: {self.rows_per_epoch:,} rows "
            f"x {_size(self.bytes_per_sample)}/sample = {_size(need)} before compression, and "
            f"{_size(self.free_bytes)} is free. Nothing of this epoch was written. To fit, keep about "
            f"{_size(fit)} a sample or fewer rows: budget={{'bytes_per_sample': {fit}}} projects the "
            f"largest layers ({', '.join(largest)}) until the capture fits; layers=[...] leaves some out; "
            f"samples={min(0.99, share):.2g} captures that share of the samples; every_n_steps="
            f"{max(2, math.ceil(1 / share))} captures one step in that many;{_precision_hint(policy)} or free "
            f"space, or write to a larger disk (the policy now: precision={policy.precision!r}, "
            f"budget={policy.budget!r})."
        )


def storage_plan(plans: dict[str, LayerPlan], rows_per_epoch: int | None, store: str) -> StoragePlan:
    """The plan of the ready ``plans``."""
    layers = {}
    for name, plan in plans.items():
        nbytes = sum(quant.row_nbytes(spec) for spec in plan.arrays.values())
        encodings = sorted({spec["encoding"] for spec in plan.arrays.values() if spec["encoding"] != "int64"})
        layers[name] = {
            "representation": plan.choice.get("kept", plan.representation),
            "precision": "/".join(encodings) or "ids",
            "bytes_per_sample": int(nbytes),
            "error": _error(plan, encodings),
        }
    fields = sum(np.dtype(dtype).itemsize for dtype in layout.ROW_FIELDS.values()) + 4 * len(plans)
    total = sum(v["bytes_per_sample"] for v in layers.values()) + fields
    return StoragePlan(layers, int(total), rows_per_epoch, free_space(store), store)


def rows_per_epoch(batches: int | None, batch_size: int, policy: CapturePolicy) -> int | None:
    """Rows one epoch will capture on this process: ``batches`` of ``batch_size``, thinned by the
    policy's ``every_n_steps`` and ``samples``."""
    if batches is None or not math.isfinite(batches):
        return None
    rows = math.ceil(int(batches) / policy.every_n_steps) * batch_size
    if isinstance(policy.samples, float):
        rows = math.ceil(rows * policy.samples)
    elif isinstance(policy.samples, dict):
        rows = min(rows, len(policy.samples.get("ids", [])))
    return int(rows)


def free_space(store: str) -> int | None:
    """Free bytes on the disk of a local store (its nearest existing directory); ``None`` for URLs."""
    if layout.is_url(store) and not store.startswith("file://"):
        return None
    path = os.path.abspath(store.removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def _error(plan: LayerPlan, encodings: list[str]) -> str:
    if plan.projection is not None:
        return f"inner-product error std <= {plan.projection['predicted_error']:.3g}"
    if plan.summary:
        return "approximate (pooled)"
    if any(e.startswith("int8") for e in encodings):
        return "exact form; int8 codes within max|x|/254 of each group"
    if any(e in ("float16", "bfloat16-bits") for e in encodings):
        return "exact form; rounded to 16-bit floats"
    if any(e.startswith(("kbit", "threshold")) for e in encodings):
        return "exact form; k-bit codes"
    return "exact"


def _precision_hint(policy: CapturePolicy) -> str:
    if policy.precision == "fp32":
        return " precision='int8' stores about a quarter;"
    if policy.precision in ("fp16", "bf16"):
        return " precision='int8' stores about half;"
    return ""


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"
