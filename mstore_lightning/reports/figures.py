"""Matplotlib figures of the epoch-end analytics, kept from one report to the next.

Figures are built on :class:`matplotlib.figure.Figure` directly, not ``pyplot``: no global figure
registry to leak into, no GUI backend, safe inside any training script.

Drawing text (tick labels, axis labels, titles) is most of what a small figure costs, and it hardly
changes between epochs. So :class:`Figures` keeps each figure with its fixed parts already drawn
(matplotlib's blitting: the pixels are saved once) and, each epoch, draws again only the artists
whose data changed. A change of layout (new classes, a wider value range) draws the figure anew.
Each method returns PNG bytes, rendered once for every logger and the HTML report.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 80  # small PNGs: they are embedded in the HTML report and sent to every logger each epoch
# Fixed margins: a layout engine measures every text box and would triple the drawing time.
_MARGINS = {"left": 0.13, "right": 0.97, "bottom": 0.15, "top": 0.9}
# A title at a fixed height: placed automatically, it measures every tick label of the axes first.
_TITLE_Y = 1.02
# zlib level 1: half the encoding time of the default, for PNGs about 15% larger.
_PNG_LEVEL = 1


class Plot:
    """A figure whose fixed parts are drawn once; :meth:`render` redraws only ``moving``.

    Args:
        fig: the figure, with every artist in place.
        moving: the artists whose data or text change between renders; everything else is drawn
            once and kept as pixels.
    """

    def __init__(self, fig: Figure, moving: Sequence[Artist] = ()) -> None:
        self.fig, self.moving = fig, list(moving)
        self.canvas = FigureCanvasAgg(fig)
        for artist in self.moving:
            artist.set_animated(True)  # left out of the full draw, so the kept pixels are without it
        self._background: Any = None

    def render(self) -> bytes:
        """The figure as PNG bytes."""
        if self._background is None:
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.fig.bbox)
        else:
            self.canvas.restore_region(self._background)
        for artist in self.moving:
            self.fig.draw_artist(artist)
        return _png(self.canvas)


class Figures:
    """The figures of one run's reports. Each method draws one kind and returns PNG bytes.

    Example:
        >>> figs = Figures()
        >>> png = figs.conflict_heatmap(np.eye(2), [0, 1], epoch=0)
        >>> png[:4] == b"\\x89PNG"
        True
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Hashable, Any]] = {}

    # Kept figures hold pixels and a canvas: a copy (for a report process) starts without them.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def _get(self, name: str, layout: Hashable, build: Callable[[], Any]) -> Any:
        kept = self._kept.get(name)
        if kept is None or kept[0] != layout:
            kept = (layout, build())
            self._kept[name] = kept
        return kept[1]

    def norms_by_class(self, norms: np.ndarray, labels: np.ndarray | None, epoch: int) -> bytes:
        """Per-sample gradient norms, one jittered column of points per class (or one histogram).

        A strip of points rather than box plots: it shows every outlier, and it draws in half the time.
        """
        finite = np.isfinite(norms) & (norms > 0)
        title = f"Per-sample gradient norm by class, epoch {epoch}"
        if labels is None or not (labels[finite] >= 0).any():
            return _norms_histogram(np.log10(norms[finite]), title)
        keep = finite & (labels >= 0)
        y = np.log10(norms[keep])
        classes = tuple(int(c) for c in np.unique(labels[keep]))
        # Limits on half decades, so the axes (and their tick labels) stay put while norms drift.
        ylim = (float(np.floor(2 * (y.min() - 0.1)) / 2), float(np.ceil(2 * (y.max() + 0.1)) / 2))
        plot = self._get("norms_by_class", (classes, ylim), lambda: _StripPlot(classes, ylim))
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(y))
        return plot.render(np.column_stack([labels[keep] + jitter, y]), title)

    def conflict_heatmap(self, cosine: np.ndarray, classes: Sequence[int], epoch: int) -> bytes:
        """Cosine between class gradients: negative cells are classes pulling the weights apart."""
        layout = tuple(int(c) for c in classes)
        plot = self._get("conflict_heatmap", layout, lambda: _Heatmap(layout))
        return plot.render(
            np.asarray(cosine, dtype=np.float64),
            f"Class-gradient cosine, epoch {epoch}\nred +1 (aligned) · white 0 · blue -1 (opposed)",
        )

    def sample_heatmap(self, matrix: np.ndarray, ids: Sequence[int], metric: str, epoch: int) -> bytes:
        """Gradient cosines (or inner products, scaled by the largest) between chosen samples."""
        layout = tuple(int(i) for i in ids)
        plot = self._get("sample_heatmap", layout, lambda: _Heatmap(layout, "sample id"))
        if metric == "cosine":
            return plot.render(matrix, f"Gradient cosine, epoch {epoch}\nred +1 · white 0 · blue -1")
        scale = float(np.nanmax(np.abs(matrix))) if matrix.size else 0.0
        shown = matrix / scale if scale > 0 else matrix
        return plot.render(
            shown, f"Gradient inner product / {scale:.3g}, epoch {epoch}\nred + · white 0 · blue -"
        )

    def sample_grid(
        self,
        images: Sequence[np.ndarray],
        ids: Sequence[int],
        labels: Sequence[int],
        title: str,
        columns: int = 8,
    ) -> bytes:
        """The given samples as one mosaic, each captioned with its id and given label.

        One ``imshow`` of a mosaic instead of a subplot per sample: a grid of 32 axes takes ten times
        longer to draw.
        """
        tiles = [_tile(img) for img in images]
        h = max(t.shape[0] for t in tiles)
        w = max(t.shape[1] for t in tiles)
        cols = min(columns, len(tiles))
        layout = (len(tiles), h, w, cols)
        plot = self._get("sample_grid", layout, lambda: _Grid(*layout))
        mosaic = np.ones(plot.mosaic_shape)
        for i, t in enumerate(tiles):
            top, left = plot.corner(i)
            mosaic[top : top + t.shape[0], left : left + t.shape[1]] = t
        captions = [f"#{sid}  y={lab}" for sid, lab in zip(ids, labels)]
        return plot.render(mosaic, captions, title)

    def cluster_labels(self, clusters: np.ndarray, labels: np.ndarray, epoch: int) -> bytes:
        """How the given labels spread over gradient clusters (share of each cluster per label)."""
        ks = np.unique(clusters)
        classes = np.unique(labels[labels >= 0])
        counts = np.array(
            [[np.sum((clusters == k) & (labels == c)) for c in classes] for k in ks], dtype=float
        )
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        # The cluster sizes are tick labels and change every epoch: this one is drawn whole each time.
        fig = Figure(figsize=(5, 3.6), dpi=DPI)
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
        return Plot(fig).render()


