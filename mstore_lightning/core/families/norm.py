"""Affine parameters of ``LayerNorm``, ``GroupNorm`` and ``RMSNorm``.

These normalise each sample on its own, so per-sample gradients are well defined:
``∇γ = Σ d ∘ x̂`` and ``∇β = Σ d`` over the positions that share a parameter. The full gradient is as
small as the parameters, always smaller than the factors, so it is what the store keeps.
(``BatchNorm``, whose training-mode statistics couple the samples of a batch: ``batchnorm.py``.)
"""

from __future__ import annotations

from abc import abstractmethod

import torch.nn.functional as F
from torch import Tensor, nn

from mstore_lightning.core.families.kron import as_float
from mstore_lightning.core.families.registry import Extractor, Hyper, Rows, register


class _NormExtractor(Extractor):
    has_factors = False

    @classmethod
    @abstractmethod
    def normalized(cls, hyper: Hyper, x: Tensor) -> Tensor:
        """``x̂`` for a ``(N, ...)`` batch."""

    @classmethod
    @abstractmethod
    def channel_dims(cls, hyper: Hyper, x: Tensor) -> tuple[list[int], tuple[int, ...]]:
        """Dims of ``x`` summed over for one parameter entry, and the parameter's shape."""

    @classmethod
    def restore(cls, hyper: Hyper, params: list[str], rows: Rows) -> Rows:
        a, d = rows["a"], as_float(rows["d"])
        b, u = a.shape[:2]
        x = as_float(a).flatten(0, 1)
        d = d.flatten(0, 1)
        sum_dims, shape = cls.channel_dims(hyper, x)
        out: Rows = {}
        if "weight" in params:
            gw = _sum(d * cls.normalized(hyper, x), sum_dims)
            out["weight"] = gw.reshape(b, u, *shape).sum(1)
        if "bias" in params:
            out["bias"] = _sum(d, sum_dims).reshape(b, u, *shape).sum(1)
        return out


def _sum(t: Tensor, dims: list[int]) -> Tensor:
    # torch reads an empty dim list as "all dims"; here it means "none".
    return t.sum(dims) if dims else t


@register(nn.LayerNorm)
class LayerNormExtractor(_NormExtractor):
    kind = "layer_norm"

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        return {"normalized_shape": list(module.normalized_shape), "eps": module.eps}

    @classmethod
    def normalized(cls, hyper: Hyper, x: Tensor) -> Tensor:
        # torch's own kernel: one pass for the statistics, one to normalise (var_mean is 9x slower).
        return F.layer_norm(x, hyper["normalized_shape"], eps=hyper["eps"])

    @classmethod
    def channel_dims(cls, hyper: Hyper, x: Tensor) -> tuple[list[int], tuple[int, ...]]:
        k = len(hyper["normalized_shape"])
        return list(range(1, x.ndim - k)), tuple(hyper["normalized_shape"])


@register(nn.GroupNorm)
class GroupNormExtractor(_NormExtractor):
    kind = "group_norm"

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        return {"num_groups": module.num_groups, "num_channels": module.num_channels, "eps": module.eps}

    @classmethod
    def normalized(cls, hyper: Hyper, x: Tensor) -> Tensor:
        return F.group_norm(x, hyper["num_groups"], eps=hyper["eps"])

    @classmethod
    def channel_dims(cls, hyper: Hyper, x: Tensor) -> tuple[list[int], tuple[int, ...]]:
        return [d for d in range(x.ndim) if d != 1][1:], (hyper["num_channels"],)


if hasattr(nn, "RMSNorm"):

    @register(nn.RMSNorm)
    class RMSNormExtractor(LayerNormExtractor):
        kind = "rms_norm"

        @classmethod
        def normalized(cls, hyper: Hyper, x: Tensor) -> Tensor:
            return F.rms_norm(x, hyper["normalized_shape"], eps=hyper["eps"])
