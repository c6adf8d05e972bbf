"""Matplotlib figures of the epoch-end analytics.

Figures are built on :class:`matplotlib.figure.Figure` directly, not ``pyplot``: no global figure
registry to leak into, no GUI backend, safe inside any training script. Each function returns the
figure; :func:`to_png` renders it once, and every logger and the HTML report reuse those bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

DPI = 80  # small PNGs: they are embedded in the HTML report and sent to every logger each epoch
# Fixed margins: a layout engine measures every text box and would triple the drawing time.
_MARGINS = {"left": 0.13, "right": 0.97, "bottom": 0.15, "top": 0.9}
# A title at a fixed height: placed automatically, it measures every tick label of the axes first.
_TITLE_Y = 1.02


def to_png(fig: Figure) -> bytes:
    """Renders ``fig`` to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def norms_by_class(norms: np.ndarray, labels: np.ndarray | None, epoch: int) -> Figure:
    """Per-sample gradient norms, one jittered column of points per class (or one histogram).

    A strip of points rather than box plots: it shows every outlier, and it draws in half the time.
    """
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots(gridspec_kw=_MARGINS)
    finite = np.isfinite(norms) & (norms > 0)
    if labels is not None and (labels[finite] >= 0).any():
        keep = finite & (labels >= 0)
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, int(keep.sum()))
        ax.scatter(labels[keep] + jitter, np.log10(norms[keep]), s=4, alpha=0.35, linewidths=0)
        classes = np.unique(labels[keep])
        ax.set_xticks(classes, [str(c) for c in classes])
        ax.set_xlabel("given label")
        ax.set_ylabel("log10 gradient norm")
    else:
        ax.hist(np.log10(norms[finite]), bins=40)
        ax.set_xlabel("log10 gradient norm")
        ax.set_ylabel("samples")
    ax.set_title(f"Per-sample gradient norm by class, epoch {epoch}", y=_TITLE_Y)
    return fig


def conflict_heatmap(cosine: np.ndarray, classes: Sequence[int], epoch: int) -> Figure:
    """Cosine between class gradients: negative cells are classes pulling the weights apart."""
    fig = Figure(figsize=(4.6, 3.8))
    ax = fig.subplots(gridspec_kw=_MARGINS)
    ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes])
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    # The scale in words, not a colour bar: a colour bar is a second axes and doubles the drawing time.
    ax.set_title(
        f"Class-gradient cosine, epoch {epoch}\nred +1 (aligned) · white 0 · blue -1 (opposed)",
        fontsize=9,
        y=_TITLE_Y,
    )
    return fig


def sample_grid(
    images: Sequence[np.ndarray], ids: Sequence[int], labels: Sequence[int], title: str, columns: int = 8
) -> Figure:
    """The given samples as one mosaic, each captioned with its id and given label.

    One ``imshow`` of a mosaic instead of a subplot per sample: a grid of 32 axes takes ten times
    longer to draw, and this runs every epoch.
    """
    tiles = [_tile(img) for img in images]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    gap, caption = max(1, w // 6), max(2, h // 3)  # pixels between tiles, and above each for its caption
    mosaic = np.ones(((h + caption) * rows, (w + gap) * cols, 3))
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = r * (h + caption) + caption, c * (w + gap)
        mosaic[top : top + t.shape[0], left : left + t.shape[1]] = t
    fig = Figure(figsize=(1.1 * cols, 1.45 * rows + 0.4))
    ax = fig.subplots(
        gridspec_kw={"left": 0.01, "right": 0.99, "bottom": 0.01, "top": 1 - 0.35 / (1.45 * rows + 0.4)}
    )
    ax.imshow(mosaic, interpolation="nearest")
    for i, (sid, lab) in enumerate(zip(ids, labels)):
        r, c = divmod(i, cols)
        x, y = c * (w + gap) + w / 2, r * (h + caption) + caption * 0.9
        ax.text(x, y, f"#{sid}  y={lab}", ha="center", va="bottom", fontsize=7)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, y=_TITLE_Y)
    return fig


def cluster_labels(clusters: np.ndarray, labels: np.ndarray, epoch: int) -> Figure:
    """How the given labels spread over gradient clusters (share of each cluster per label)."""
    ks = np.unique(clusters)
    classes = np.unique(labels[labels >= 0])
    counts = np.array([[np.sum((clusters == k) & (labels == c)) for c in classes] for k in ks], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots(gridspec_kw={**_MARGINS, "left": 0.2})
    ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(np.arange(len(classes)), [str(c) for c in classes])
    ax.set_yticks(np.arange(len(ks)), [f"{k} (n={int(n)})" for k, n in zip(ks, counts.sum(axis=1))])
    ax.set_xlabel("given label")
    ax.set_ylabel("gradient cluster")
    ax.set_title(
        f"Labels within gradient clusters, epoch {epoch}\nshare of the cluster: dark 0 · yellow 1",
        fontsize=9,
        y=_TITLE_Y,
    )
    return fig


def _tile(img: np.ndarray) -> np.ndarray:
    """An image as ``(H, W, 3)`` floats in ``[0, 1]``, scaled by its own range."""
    x = np.asarray(img, dtype=np.float64)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 0, -1)  # CHW -> HWC
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    lo, hi = np.nanmin(x), np.nanmax(x)
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 2 else x
