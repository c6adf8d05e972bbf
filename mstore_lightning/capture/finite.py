"""Which samples of a batch have NaN or Inf among their captured factors, found without reading
values back from the device: the masks stay where the rows are until the epoch's end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def nonfinite_rows(factors: Sequence[Tensor]) -> Tensor | None:
    """A boolean mask of the rows (dim 0) that hold NaN or Inf in any of ``factors``, on their device.

    Each row's maximum and minimum decide: NaN and Inf survive them, and finite values never overflow
    (a row sum can). Nothing is read back, so on CUDA the training thread does not wait.

    Args:
        factors: floating-point tensors sharing their first dimension (the batch) and device.

    Returns:
        The mask, or ``None`` without factors.

    Example:
        >>> a = torch.ones(3, 4); a[1, 2] = float("nan")
        >>> nonfinite_rows([a, torch.full((3, 2), 3e38)]).tolist()
        [False, True, False]
    """
    rows = [t.detach().reshape(t.shape[0], -1) for t in factors]
    if not rows:
        return None
    bad = torch.zeros(rows[0].shape[0], dtype=torch.bool, device=rows[0].device)
    for t in rows:
        if t.shape[1]:
            bad |= ~(torch.isfinite(t.amax(dim=1)) & torch.isfinite(t.amin(dim=1))).to(bad.device)
    return bad


def nonfinite_samples(
    uses: Mapping[str, list],
    n: int,
    flagged: Mapping[str, Tensor] | None = None,
    keep: Tensor | None = None,
) -> Tensor | None:
    """A boolean mask of a batch's ``n`` samples whose captured rows hold NaN or Inf, on the rows'
    device, or ``None`` without captured rows.

    The layers in ``flagged`` (``{layer: mask}`` over the kept rows, ``keep``; all without) were
    flagged by their encoding, which saw every number of their rows. Other layers' factors are
    checked by :func:`nonfinite_rows`.
    """
    flagged = flagged or {}
    bad = nonfinite_rows([t for name, calls in uses.items() if name not in flagged for t in factors(calls)])
    if flagged:
        rows = torch.stack(list(flagged.values())).any(dim=0)
        if bad is None:
            bad = torch.zeros(n, dtype=torch.bool, device=rows.device)
        if keep is None:
            bad |= rows.to(bad.device)
        else:
            bad[keep.to(bad.device)] |= rows.to(bad.device)
    return bad


def factors(layer_uses: list) -> list[Tensor]:
    """The floating-point tensors of a layer's captured uses (its factors)."""
    return [
        t
        for use in layer_uses
        for t in use
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0
    ]
