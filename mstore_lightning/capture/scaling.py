"""The factor that turns a captured output gradient into the gradient of the sample's own loss.

``d`` arrives as ``∂(scale · L / k) / ∂y`` where ``L`` is the batch loss, ``k`` Lightning's
gradient-accumulation divisor and ``scale`` the AMP GradScaler's. With ``L = mean_i ℓ_i`` over ``B``
samples, ``∂ℓ_i/∂y_i = B · ∂L/∂y_i``.
"""

from __future__ import annotations


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
