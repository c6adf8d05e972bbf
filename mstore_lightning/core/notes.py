"""Why a layer's results are estimates, in words, from its JSON spec alone.

NumPy and torch free, so that describing a store (``mstore inspect``) needs neither; the
representations (``core.representation``) give the same words.

Example:
    >>> approximate({"representation": "factors", "summary": {"pool": 4}})
    'pooled 4x: block means of the convolution maps'
    >>> approximate({"representation": "factors"}) is None
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COUPLED_NOTE = (
    "batch-coupled: its output gradient passes through BatchNorm in training mode ({bns}), so each row "
    "mixes other samples' losses; the rows sum to the batch gradient but are not each sample's own"
)


def coupled_note(bns: Sequence[str]) -> str | None:
    """The note of a layer whose rows ``bns`` (training-mode BatchNorms) coupled."""
    if not bns:
        return None
    shown = ", ".join(bns[:3]) + (f" and {len(bns) - 3} more" if len(bns) > 3 else "")
    return COUPLED_NOTE.format(bns=shown)


def estimate(spec: dict[str, Any]) -> str | None:
    """Why the layer's form of storage gives estimates, or ``None`` when it is exact."""
    if spec.get("representation") == "projection":
        p = spec["projection"]
        return (
            f"Kronecker projection {p['k_out']}x{p['k_in']} (seed {p['seed']}): unbiased, relative "
            f"error std <= {p['predicted_error']:.3g}"
        )
    pool = spec.get("summary", {}).get("pool")
    if spec.get("representation") == "factors" and pool:
        return f"pooled {pool}x: block means of the convolution maps"
    return None


def approximate(spec: dict[str, Any]) -> str | None:
    """Why results from the layer are estimates (its storage, BatchNorm coupling), or ``None``."""
    why = [w for w in (estimate(spec), coupled_note(tuple(spec.get("batch_coupled", ())))) if w]
    return "; ".join(why) or None
