"""``nn.MultiheadAttention``'s packed in-projection: three linear maps ``q, k, v = x_{q,k,v} W_{q,k,v}ᵀ + b``
in one ``(3E, E)`` weight, so ``∇W_g = Σ_t d_{g,t} a_{g,t}ᵀ`` per group ``g`` (a Kronecker family with
three groups).

Rows come in one of two layouts, fixed by the layer's first batch:

- self-attention (query, key and value are one tensor, one linear call): ``a (B, U, T, E)`` and
  ``d (B, U, T, 3E)``; the input is stored once and shared by the three groups;
- otherwise: ``a (B, U, 3, T, E)`` and ``d (B, U, 3, T, E)``, one slot per group, the shorter sequence
  padded with zeros (which add nothing to a gradient).

The stored parameter roles ``weight`` and ``bias`` are the module's ``in_proj_weight`` and
``in_proj_bias`` (``hyper["params_of"]``). The capture side lives in ``capture.attention``.
"""

from __future__ import annotations

from torch import Tensor

from mstore_lightning.core.families.kron import KroneckerExtractor, as_float
from mstore_lightning.core.families.registry import Hyper, register


@register()  # by kind only: the capture plans it for nn.MultiheadAttention (capture.attention)
class AttentionInProjection(KroneckerExtractor):
    kind = "attention_in"

    @classmethod
    def matrices(cls, hyper: Hyper, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b, e = a.shape[0], hyper["embed_dim"]
        a, d = as_float(a), as_float(d)
        if a.dim() == 4:  # self-attention: one input for the three groups
            a_m = a.reshape(b, 1, -1, e).expand(b, 3, -1, e)
            d_m = d.reshape(b, -1, 3, e).transpose(1, 2)
            return a_m, d_m
        return (
            a.transpose(1, 2).reshape(b, 3, -1, e),
            d.transpose(1, 2).reshape(b, 3, -1, e),
        )

    @classmethod
    def weight_from(cls, hyper: Hyper, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], 3 * hyper["embed_dim"], hyper["embed_dim"])
