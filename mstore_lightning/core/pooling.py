"""MISTIQUE's POOL summarization of convolution factors: block means of the input and output-gradient maps.

Both maps of a convolution are kept as means over ``p``-sized spatial blocks (``p^d`` times fewer
numbers). Reads repeat each mean over its block and apply the exact convolution formula to the
result, so a gradient from pooled factors is exact when both maps are constant on every block, and
approximate otherwise; layers stored this way are marked approximate, as is every result from them.

Example:
    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    >>> unpool(pool(x, 2), [1, 1, 4, 4], 2)[0, 0, 0, 0].tolist()
    [2.5, 2.5, 4.5, 4.5]
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pool(x: Tensor, factor: int) -> Tensor:
    """Means over ``factor``-sized blocks of the spatial dims of ``(B, U, C, *S)`` (MISTIQUE's POOL)."""
    b, u, c, *spatial = x.shape
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(spatial) - 1]
    out = fn(x.reshape(b * u, c, *spatial), factor, factor, ceil_mode=True)
    return out.reshape(b, u, c, *out.shape[2:])


def unpool(x: Tensor, shape: list[int], factor: int) -> Tensor:
    """Block means back to ``(B, *shape)``: each value repeated over its block, the ragged edge cut."""
    out = x
    for j in range(len(shape) - 2):
        out = out.repeat_interleave(factor, dim=3 + j)
    return out[(slice(None),) * 3 + tuple(slice(0, n) for n in shape[2:])]
