"""``nn.Linear`` with any leading dimensions: ``y = x Wᵀ + b``, so ``∇W = Σ_t d_t x_tᵀ``."""

from __future__ import annotations

from torch import Tensor, nn

from mstore_lightning.core.families.kron import KroneckerExtractor, as_float
from mstore_lightning.core.families.registry import Hyper, register


@register(nn.Linear)
class LinearExtractor(KroneckerExtractor):
    kind = "linear"
    plain = True

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        return {"in_features": module.in_features, "out_features": module.out_features}

    @classmethod
    def matrices(cls, hyper: Hyper, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = a.shape[0]
        return (
            as_float(a).reshape(b, 1, -1, hyper["in_features"]),
            as_float(d).reshape(b, 1, -1, hyper["out_features"]),
        )

    @classmethod
    def weight_from(cls, hyper: Hyper, g: Tensor) -> Tensor:
        return g[:, 0]
