"""Hands a rank's captured rows to the store writer: each layer's arrays and the per-row fields.

The training thread encodes each batch's rows where they were made (casts, or int8 codes with their
scales: :func:`~mstore_lightning.core.tensor_codes.encode_rows`) and hands the bytes to the writer's chunk
buffers; the writer thread splits them into their stored parts and deduplicates rows that can repeat,
with the coder :meth:`RowSink.coding` builds when an array is opened.

Example::

    sink = RowSink(run, rank=0, dedup=RowIndex())
    sink.append_layer(epoch, plan, plan.rows(uses, multiplier), keep=None)
    sink.append_row_fields(epoch, ids, labels, keep=None, global_step=12, lr=0.1)
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mstore_lightning.capture.layers import LayerPlan
from mstore_lightning.core import quant, tensor_codes
from mstore_lightning.core.transfer import HostCopy, as_rows
from mstore_lightning.store import layout
from mstore_lightning.store.buffers import Coder, PartSpec
from mstore_lightning.store.dedup import RowIndex, RowRefs
from mstore_lightning.store.session import RunWriter


class RowSink:
    """Appends one rank's rows of each epoch to its store, through the run's background writer.

    Args:
        run: the open store of this process.
        rank: this process's rank (deduplication references name it).
        dedup: the run's index of stored input rows (``policy.dedup``), or ``None``.
        chunk_rows: rows per chunk of each layer, kept across runs by the caller.
    """

    def __init__(
        self, run: RunWriter, rank: int, dedup: RowIndex | None, chunk_rows: dict[str, int] | None = None
    ) -> None:
        self.run, self.rank, self.dedup = run, rank, dedup
        self._chunk_rows = {} if chunk_rows is None else chunk_rows

    def has_layer(self, epoch: int, plan: LayerPlan, split: str = "train") -> bool:
        """Whether ``plan``'s first array was opened in ``epoch`` (the layer ran in a batch)."""
        group = self.run.rank_group(epoch, split)
        return self.run.writer.has_array(group, f"{layout.LAYERS}/{plan.name}/{next(iter(plan.arrays))}")

    def append_layer(
        self,
        epoch: int,
        plan: LayerPlan,
        rows: dict[str, torch.Tensor],
        keep: torch.Tensor | None,
        split: str = "train",
    ) -> torch.Tensor | None:
        """Appends a batch's rows of every array of ``plan``, the samples in ``keep`` (all: ``None``).

        Returns:
            Which of the appended rows hold NaN or Inf, where every floating-point array's encoding
            tells (int8 and chunk codes: their group maxima); else ``None``.
        """
        # Encoded here, in a few vectorised ops; the writer thread deduplicates (see coding).
        chunk_rows = self.layer_chunk_rows(plan)
        masks: list[torch.Tensor | None] = []
        for array, values in rows.items():
            spec = plan.arrays[array]
            encoded = tensor_codes.encode_rows(spec, select_rows(values, keep))
            self.run.append(
                epoch,
                f"{layout.LAYERS}/{plan.name}/{array}",
                encoded.data,
                quant.buffer_dtype(spec),
                chunk_rows,
                coding=functools.partial(self.coding, plan, array, split, epoch),
                split=split,
            )
            if spec["encoding"] != "int64":  # ids are never NaN
                masks.append(encoded.nonfinite())
        if not masks or any(m is None for m in masks):
            return None
        return torch.stack(masks).any(dim=0)

    def coding(self, plan: LayerPlan, array: str, split: str, epoch: int) -> tuple[list[PartSpec], Coder]:
        """The stored parts of one of a layer's arrays, and the writer-side coder that makes them from
        the handed-over rows: their parts split, then (for rows that can repeat) deduplicated against
        the run's index."""
        spec, prefix = plan.arrays[array], f"{layout.LAYERS}/{plan.name}/"
        parts, refs = [], None
        for s in quant.stored_arrays({array: spec}):
            if s.role == "table":
                continue  # a chunk codec's tables: the writer makes them with the codes
            if s.role == "ref":  # query rows are stored in full: references point only at training rows
                parts.append(PartSpec(prefix + s.name, s.row_shape, np.dtype(s.dtype)))
                index = self.dedup if split == "train" else None
                refs = RowRefs(index, f"{plan.name}/{array}", prefix + s.name, epoch, self.rank)
                continue
            codec = quant.chunk_codec(spec, array, s.name)
            shape, dtype = (codec.row_shape, np.float32) if codec else (s.row_shape, s.dtype)
            # Only training rows are references; and a reference to (epoch 0, rank 0, row 0) is zeros
            # too, so reference chunks are always written: a missing one is damage.
            parts.append(
                PartSpec(prefix + s.name, shape, np.dtype(dtype), s.dedup and split == "train", codec)
            )

        def coder(rows: np.ndarray, first_row: int) -> dict[str, np.ndarray]:
            coded = {prefix + k: v for k, v in quant.split_rows(spec, rows).items()}
            return refs(coded, first_row) if refs is not None else coded

        return parts, coder

    def layer_chunk_rows(self, plan: LayerPlan) -> int:
        """Rows per chunk of ``plan``'s arrays: one chunk of each holds about ``chunk_bytes``."""
        if plan.name not in self._chunk_rows:
            stored = sum(quant.row_nbytes(spec) for spec in plan.arrays.values())
            buffered = sum(quant.buffered_nbytes(spec) for spec in plan.arrays.values())
            self._chunk_rows[plan.name] = self.run.writer.chunk_rows_for(stored, buffered)
        return self._chunk_rows[plan.name]

    def append_sqnorms(
        self, epoch: int, sqnorms: torch.Tensor, keep: torch.Tensor | None, rows_before: int
    ) -> bool:
        """Appends a batch's squared norms, one column per planned layer.

        Returns:
            Whether the epoch's earlier rows have no stored norms (they were padded with zeros).
        """
        group, name = self.run.rank_group(epoch), f"{layout.ROWS}/{layout.SQNORMS}"
        gap = bool(rows_before) and not self.run.writer.has_array(group, name)
        if gap:  # rows from before these norms were kept (a resumed run of an older version)
            self.run.append(epoch, name, torch.zeros(rows_before, sqnorms.shape[1]), np.float32)
        self.run.append(epoch, name, select_rows(sqnorms.float(), keep), np.float32)
        return gap

    def append_row_fields(
        self,
        epoch: int,
        ids: np.ndarray | HostCopy,
        labels: np.ndarray | HostCopy | None,
        keep: torch.Tensor | None,
        global_step: int,
        lr: float,
        without_loss: bool = False,
        split: str = "train",
    ) -> None:
        """Appends a batch's ids, step, labels (``-1``: unknown) and learning rate; with
        ``without_loss`` (a pass that computes no per-sample loss) NaN losses too."""
        n = len(ids)
        fields = {
            "ids": as_rows(ids),
            "step": torch.full((n,), global_step, dtype=torch.int64),
            "label": as_rows(labels) if labels is not None else torch.full((n,), -1),
            "lr": torch.full((n,), lr, dtype=torch.float64),
        }
        if without_loss:
            fields["loss"] = torch.full((n,), float("nan"), dtype=torch.float32)
        for name, values in fields.items():
            self.append_row_field(epoch, name, select_rows(values, keep), split)

    def append_margins(self, epoch: int, margins: torch.Tensor) -> None:
        """Appends a training step's margins (``rows/margin``, see ``capture.signals``)."""
        chunk_rows = self.run.writer.chunk_rows_for(8 * len(layout.ROW_FIELDS))
        self.run.append(epoch, f"{layout.ROWS}/{layout.MARGINS}", margins, np.float32, chunk_rows)

    def append_row_field(self, epoch: int, name: str, values: torch.Tensor, split: str = "train") -> None:
        """Appends rows of one of :data:`layout.ROW_FIELDS`."""
        chunk_rows = self.run.writer.chunk_rows_for(8 * len(layout.ROW_FIELDS))
        self.run.append(
            epoch, f"{layout.ROWS}/{name}", values, layout.ROW_FIELDS[name], chunk_rows, split=split
        )


def select_rows(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``values`` at positions ``keep`` (all of them: ``None``)."""
    return values if keep is None else values.index_select(0, keep.to(values.device))


def zero_rows(plan: LayerPlan, n: int) -> dict[str, torch.Tensor]:
    """``n`` rows of zeros for each of ``plan``'s arrays."""
    # A layer that did not run in a batch has zero gradient there; zeros keep rows aligned.
    out = {}
    for name, info in plan.arrays.items():
        dtype = torch.int64 if info["dtype"] == "int64" else torch.float32
        out[name] = torch.zeros((n, *info["row_shape"]), dtype=dtype)
    return out
