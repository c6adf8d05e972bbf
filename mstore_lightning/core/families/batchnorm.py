"""Affine parameters of ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``.

The forward hook keeps ``x̂``, the input normalised as the module normalised it at that call: by the
batch's statistics in training mode, by the running ones in eval mode. Then ``∇γ = Σ d ∘ x̂`` and
``∇β = Σ d`` over each channel's positions, as for the other norms, and the full gradient (two
numbers a channel) is what the store keeps.

In eval mode the samples are independent and the rows are exact per-sample gradients. In training
mode ``x̂`` of one sample depends on the others through the batch's statistics: the rows still sum
to the batch gradient, but are batch-coupled, and the capture flags them (and every layer whose
output gradient passes through such a module).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mstore_lightning.core.families.norm import _NormExtractor
from mstore_lightning.core.families.registry import Hyper, register

SYNC_TRAINING = "SyncBatchNorm in training mode normalises by statistics gathered from every process"


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
class BatchNormExtractor(_NormExtractor):
    kind = "batch_norm"
    prefix_takes_module = True

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        return {"num_features": module.num_features, "eps": module.eps}

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if not module.affine:
            return "it has no affine parameters"
        if _cross_process(module):
            return SYNC_TRAINING
        return None

    @classmethod
    def prefix(cls, hyper: Hyper, inputs: tuple, module: nn.Module | None = None) -> Tensor:
        x = inputs[0].detach()
        if _cross_process(module):  # it was in eval mode at setup, which allowed it
            raise RuntimeError(
                f"{SYNC_TRAINING}, which one process cannot see; capture it in eval mode, or leave it "
                "out of `layers`."
            )
        if module is None or module.training or module.running_mean is None:
            return F.batch_norm(x, None, None, training=True, eps=hyper["eps"])
        return F.batch_norm(x, module.running_mean, module.running_var, training=False, eps=hyper["eps"])

    @classmethod
    def normalized(cls, hyper: Hyper, x: Tensor) -> Tensor:
        return x  # the prefix is x̂ already

    @classmethod
    def channel_dims(cls, hyper: Hyper, x: Tensor) -> tuple[list[int], tuple[int, ...]]:
        return [d for d in range(x.ndim) if d != 1][1:], (hyper["num_features"],)


def _cross_process(module: nn.Module | None) -> bool:
    """Whether ``module`` is a SyncBatchNorm training across processes (statistics of them all)."""
    import torch.distributed as dist

    if not (isinstance(module, nn.SyncBatchNorm) and module.training):
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
