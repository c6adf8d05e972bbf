"""The torch side of the stored encodings (``core.quant``): rows encoded where they live, before
the hand-over to the writer, and stored parts decoded into tensors.

Example:
    >>> import torch
    >>> from mstore_lightning.core.quant import array_spec, split_rows
    >>> spec = array_spec("a", [1, 100], "int8")
    >>> x = torch.randn(4, 1, 100)
    >>> parts = split_rows(spec, encode_rows(spec, x).data.numpy())
    >>> bool((decode(spec, "a", parts) - x).abs().max() <= x.abs().max() / 254 + 1e-7)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mstore_lightning.core import quant
from mstore_lightning.core.quant import group_shape, handed_parts

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


@dataclass(frozen=True)
class Encoded:
    """Rows as :func:`encode_rows` hands them over.

    Attributes:
        data: the handed-over rows (one ``uint8`` row of packed parts, or the cast values).
        group_max: for scaled encodings, each group's ``max |x|``, one row of groups per row
            ``(n, groups)``: NaN or Inf exactly where a group holds NaN or Inf, so it flags
            non-finite rows for free.
    """

    data: Tensor
    group_max: Tensor | None = None

    def nonfinite(self) -> Tensor | None:
        """Rows holding NaN or Inf (a boolean mask), where the encoding tells."""
        if self.group_max is None:
            return None
        return ~torch.isfinite(self.group_max).all(dim=1)


def encode_rows(spec: dict[str, Any], x: Tensor) -> Encoded:
    """Rows ``x`` ``(n, *row_shape)`` in their stored form, made where ``x`` lives, in a few
    vectorised ops: what the training thread hands the writer.

    Floats and ids are cast (bfloat16 as its bits). ``int8`` codes and their scales, and a chunk
    codec's values in ``[-1, 1]`` with theirs, are packed side by side into one ``uint8`` row each
    (:func:`handed_parts`); the writer splits them with :func:`split_rows`. On the CPU the codes
    equal :func:`encode`'s bit for bit: the same float32 operations in the same order.
    """
    encoding = spec["encoding"]
    if encoding in _TORCH_DTYPES:
        return Encoded(x.to(_TORCH_DTYPES[encoding]))
    if encoding == "bfloat16-bits":
        return Encoded(x.to(torch.bfloat16).view(torch.int16))
    n = x.shape[0]
    groups = x.to(torch.float32).reshape(n, *group_shape(spec))
    (_, shape, dtype), (_, scale_shape, _) = handed_parts(spec)
    numbers, scales = math.prod(shape), math.prod(scale_shape)
    width = numbers * dtype.itemsize
    out = torch.empty((n, width + 4 * scales), dtype=torch.uint8, device=x.device)
    if n == 0:
        return Encoded(out, groups.new_zeros((0, scales)))
    amax = _group_max(groups)
    one = torch.full((), 127.0 if encoding == "int8" else 1.0, dtype=torch.float32, device=x.device)
    # Tensor divisions, not divisions by a Python number, which torch may turn into a product with
    # the reciprocal and so round differently from NumPy. NaN or Inf rows keep a non-finite scale.
    inv = torch.where(amax > 0, one / amax, 0.0)
    values = groups * inv
    if encoding == "int8":
        out[:, :width].view(torch.int8).copy_(values.round_().reshape(n, numbers))
        scale = (amax / one).reshape(n, scales)
    else:
        out[:, :width].copy_(values.reshape(n, numbers).view(torch.uint8))
        scale = amax.reshape(n, scales)
    out[:, width:].copy_(scale.view(torch.uint8))
    return Encoded(out, amax.reshape(n, scales))


SPLIT_MAX_NUMBERS = 1 << 18  # from here on, max and min in two passes beat abs then max (measured)


def _group_max(groups: Tensor) -> Tensor:
    """Each group's ``max |x|`` (last axis), keeping its dim; NaN or Inf where the group holds one."""
    if groups.numel() < SPLIT_MAX_NUMBERS:
        return groups.abs().amax(dim=-1, keepdim=True)
    # max(max x, -min x) is exact and reads the numbers without writing |x|; adding 0 turns the -0
    # of an all-zero group into +0, so that zero rows stay zero bytes.
    high, low = groups.amax(dim=-1, keepdim=True), groups.amin(dim=-1, keepdim=True)
    return torch.maximum(high, low.neg_()).add_(0.0)


def decode(spec: dict[str, Any], name: str, parts: dict[str, np.ndarray]) -> Tensor:
    """Rows of logical array ``name`` as a float32 tensor (int64 for ids) from its stored parts
    (:func:`~mstore_lightning.core.quant.decode`, shared with the arrays)."""
    return torch.from_numpy(np.ascontiguousarray(quant.decode(spec, name, parts)))


@dataclass(frozen=True)
class Coded:
    """Rows of an ``int8`` array as stored: ``codes`` ``(n, *row_shape)`` times ``scale``, one per
    group of the leading axes ``(n, *lead)``. Kernels that take them (``takes_codes``) multiply
    codes exactly, in integers, and scale the far smaller products; others get them decoded.
    """

    codes: Tensor
    scale: Tensor

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def index_select(self, dim: int, index: Tensor) -> Coded:
        """The rows at ``index`` (``dim`` 0), as ``Tensor.index_select``."""
        return Coded(self.codes.index_select(dim, index), self.scale.index_select(dim, index))

    def decoded(self) -> Tensor:
        """The float32 rows."""
        lead = self.scale.shape
        groups = self.codes.reshape(*lead, -1).to(torch.float32)
        return groups.mul_(self.scale[..., None]).reshape(self.codes.shape)

    def group_scale(self) -> Tensor:
        """The scale of every number's group, over all axes but the last ``(n, *row_shape[:-1])``."""
        extra = self.codes.dim() - 1 - self.scale.dim()
        return self.scale.reshape(*self.scale.shape, *[1] * extra).expand(self.codes.shape[:-1])

    @staticmethod
    def cat(pieces: list[Coded]) -> Coded:
        return Coded(torch.cat([p.codes for p in pieces]), torch.cat([p.scale for p in pieces]))


def stays_coded(spec: dict[str, Any]) -> bool:
    """Whether rows of the array ``spec`` can be handed over as :class:`Coded`: ``int8`` codes, whose
    scales never vary along the last axis (a chunk codec's fitted bins are decoded instead)."""
    return spec["encoding"] == "int8" and "codec" not in spec


def decode_or_code(
    spec: dict[str, Any], name: str, parts: dict[str, np.ndarray], codes: bool
) -> Tensor | Coded:
    """:func:`decode`, or with ``codes`` the :class:`Coded` rows where :func:`stays_coded`."""
    if codes and stays_coded(spec):
        return Coded(
            torch.from_numpy(parts[name]), torch.from_numpy(np.asarray(parts[f"{name}_scale"], np.float32))
        )
    return decode(spec, name, parts)


def floats(values: Tensor | Coded) -> Tensor:
    """``values`` decoded where they are :class:`Coded`, as they are otherwise."""
    return values.decoded() if isinstance(values, Coded) else values


def decoded(rows: dict[str, Tensor | Coded]) -> dict[str, Tensor]:
    """``rows`` with every :class:`Coded` array decoded."""
    return {k: floats(v) for k, v in rows.items()}
