"""The factor that turns a captured output gradient into the gradient of the sample's own loss.

``d`` arrives as ``∂(scale · L / k) / ∂y`` where ``L`` is the batch loss, ``k`` Lightning's
gradient-accumulation divisor and ``scale`` the AMP GradScaler's. With ``L = mean_i ℓ_i`` over ``B``
samples, ``∂ℓ_i/∂y_i = B · ∂L/∂y_i``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def grad_multiplier(
    loss_reduction: str, batch_size: int, accumulation: int = 1, amp_scale: float = 1.0
) -> float:
    """Multiplier for ``d`` so that it is the gradient of each sample's own loss.

    Example:
        >>> grad_multiplier("mean", batch_size=32, accumulation=2, amp_scale=1024.0)
        0.0625
    """
    per_sample = float(batch_size) if loss_reduction == "mean" else 1.0
    return per_sample * accumulation / amp_scale


def reduction_mismatch(loss_reduction: str, loss: Any, per_sample_loss: Any) -> str | None:
    """The ``loss_reduction`` a step's loss shows when it is not the policy's, else ``None``.

    The batch loss ``loss`` is compared with the mean and the sum of ``per_sample_loss``; only a clear
    answer counts (a loss with extra terms matches neither, and says nothing). Reads both values
    back, so it runs once, on the first captured step.

    Example:
        >>> reduction_mismatch("mean", torch.tensor(6.0), torch.tensor([1.0, 2.0, 3.0]))
        'sum'
    """
    if (
        not isinstance(loss, torch.Tensor)
        or loss.numel() != 1
        or not isinstance(per_sample_loss, torch.Tensor)
    ):
        return None
    n = per_sample_loss.numel()
    if n < 2:
        return None
    value = float(loss.detach())
    mean, total = (float(v) for v in (per_sample_loss.detach().mean(), per_sample_loss.detach().sum()))
    close = {
        r: math.isclose(value, v, rel_tol=1e-4, abs_tol=1e-6) for r, v in (("mean", mean), ("sum", total))
    }
    shown = [r for r, c in close.items() if c]
    return shown[0] if len(shown) == 1 and shown[0] != loss_reduction else None
