"""Per-sample loss and margin of a classifier, read off what the step already computed.

Under cross-entropy, ``∂ℓ_i/∂z_i = softmax(z_i) − onehot(y_i)``: the output gradient of the layer that
makes the logits, scaled to the sample's own loss, *is* the predicted distribution minus the label. So
when a captured layer's rows have that form, the capture reads from them, on the device and in the
step, the sample's probability of its label ``p_y``, its loss ``−log p_y`` and its margin
``z_y − max_{j≠y} z_j = log p_y − log max_{j≠y} p_j`` (as the area under the margin uses it), with no
extra pass and nothing for the user to return.

The layer is found on the first captured step with labels: one position, as many outputs as classes,
every row non-negative off the label, in ``[−1, 0]`` on it, summing to zero. A loss with label
smoothing, class weights or a temperature breaks that form; then ``training_step`` may return
``"logits"`` (and the loss and margin come from them) or ``"per_sample_loss"`` (the loss alone).
"""

from __future__ import annotations

import torch
from torch import Tensor

_TOL = 1e-4


def is_softmax_gradient(d: Tensor, labels: Tensor) -> bool:
    """Whether rows ``d (B, C)`` are ``softmax(z) − onehot(labels)`` (one check, on the first step)."""
    if d.dim() != 2 or d.shape[1] < 2 or labels.shape != (d.shape[0],) or d.shape[0] == 0:
        return False
    if bool((labels < 0).any()) or bool((labels >= d.shape[1]).any()):
        return False
    p = _probabilities(d.double(), labels)
    return bool(((p >= -_TOL) & (p <= 1 + _TOL)).all()) and bool(((p.sum(1) - 1).abs() <= _TOL).all())


def from_softmax_gradient(d: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss, margin)`` per sample from rows ``d = softmax(z) − onehot(labels)``, on their device."""
    return _loss_margin(
        _probabilities(d.float(), labels).clamp_min(torch.finfo(torch.float32).tiny).log(), labels
    )


def from_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss, margin)`` per sample of cross-entropy on ``logits (B, C)``."""
    return _loss_margin(torch.log_softmax(logits.detach().float(), dim=1), labels)


def _probabilities(d: Tensor, labels: Tensor) -> Tensor:
    p = d.clone()
    p[torch.arange(len(labels), device=d.device), labels] += 1
    return p


def _loss_margin(log_p: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    own = log_p.gather(1, labels[:, None])[:, 0]
    others = log_p.scatter(1, labels[:, None], float("-inf")).amax(1)
    return -own, own - others


def as_labels(labels: object, device: torch.device) -> Tensor | None:
    """A step's labels as an int64 tensor on ``device`` (``None`` when the batch has none)."""
    if labels is None:
        return None
    tensor = getattr(labels, "tensor", None)  # a copy still in flight: its device tensor
    if tensor is None:
        tensor = torch.as_tensor(labels)
    return tensor.to(device=device, dtype=torch.int64, non_blocking=True).reshape(-1)
