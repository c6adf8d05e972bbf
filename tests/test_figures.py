"""Report figures kept between epochs: a redraw of only their changing parts must give the pixels a
full draw of the same data gives."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from mstore_lightning.reports.figures import Figures

HEAT_TITLE = "Class-gradient cosine, epoch {}\nred +1 (aligned) · white 0 · blue -1 (opposed)"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def full_draw(kept) -> np.ndarray:
    """The kept figure as one ordinary matplotlib draw of every artist, in z-order."""
    for artist in kept.plot.moving:
        artist.set_animated(False)
    canvas = FigureCanvasAgg(kept.plot.fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def kept(figs: Figures, name: str):
    return figs._kept[name][1]


@settings(max_examples=8, deadline=None)
@given(
    classes=st.integers(1, 10),
    n=st.integers(1, 300),
    scale=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**16),
)
def test_norms_by_class_redrawn_equals_a_full_draw(classes, n, scale, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 400)
    figs = Figures()
    figs.norms_by_class(rng.lognormal(size=400), labels, 0)
    before, layout_before = kept(figs, "norms_by_class"), figs._kept["norms_by_class"][0]
    # Fewer points and a shifted range: the old points must be gone, the axes redrawn if needed.
    norms = rng.lognormal(size=400) * scale
    norms[n:] = np.nan
    png = figs.norms_by_class(norms, labels, 1)
    after = kept(figs, "norms_by_class")
    np.testing.assert_array_equal(pixels(png), full_draw(after))
    assert (after is before) == (figs._kept["norms_by_class"][0] == layout_before)


def test_norms_by_class_keeps_its_axes_until_the_range_leaves_them():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    norms = 10 ** rng.uniform(-1.8, -0.2, 500)
    figs = Figures()
    figs.norms_by_class(norms, labels, 0)
    first = kept(figs, "norms_by_class")
    figs.norms_by_class(norms * 1.2, labels, 1)  # still within the decades of its axes
    assert kept(figs, "norms_by_class") is first
    png = figs.norms_by_class(norms * 100, labels, 2)  # two decades up: new axes
    assert kept(figs, "norms_by_class") is not first
    np.testing.assert_array_equal(pixels(png), full_draw(kept(figs, "norms_by_class")))


def test_conflict_heatmap_redrawn_equals_a_full_draw():
    rng = np.random.default_rng(1)
    figs = Figures()
    figs.conflict_heatmap(rng.uniform(-1, 1, (10, 10)), list(range(10)), 0)
    first = kept(figs, "conflict_heatmap")
    cosine = rng.uniform(-1, 1, (10, 10))
    cosine[3, 4] = np.nan  # a class without samples
    png = figs.conflict_heatmap(cosine, list(range(10)), 7)
    assert kept(figs, "conflict_heatmap") is first
    np.testing.assert_array_equal(pixels(png), full_draw(first))
    assert first.title.get_text() == HEAT_TITLE.format(7)


def test_sample_grid_redrawn_equals_a_full_draw_and_new_captions_replace_old():
    rng = np.random.default_rng(2)
    figs = Figures()
    figs.sample_grid([rng.random((8, 8)) for _ in range(12)], range(12), [1] * 12, "epoch 0")
    first = kept(figs, "sample_grid")
    png = figs.sample_grid([rng.random((8, 8)) for _ in range(12)], range(100, 112), [2] * 12, "epoch 1")
    assert kept(figs, "sample_grid") is first
    np.testing.assert_array_equal(pixels(png), full_draw(first))
    assert [t.get_text() for t in first.captions] == [f"#{i}  y=2" for i in range(100, 112)]
    # Another count of samples is another layout: a figure of its own size.
    png = figs.sample_grid([rng.random((8, 8)) for _ in range(3)], range(3), [0] * 3, "epoch 2")
    assert kept(figs, "sample_grid") is not first
    np.testing.assert_array_equal(pixels(png), full_draw(kept(figs, "sample_grid")))


def test_a_copy_for_a_report_process_starts_without_kept_figures():
    import pickle

    figs = Figures()
    figs.conflict_heatmap(np.eye(3), [0, 1, 2], 0)
    copy = pickle.loads(pickle.dumps(figs))
    assert copy._kept == {} and pixels(copy.conflict_heatmap(np.eye(3), [0, 1, 2], 0)).shape[2] == 3
