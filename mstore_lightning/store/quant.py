"""How captured rows are stored: lossless floats, reduced floats, or int8 codes with scales.

Each logical array of a layer (``a``, ``d``, ``weight``, ...) is stored as one or more Zarr arrays,
its *parts*, all chunked alike along the row axis. The layer spec lists them, so a reader needs no code
of ours to find them:

=================  ================================================  ==============================
encoding           parts                                             error of one number ``x``
=================  ================================================  ==============================
``float32``        ``<name>`` float32                                none
``float16``        ``<name>`` float16                                ``|x|·2⁻¹¹`` (normal range)
``bfloat16-bits``  ``<name>`` int16 (the raw bits of bfloat16)       ``|x|·2⁻⁸``
``int8``           ``<name>`` int8 codes, ``<name>_scale`` float32   ``s/2``, ``s = max|x_group|/127``
``int64``          ``<name>`` int64 (token ids, exact)               none
=================  ================================================  ==============================

``int8`` is symmetric with one scale per *group*: the smallest block of trailing axes that holds at
least :data:`GROUP_MIN` numbers. That is one scale per row and use for a linear layer, per row and
position for sequences, and per channel for convolution maps. For a group with crest factor
``κ = max|x| / rms(x)``, the relative error ``‖x̂ − x‖ / ‖x‖`` is at most ``κ / 254`` (every error is
at most ``s/2``), and about ``κ / 440`` when rounding errors are uniform. A per-sample gradient
``g = Σ_t d_t a_tᵀ`` built from factors with relative errors ``ε_a, ε_d`` (one use, one position)
has relative error at most ``ε_a + ε_d + ε_a·ε_d``; that bounds ``norms`` the same way, and
``|⟨ĝ, ĥ⟩ − ⟨g, h⟩| ≤ ε_g‖g‖‖ĥ‖ + ε_h‖h‖‖g‖`` bounds ``dot``.

Example:
    >>> import torch
    >>> spec = array_spec("a", [1, 100], "int8")
    >>> sorted(spec["parts"])
    ['a', 'a_scale']
    >>> x = torch.randn(4, 1, 100)
    >>> parts = {k: v.numpy() for k, v in encode(spec, "a", x).items()}
    >>> bool((decode(spec, "a", parts) - x).abs().max() <= x.abs().max() / 254 + 1e-7)
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

GROUP_MIN = 64  # numbers sharing one int8 scale: a 4-byte scale costs at most 1/16 of a group's bytes

_FLOATS = {
    "fp32": ("float32", "float32"),
    "fp16": ("float16", "float16"),
    "bf16": ("bfloat16-bits", "int16"),
}
PRECISIONS = (*_FLOATS, "int8")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
LOSSLESS = ("float32", "int64")


def array_spec(name: str, row_shape: list[int], precision: str, *, index: bool = False) -> dict[str, Any]:
    """JSON description of how logical array ``name`` is stored at ``precision``.

    Args:
        name: logical array name, also the name of its main part.
        row_shape: shape of one row (one sample).
        precision: a policy precision (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``).
        index: the array holds integer ids, which are stored exactly whatever the precision.
    """
    row_shape = [int(s) for s in row_shape]
    if index:
        return _spec(name, row_shape, "int64", {name: (row_shape, "int64")})
    if precision in _FLOATS:
        encoding, dtype = _FLOATS[precision]
        return _spec(name, row_shape, encoding, {name: (row_shape, dtype)})
    if precision == "int8":
        lead = scale_axes(row_shape)
        spec = _spec(
            name,
            row_shape,
            "int8",
            {name: (row_shape, "int8"), f"{name}_scale": (row_shape[:lead], "float32")},
        )
        spec["scale_axes"] = lead
        return spec
    raise ValueError(f"Unknown precision {precision!r}; known: {PRECISIONS}.")


def _spec(name: str, row_shape: list[int], encoding: str, parts: dict[str, tuple]) -> dict[str, Any]:
    return {
        "row_shape": row_shape,
        "encoding": encoding,
        "dtype": parts[name][1],
        "parts": {p: {"row_shape": list(s), "dtype": d} for p, (s, d) in parts.items()},
    }


def scale_axes(row_shape: list[int]) -> int:
    """How many leading row axes index int8 scales; the trailing rest share one scale."""
    size = 1
    for k in range(len(row_shape) - 1, -1, -1):
        size *= row_shape[k]
        if size >= GROUP_MIN:
            return k
    return 0


def row_nbytes(spec: dict[str, Any]) -> int:
    """Uncompressed bytes of one row over all of the array's parts."""
    return sum(math.prod(p["row_shape"]) * np.dtype(p["dtype"]).itemsize for p in spec["parts"].values())


def is_lossless(spec: dict[str, Any]) -> bool:
    return spec["encoding"] in LOSSLESS


def encode(spec: dict[str, Any], name: str, x: Tensor) -> dict[str, Tensor]:
    """Encodes rows ``x`` of shape ``(n, *row_shape)`` into the array's parts, on ``x``'s device.

    Encoding before the copy to the host moves fewer bytes, and lets deduplication compare the bytes
    that will be stored.
    """
    encoding = spec["encoding"]
    if encoding in _TORCH_DTYPES:
        return {name: x.to(_TORCH_DTYPES[encoding])}
    if encoding == "bfloat16-bits":
        return {name: x.to(torch.bfloat16).view(torch.int16)}
    lead = spec["scale_axes"]
    groups = x.reshape(*x.shape[: lead + 1], -1).float()
    amax = groups.abs().amax(-1, keepdim=True)
    scale = amax / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.round(groups * inv).clamp_(-127, 127).to(torch.int8)
    return {name: codes.reshape(x.shape), f"{name}_scale": scale.squeeze(-1)}


def decode(spec: dict[str, Any], name: str, parts: dict[str, np.ndarray]) -> Tensor:
    """Rows of logical array ``name`` as float32 (int64 for ids) from its stored parts."""
    t = torch.from_numpy(np.ascontiguousarray(parts[name]))
    encoding = spec["encoding"]
    if encoding == "int8":
        scale = torch.from_numpy(np.ascontiguousarray(parts[f"{name}_scale"]))
        lead = spec["scale_axes"]
        groups = t.reshape(*t.shape[: lead + 1], -1).float()
        return (groups * scale.unsqueeze(-1)).reshape(t.shape)
    if encoding == "bfloat16-bits":
        return t.view(torch.bfloat16).float()
    if encoding == "float16":
        return t.float()
    return t
