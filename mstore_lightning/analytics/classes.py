"""Class aggregates on the factors: per-class gradient sums, and how classes and samples pull.

For a layer with ``G_i = Σ_t d_t a_tᵀ``, the sum over the samples of class ``c`` is ``D_cᵀ A_c``: one
matrix product over the class's rows and positions, chunk by chunk, never one gradient at a time.
A sample *opposes* its class when ``⟨g_i, G_{y_i}⟩ < 0``: its own gradient pushes against the
direction the rest of its class moves the weights, as mislabeled samples tend to. That inner product
is ``Σ_t d_tᵀ W_c a_t`` (plus the bias term), again on the factors.

Only samples with a recorded label (``>= 0``) count. Layers stored as projections are refused: their
sketches do not live in parameter space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mstore_lightning.analytics import kernels
from mstore_lightning.analytics.frames import frame
from mstore_lightning.analytics.kernels import as_scan
from mstore_lightning.core.representation import MATRIX


@dataclass
class ClassGradients:
    """``grads[layer][param]``: ``(len(classes), *param.shape)`` sums of per-sample gradients."""

    classes: np.ndarray
    grads: dict[str, dict[str, Tensor]]
    counts: np.ndarray  # samples of each class
    matrices: dict[str, Tensor] = field(default_factory=dict, repr=False)  # (C, G, O, I) weight sums

    def to_pandas(self) -> Any:
        """One row per class: its sample count and the norm of its gradient sum."""
        return frame({"class": self.classes, "count": self.counts, "norm": self.flat().norm(dim=1).numpy()})

    def flat(self) -> Tensor:
        """``(classes, parameters)``: every layer's parameters concatenated."""
        return torch.cat(
            [g.reshape(len(self.classes), -1) for lay in self.grads.values() for g in lay.values()], 1
        )


@dataclass
class ClassConflicts:
    """How class gradients align, and which samples oppose their own class."""

    classes: np.ndarray
    cosine: np.ndarray  # (classes, classes) cosine between class gradients
    opposing_share: np.ndarray  # (classes,) share of each class's samples with <g_i, G_y> < 0
    ids: np.ndarray  # sample ids of the epoch, with
    alignment: np.ndarray  # <g_i, G_{y_i}> / (|g_i| |G_{y_i}|), NaN where the label is unknown

    def to_pandas(self) -> Any:
        """One row per sample: its id and its alignment with its class's gradient."""
        return frame({"id": self.ids, "alignment": self.alignment})


KEEP_BYTES = 64 << 20  # decoded rows kept from the class sums' pass for the alignment pass


def class_gradients(
    store: Any,
    epoch: int,
    layers: Sequence[str] | None = None,
    weights: np.ndarray | None = None,
    keep: dict[str, list[tuple[int, dict[str, Tensor]]]] | None = None,
) -> ClassGradients:
    """Sums of per-sample gradients over the samples of each labelled class in ``epoch``; with
    ``weights`` (one per row), of the gradients scaled by them. With ``keep``, the decoded blocks
    are kept there by layer (``(first row, rows)``) while they fit :data:`KEEP_BYTES`, for a second
    pass that would read them again."""
    scan = as_scan(store)
    labels = scan.catalog.row_field(epoch, "label")
    classes = np.unique(labels[labels >= 0])
    grads, matrices = {}, {}
    kept = 0
    for src in scan.sources(epoch, layers):
        rep, sums = src.rep, {}
        for block in src.blocks():
            rows = block.load()
            if keep is not None and kept <= KEEP_BYTES:
                keep.setdefault(rep.name, []).append((block.first, rows))
                kept += sum(v.numel() * v.element_size() for v in rows.values())
            if weights is not None:
                rows = rep.scaled(rows, torch.from_numpy(weights[block.first : block.first + block.rows]))
            block_labels = labels[block.first : block.first + block.rows]
            for k, c in enumerate(classes):
                mask = torch.from_numpy(block_labels == c)
                if not mask.any():
                    continue
                for p, g in rep.class_sum({n: v[mask] for n, v in rows.items()}).items():
                    if p not in sums:
                        sums[p] = torch.zeros((len(classes), *g.shape), dtype=torch.float64)
                    sums[p][k] += g.double()
        if MATRIX in sums:
            matrices[rep.name] = sums.pop(MATRIX)
        grads[rep.name] = {
            p: sums.get(p, torch.zeros((len(classes), *rep.param_shapes[p]), dtype=torch.float64))
            for p in rep.params
        }
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.int64)
    return ClassGradients(classes, grads, counts, matrices)


def class_conflicts(
    store: Any, epoch: int, layers: Sequence[str] | None = None, unit: bool = False
) -> ClassConflicts:
    """Cosines between class gradients, and each sample's alignment with its class's gradient.

    With ``unit``, a class's gradient is the sum of its samples' *unit* gradients: each sample one
    vote for a direction, so the few samples with large gradients (the mislabeled ones, late in
    training) do not make the class's direction their own.
    """
    scan = as_scan(store)
    sample_norms = np.sqrt(kernels.sqnorms(scan, epoch, layers))
    weights = None
    if unit:  # a zero gradient has no direction: it votes for none (and 1/0 would poison the sum)
        weights = np.divide(1.0, sample_norms, out=np.zeros_like(sample_norms), where=sample_norms > 0)
    kept: dict[str, list[tuple[int, dict[str, Tensor]]]] = {}
    cg = class_gradients(scan, epoch, layers, weights, keep=kept)
    flat = cg.flat()
    norms = flat.norm(dim=1)
    cosine = (flat @ flat.T) / torch.outer(norms, norms).clamp_min(torch.finfo(torch.float64).tiny)
    labels = scan.catalog.row_field(epoch, "label")
    index = {int(c): k for k, c in enumerate(cg.classes)}
    dots = np.zeros(len(labels), dtype=np.float64)
    whole = sum(len(b) for b in kept.values()) and all(
        sum(r[next(iter(r))].shape[0] for _, r in kept.get(s.rep.name, [])) == len(labels)
        for s in scan.sources(epoch, layers)
    )
    for src in scan.sources(epoch, layers):
        rep = src.rep
        blocks = kept[rep.name] if whole else ((b.first, b.load()) for b in src.blocks())
        for first, rows in blocks:
            labels_here = labels[first : first + next(iter(rows.values())).shape[0]]
            for c, k in index.items():
                mask = labels_here == c
                if mask.any():
                    sel = {n: v[torch.from_numpy(mask)] for n, v in rows.items()}
                    matrix = cg.matrices[rep.name][k] if rep.name in cg.matrices else None
                    sums = {p: g[k] for p, g in cg.grads[rep.name].items()}
                    dots[first + np.nonzero(mask)[0]] += rep.dot_class(sel, sums, matrix).numpy()
    known = (labels >= 0) & (sample_norms > 0)  # a zero gradient has no alignment: NaN
    alignment = np.full(len(labels), np.nan)
    class_norm = norms.numpy()[[index[int(c)] for c in labels[known]]]
    alignment[known] = dots[known] / np.maximum(sample_norms[known] * class_norm, np.finfo(np.float64).tiny)
    share = np.array([(dots[labels == c] < 0).mean() for c in cg.classes])
    return ClassConflicts(cg.classes, cosine.numpy(), share, scan.catalog.row_field(epoch, "ids"), alignment)
