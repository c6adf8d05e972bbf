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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mstore_lightning.analytics.frames import frame
from mstore_lightning.core.families.kron import KroneckerExtractor
from mstore_lightning.core.families.registry import extractor_for_kind

if TYPE_CHECKING:
    from mstore_lightning.store.reader import GradientStore


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


def class_gradients(store: GradientStore, epoch: int, layers: Sequence[str] | None = None) -> ClassGradients:
    """Sums of per-sample gradients over the samples of each labelled class in ``epoch``."""
    labels = store.row_field(epoch, "label")
    classes = np.unique(labels[labels >= 0])
    grads, matrices = {}, {}
    for layer in _layers(store, layers):
        spec = store.layer_spec(layer)
        ext = extractor_for_kind(spec["kind"])
        sums: dict[str, Tensor] = {}
        for lo, rows in store.blocks(epoch, layer):
            block_labels = labels[lo : lo + _n(rows)]
            for k, c in enumerate(classes):
                mask = torch.from_numpy(block_labels == c)
                if not mask.any():
                    continue
                for p, g in _class_sum(spec, ext, {n: v[mask] for n, v in rows.items()}).items():
                    if p not in sums:
                        sums[p] = torch.zeros((len(classes), *g.shape), dtype=torch.float64)
                    sums[p][k] += g.double()
        if _MATRIX in sums:
            matrices[layer] = sums.pop(_MATRIX)
        grads[layer] = {
            p: sums.get(p, torch.zeros((len(classes), *spec["param_shapes"][p]), dtype=torch.float64))
            for p in spec["params"]
        }
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.int64)
    return ClassGradients(classes, grads, counts, matrices)


def class_conflicts(store: GradientStore, epoch: int, layers: Sequence[str] | None = None) -> ClassConflicts:
    """Cosines between class gradients, and each sample's alignment with its class's gradient."""
    cg = class_gradients(store, epoch, layers)
    flat = cg.flat()
    norms = flat.norm(dim=1)
    cosine = (flat @ flat.T) / torch.outer(norms, norms).clamp_min(torch.finfo(torch.float64).tiny)
    labels = store.row_field(epoch, "label")
    index = {int(c): k for k, c in enumerate(cg.classes)}
    dots = np.zeros(len(labels), dtype=np.float64)
    for layer in _layers(store, layers):
        spec = store.layer_spec(layer)
        ext = extractor_for_kind(spec["kind"])
        for lo, rows in store.blocks(epoch, layer):
            block = labels[lo : lo + _n(rows)]
            for c, k in index.items():
                mask = block == c
                if mask.any():
                    sel = {n: v[torch.from_numpy(mask)] for n, v in rows.items()}
                    matrix = cg.matrices[layer][k] if layer in cg.matrices else None
                    dots[lo + np.nonzero(mask)[0]] += _dot_with(
                        spec, ext, sel, cg.grads[layer], k, matrix
                    ).numpy()
    sample_norms = np.asarray(store.norms(epoch, layers))
    known = labels >= 0
    alignment = np.full(len(labels), np.nan)
    class_norm = norms.numpy()[[index[int(c)] for c in labels[known]]]
    alignment[known] = dots[known] / np.maximum(sample_norms[known] * class_norm, np.finfo(np.float64).tiny)
    share = np.array([(dots[labels == c] < 0).mean() for c in cg.classes])
    return ClassConflicts(cg.classes, cosine.numpy(), share, store.sample_ids(epoch), alignment)


def _class_sum(spec: dict[str, Any], ext: Any, rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """The sum of the per-sample gradients of ``rows``, on the factors where the family allows."""
    params, hyper = spec["params"], spec["hyper"]
    if spec["representation"] == "projection":
        raise ValueError(
            f"Layer {spec['name']!r} is stored as a projection; class gradients need factors or full."
        )
    if spec["representation"] == "full":
        return {p: rows[p].sum(0) for p in params}
    if issubclass(ext, KroneckerExtractor):
        a_m, d_m = ext.matrices(hyper, rows["a"], rows["d"])
        out = {}
        if "weight" in params:
            out[_MATRIX] = torch.einsum("bgto,bgti->goi", d_m, a_m)  # the layout the factors multiply
            out["weight"] = ext.weight_from(hyper, out[_MATRIX][None])[0]
        if "bias" in params:
            out["bias"] = d_m.sum((0, 2)).reshape(-1)
        return out
    return {p: g.sum(0) for p, g in ext.restore(hyper, params, rows).items()}  # bounded by the block


def _dot_with(
    spec: dict[str, Any],
    ext: Any,
    rows: dict[str, Tensor],
    grads: dict[str, Tensor],
    k: int,
    matrix: Tensor | None,
) -> Tensor:
    """``⟨g_i, G_k⟩`` for each row, with ``G_k`` class ``k``'s gradient of this layer (``matrix``: its
    weight part in the ``(G, O, I)`` layout of the factors, for families that have one)."""
    params, hyper = spec["params"], spec["hyper"]
    if matrix is not None and spec["representation"] == "factors":
        a_m, d_m = ext.matrices(hyper, rows["a"], rows["d"])
        a_m, d_m = a_m.double(), d_m.double()
        out = torch.zeros(a_m.shape[0], dtype=torch.float64)
        if "weight" in params:
            out += torch.einsum("bgto,goi,bgti->b", d_m, matrix, a_m)
        if "bias" in params:
            out += d_m.sum(2).reshape(d_m.shape[0], -1) @ grads["bias"][k]
        return out
    per_sample = rows if spec["representation"] == "full" else ext.restore(hyper, params, rows)
    return sum(
        per_sample[p].reshape(per_sample[p].shape[0], -1).double() @ grads[p][k].reshape(-1) for p in params
    )


_MATRIX = "__matrix__"


def _layers(store: GradientStore, layers: Sequence[str] | None) -> list[str]:
    if isinstance(layers, str):
        return [layers]
    return list(layers) if layers is not None else store.layers


def _n(rows: dict[str, Tensor]) -> int:
    return next(iter(rows.values())).shape[0]