class _StripPlot:
    def __init__(self, classes: tuple[int, ...], ylim: tuple[float, float]) -> None:
        fig = Figure(figsize=(6, 3.2), dpi=DPI)
        ax = fig.subplots(gridspec_kw=_MARGINS)
        self.points = ax.scatter([], [], s=4, alpha=0.35, linewidths=0)
        ax.set_xlim(min(classes) - 0.6, max(classes) + 0.6)
        ax.set_ylim(*ylim)
        ax.set_xticks(classes, [str(c) for c in classes])
        ax.set_xlabel("given label")
        ax.set_ylabel("log10 gradient norm")
        self.title = ax.set_title(" ", y=_TITLE_Y)
        self.plot = Plot(fig, [self.points, self.title])

    def render(self, xy: np.ndarray, title: str) -> bytes:
        self.points.set_offsets(xy)
        self.title.set_text(title)
        return self.plot.render()


class _Heatmap:
    def __init__(self, classes: tuple[int, ...], axis: str = "class") -> None:
        fig = Figure(figsize=(4.6, 3.8), dpi=DPI)
        ax = fig.subplots(gridspec_kw=_MARGINS)
        self.image = ax.imshow(np.zeros((len(classes), len(classes))), cmap="RdBu_r", vmin=-1, vmax=1)
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, [str(c) for c in classes])
        ax.set_yticks(ticks, [str(c) for c in classes])
        # Labels without tick marks, as heatmaps usually have: a mark's root would lie under the
        # image, which is drawn again each epoch.
        ax.tick_params(length=0)
        ax.set_xlabel(axis)
        ax.set_ylabel(axis)
        # The scale in words, not a colour bar: a colour bar is a second axes and doubles the drawing time.
        self.title = ax.set_title(" ", fontsize=9, y=_TITLE_Y)
        # The spines are drawn again over the image: it fills the axes and would cover them.
        self.plot = Plot(fig, [self.image, *ax.spines.values(), self.title])

    def render(self, cosine: np.ndarray, title: str) -> bytes:
        self.image.set_data(cosine)
        self.title.set_text(title)
        return self.plot.render()


class _Grid:
    def __init__(self, n: int, h: int, w: int, cols: int) -> None:
        rows = -(-n // cols)
        self.h, self.w, self.cols = h, w, cols
        self.gap, self.caption = max(1, w // 6), max(2, h // 3)  # pixels between tiles, and above each
        self.mosaic_shape = ((h + self.caption) * rows, (w + self.gap) * cols, 3)
        fig = Figure(figsize=(1.1 * cols, 1.45 * rows + 0.4), dpi=DPI)
        ax = fig.subplots(
            gridspec_kw={"left": 0.01, "right": 0.99, "bottom": 0.01, "top": 1 - 0.35 / (1.45 * rows + 0.4)}
        )
        self.image = ax.imshow(np.ones(self.mosaic_shape), interpolation="nearest")
        self.captions = []
        for i in range(n):
            top, left = self.corner(i)
            self.captions.append(
                ax.text(left + w / 2, top - self.caption * 0.1, " ", ha="center", va="bottom", fontsize=7)
            )
        ax.set_axis_off()
        self.title = ax.set_title(" ", fontsize=9, y=_TITLE_Y)
        self.plot = Plot(fig, [self.image, *self.captions, self.title])

    def corner(self, i: int) -> tuple[int, int]:
        """Top-left pixel of tile ``i`` in the mosaic."""
        r, c = divmod(i, self.cols)
        return r * (self.h + self.caption) + self.caption, c * (self.w + self.gap)

    def render(self, mosaic: np.ndarray, captions: Sequence[str], title: str) -> bytes:
        self.image.set_data(mosaic)
        for text, caption in zip(self.captions, captions):
            text.set_text(caption)
        self.title.set_text(title)
        return self.plot.render()


def _norms_histogram(values: np.ndarray, title: str) -> bytes:
    fig = Figure(figsize=(6, 3.2), dpi=DPI)
    ax = fig.subplots(gridspec_kw=_MARGINS)
    ax.hist(values, bins=40)
    ax.set_xlabel("log10 gradient norm")
    ax.set_ylabel("samples")
    ax.set_title(title, y=_TITLE_Y)
    return Plot(fig).render()


def _png(canvas: FigureCanvasAgg) -> bytes:
    from PIL import Image  # matplotlib's own dependency

    rgba = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buf = io.BytesIO()
    rgba.convert("RGB").save(buf, format="png", compress_level=_PNG_LEVEL)  # opaque: no alpha channel
    return buf.getvalue()


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
