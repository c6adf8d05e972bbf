"""A raw ``Parameter`` of batch size 1 that a forward broadcasts over the batch (a ViT's class token
and position table): sample ``i``'s gradient is the output gradient of the broadcast, row ``i``,
summed over the other axes the broadcast widened. It is stored whole (there are no factors); the
capture side is ``capture.broadcast``.
"""

from __future__ import annotations

from torch import Tensor

from mstore_lightning.core.families.kron import as_float
from mstore_lightning.core.families.registry import Extractor, Hyper, Rows, register


@register()  # by kind only: the capture plans it for such parameters (capture.broadcast)
class BroadcastExtractor(Extractor):
    kind = "broadcast"
    has_factors = False

    @classmethod
    def restore(cls, hyper: Hyper, params: list[str], rows: Rows) -> Rows:
        # ``d`` holds each use's per-sample gradient (B, U, *shape); a gradient sums its uses.
        return {params[0]: as_float(rows["d"]).sum(1)}

    @classmethod
    def full_rows(
        cls, hyper: Hyper, params: list[str], a: Tensor, d: Tensor, method: str = "restore"
    ) -> Rows:
        return cls.restore(hyper, params, {"a": a, "d": d})
