"""Per-sample gradient norms and inner products on the stored form, streamed through the scan.

Norms read one block of one layer at a time; inner products gather the rows of ``ids_a`` once and
stream ``ids_b`` block by block, or a window of training rows at a time for top-k. Every kernel is
the layer's representation's (``core.representation``): no gradient is restored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mstore_lightning.core.representation import Representation, Rows
from mstore_lightning.store.lanes import Lanes
from mstore_lightning.store.scan import Scan, read_ahead

BLOCK_ROWS = 1024  # rows of ``ids_b`` gathered at once by ``dot``
Layers = Sequence[str] | str | None


def as_scan(store: Any) -> Scan:
    """The scan of ``store``: a :class:`Scan`, or any object holding one as ``.scan`` (the
    ``GradientStore`` users hold)."""
    return store if isinstance(store, Scan) else store.scan


def sqnorms(
    scan: Scan, epoch: int, layers: Layers = None, split: str = "train", client: Any = None, kept: bool = True
) -> np.ndarray:
    """Squared per-sample gradient norms over ``layers``, aligned with ``sample_ids(epoch, split)``.

    Where the capture kept every asked-for layer's squared norms, they are read (exact, before any
    quantization); otherwise, or with ``kept=False``, computed on the stored rows block by block, or
    with a ``distributed.Client`` one Dask task per chunk.
    """
    names = [rep.name for rep in scan.catalog.select(layers)]
    total = scan.catalog.captured_sqnorms(epoch, names, split) if kept else None
    if total is not None:
        return total
    if client is not None:
        from mstore_lightning.analytics import dask_engine

        return dask_engine.sqnorms(scan, epoch, names, split, client)
    total = np.zeros(scan.catalog.row_count(epoch, split), dtype=np.float64)
    blocks = ((src, block) for src in scan.sources(epoch, names, split) for block in src.blocks())
    for src, block in read_ahead(blocks):
        total[block.first : block.first + block.rows] += src.rep.sqnorm(block.load()).numpy()
    return total


def dot(
    scan: Scan,
    epoch: int,
    ids_a: Sequence[int] | np.ndarray,
    ids_b: Sequence[int] | np.ndarray,
    layers: Layers = None,
    split_a: str = "train",
    split_b: str = "train",
    client: Any = None,
) -> np.ndarray:
    """``(len(ids_a), len(ids_b))`` per-sample gradient inner products over ``layers``."""
    cat = scan.catalog
    rows_a, rows_b = cat.rows_of(epoch, ids_a, split_a), cat.rows_of(epoch, ids_b, split_b)
    reps = cat.select(layers)
    if client is not None:
        from mstore_lightning.analytics import dask_engine

        names = [rep.name for rep in reps]
        return dask_engine.dots(scan, epoch, rows_a, names, split_a, split_b, client)[:, rows_b]
    scan.prepare([epoch], layers, [split_a, split_b])
    out = np.zeros((len(rows_a), len(rows_b)), dtype=np.float64)
    # Many ids: stream whole blocks (memory of one chunk); few: gather just their rows.
    by_block = len(rows_b) > BLOCK_ROWS
    if by_block:
        order = np.argsort(rows_b, kind="stable")
        sorted_rows = rows_b[order]
        in_order = bool(np.all(order[1:] > order[:-1]))
    with Lanes.for_queries(len(rows_a)) as lanes:
        for rep in reps:  # one layer's query rows held at a time: ids_a may be many
            xa = scan.source(epoch, rep, split_a).gather(rows_a)
            src = scan.source(epoch, rep, split_b)
            if not by_block:
                for lo in range(0, len(rows_b), BLOCK_ROWS):
                    out[:, lo : lo + BLOCK_ROWS] += rep.gram(
                        xa, src.gather(rows_b[lo : lo + BLOCK_ROWS])
                    ).numpy()
                continue
            for block in read_ahead(src.blocks()):
                a, b = np.searchsorted(sorted_rows, [block.first, block.first + block.rows])
                if a == b:
                    continue
                local = sorted_rows[a:b] - block.first
                whole = b - a == block.rows and np.array_equal(local, np.arange(block.rows))  # every row once
                # Summed in row order, where a block is a plain slice; put in ids_b's order once.
                lanes.submit(add_gram, out[:, a:b], rep, xa, block.load, None if whole else local)
            lanes.wait()  # the next layer adds into the same slices
    if by_block and not in_order:
        out[:, order] = out.copy()
    return out


def dot_windows(
    scan: Scan,
    epoch: int,
    xa: dict[str, Rows],
    layers: Layers,
    window: int,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first, block)``: inner products of the query rows ``xa`` (``{layer: rows}``) with
    the training rows ``first:first + window``, window after window from ``start`` to ``stop``,
    summed over ``layers``.

    Only one window of scores and the chunks it reads are held at once, however many rows the epoch
    has; a chunk across two windows is read for each.
    """
    reps = scan.catalog.select(layers)
    scan.prepare([epoch], layers, ["train"])
    xa = {name: {k: torch.as_tensor(v) for k, v in x.items()} for name, x in xa.items()}
    queries = next((len(v) for x in xa.values() for v in x.values()), 0)
    stop = scan.catalog.row_count(epoch) if stop is None else stop
    sources = [scan.source(epoch, rep) for rep in reps]
    adding = threading.Lock()  # every layer adds into the same slices of the window
    with Lanes.for_queries(queries) as lanes:
        for lo in range(start, stop, window):
            hi = min(lo + window, stop)
            out = np.zeros((queries, hi - lo), dtype=np.float64)
            for src, block in read_ahead((s, block) for s in sources for block in s.blocks(lo, hi)):
                a, b = max(block.first, lo), min(block.first + block.rows, hi)
                whole = (a, b) == (block.first, block.first + block.rows)
                local = None if whole else np.arange(a - block.first, b - block.first)
                lanes.submit(
                    add_gram, out[:, a - lo : b - lo], src.rep, xa[src.rep.name], block.load, local, adding
                )
            lanes.wait()
            yield lo, out


def gather(
    scan: Scan, epoch: int, ids: Sequence[int] | np.ndarray, layers: Layers, split: str
) -> dict[str, Rows]:
    """The rows of samples ``ids`` of each of ``layers``, ``{layer: rows}``."""
    rows = scan.catalog.rows_of(epoch, ids, split)
    scan.prepare([epoch], layers, [split])
    return {src.rep.name: src.gather(rows) for src in scan.sources(epoch, layers, split)}


def add_gram(
    out: np.ndarray,
    rep: Representation,
    x: Rows,
    load: Callable[[], Rows],
    local: np.ndarray | None,
    adding: threading.Lock | None = None,
) -> None:
    """Adds the Gram block of ``x`` against a block's rows (loaded here), or its ``local`` ones;
    under ``adding`` when other threads add into the same ``out``."""
    y = load()
    if local is not None:
        index = torch.from_numpy(local)
        y = {k: v.index_select(0, index) for k, v in y.items()}
    gram = rep.gram(x, y).numpy()
    if adding is None:
        out += gram
        return
    with adding:
        out += gram
