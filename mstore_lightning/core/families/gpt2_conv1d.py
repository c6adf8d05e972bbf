"""The GPT-2-style ``Conv1D``: a linear layer that holds its weight transposed, ``y = x W + b``.

Recognised by duck typing (class name ``Conv1D``, attribute ``nf``, a 2-D ``(nx, nf)`` weight), so
capture does not depend on ``transformers``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mstore_lightning.core.families.kron import KroneckerExtractor, as_float
from mstore_lightning.core.families.registry import Hyper, register_duck


def is_transposed_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
    )


@register_duck(is_transposed_conv1d)
class TransposedConv1DExtractor(KroneckerExtractor):
    kind = "conv1d_transposed"
    plain = True

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        nx, nf = module.weight.shape
        return {"nx": int(nx), "nf": int(nf)}

    @classmethod
    def matrices(cls, hyper: Hyper, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = a.shape[0]
        return as_float(a).reshape(b, 1, -1, hyper["nx"]), as_float(d).reshape(b, 1, -1, hyper["nf"])

    @classmethod
    def weight_from(cls, hyper: Hyper, g: Tensor) -> Tensor:
        return g[:, 0].transpose(1, 2)
