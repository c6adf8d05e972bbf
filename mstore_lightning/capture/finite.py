"""Which samples of a batch have NaN or Inf among their captured factors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def nonfinite_rows(factors: Sequence[Tensor]) -> Tensor | None:
    """A boolean mask of the rows (dim 0) that hold NaN or Inf in any of ``factors``.

    One row sum per tensor does the work: NaN and Inf survive a sum. A sum of finite values can also
    overflow, so only the rows it flags (almost never any) get the exact, costlier check.

    Args:
        factors: floating-point tensors sharing their first dimension (the batch).

    Returns:
        The mask, or ``None`` when no row is non-finite.

    Example:
        >>> a = torch.ones(3, 4); a[1, 2] = float("nan")
        >>> nonfinite_rows([a, torch.full((3, 2), 3e38)]).tolist()
        [False, True, False]
    """
    rows = [t.detach().reshape(t.shape[0], -1) for t in factors]
    if not rows:
        return None
    total = rows[0].sum(dim=1, dtype=torch.float32)
    for t in rows[1:]:
        total += t.sum(dim=1, dtype=torch.float32).to(total.device)
    suspect = (~torch.isfinite(total)).nonzero().squeeze(1)
    if suspect.numel() == 0:
        return None
    bad = torch.zeros(total.shape[0], dtype=torch.bool, device=total.device)
    for t in rows:
        bad[suspect] |= (~torch.isfinite(t.index_select(0, suspect.to(t.device))).all(dim=1)).to(bad.device)
    return bad if bool(bad.any()) else None


def nonfinite_samples(
    uses: Mapping[str, list],
    n: int,
    sqnorms: Tensor | None = None,
    covers: Mapping[str, int] | None = None,
    flagged: Mapping[str, Tensor] | None = None,
    keep: Tensor | None = None,
) -> Tensor | None:
    """A boolean mask of a batch's ``n`` samples whose captured rows hold NaN or Inf, or ``None``
    when none do.

    The layers in ``flagged`` (``{layer: mask}`` over the kept rows, ``keep``; all without) were
    flagged by their encoding, which saw every number of their rows. The layers in ``covers``
    (``{layer: column of sqnorms}``) are checked through their squared norms, already computed: a
    non-finite factor makes the norm non-finite. Only rows whose norm is not finite (NaN, Inf, or
    finite values whose squares overflowed) get the exact check. Other layers' factors are checked.
    """
    covers, flagged = covers or {}, flagged or {}
    skip = set(covers) | set(flagged)
    bad = nonfinite_rows([t for name, calls in uses.items() if name not in skip for t in factors(calls)])
    if flagged:
        rows = torch.stack(list(flagged.values())).any(dim=0).cpu()
        if bool(rows.any()):
            bad = _marked(bad, n, (torch.arange(n) if keep is None else keep.cpu())[rows])
    if covers and sqnorms is not None:
        columns = sqnorms if len(covers) == sqnorms.shape[1] else sqnorms[:, list(covers.values())]
        finite = torch.isfinite(columns)
        suspect = None if bool(finite.all()) else (~finite.all(dim=1)).nonzero().squeeze(1)
        if suspect is not None:
            own = [t.index_select(0, suspect.to(t.device)) for name in covers for t in factors(uses[name])]
            exact = nonfinite_rows(own)
            if exact is not None:
                bad = _marked(bad, n, suspect[exact.cpu()])
    return bad


def _marked(bad: Tensor | None, n: int, samples: Tensor) -> Tensor:
    """``bad`` (all clear: ``None``) on the CPU, with ``samples`` of the batch's ``n`` marked."""
    bad = torch.zeros(n, dtype=torch.bool) if bad is None else bad.cpu()
    bad[samples.cpu()] = True
    return bad


def factors(layer_uses: list) -> list[Tensor]:
    """The floating-point tensors of a layer's captured uses (its factors)."""
    return [
        t
        for use in layer_uses
        for t in use
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0
    ]
