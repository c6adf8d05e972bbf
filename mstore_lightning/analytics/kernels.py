"""Per-sample gradient norms and inner products on the stored form, streamed through the scan.

Norms read one block of one layer at a time; inner products gather the rows of ``ids_a`` once and
stream ``ids_b`` block by block, or a window of training rows at a time for top-k. Every kernel is
the layer's representation's (``core.representation``): no gradient is restored.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mstore_lightning.core.representation import Representation, Rows
from mstore_lightning.core.tensor_codes import Coded, floats
from mstore_lightning.store.lanes import Lanes
from mstore_lightning.store.scan import Block, RowSource, Scan, StoredRows, read_ahead

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
    xa: dict[str, Rows] | np.ndarray,
    layers: Layers,
    window: int,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first, block)``: inner products of the query rows ``xa`` (``{layer: rows}``) with
    the training rows ``first:first + window``, window after window from ``start`` to ``stop``,
    summed over ``layers``.

    ``xa`` may instead be the queries' positions among the epoch's training rows. Where one window
    covers them and each layer's queries lie in a few blocks, their rows are then taken from the
    blocks the scan reads anyway: each layer's blocks holding queries are read first. Otherwise
    they are gathered beforehand.

    Only one window of scores and the chunks it reads are held at once, however many rows the epoch
    has; a chunk across two windows is read for each.
    """
    reps = scan.catalog.select(layers)
    scan.prepare([epoch], layers, ["train"])
    stop = scan.catalog.row_count(epoch) if stop is None else stop
    sources = [scan.source(epoch, rep) for rep in reps]
    plans = None
    if isinstance(xa, np.ndarray):
        queries = len(xa)
        plans = _in_stream(sources, xa, start, stop) if stop - start <= window else None
        if plans is None:
            xa = gather_rows(scan, epoch, xa, layers, "train")
    if not isinstance(xa, np.ndarray):
        xa = {name: {k: torch.as_tensor(v) for k, v in x.items()} for name, x in xa.items()}
        queries = next((len(v) for x in xa.values() for v in x.values()), 0)
    adding = threading.Lock()  # every layer adds into the same slices of the window
    with Lanes.for_queries(queries) as lanes:
        for lo in range(start, stop, window):
            hi = min(lo + window, stop)
            out = np.zeros((queries, hi - lo), dtype=np.float64)
            if plans is None:
                pairs = read_ahead(
                    (s, block) for s in sources for block in s.blocks(lo, hi, codes=s.rep.takes_codes)
                )
                items = ((src, block, xa[src.rep.name], block.load) for src, block in pairs)
            else:
                items = _queries_first(sources, plans, xa)
            for src, block, x, load in items:
                a, b = max(block.first, lo), min(block.first + block.rows, hi)
                whole = (a, b) == (block.first, block.first + block.rows)
                local = None if whole else np.arange(a - block.first, b - block.first)
                lanes.submit(add_gram, out[:, a - lo : b - lo], src.rep, x, load, local, adding)
            lanes.wait()
            yield lo, out


QUERY_BLOCKS = 4  # blocks a layer's queries may lie in for `dot_windows` to take them from its scan

Plan = tuple[list[tuple[int, int]], list[tuple[int, int]]]  # (ranges of blocks holding queries, the rest)


def _in_stream(
    sources: Sequence[RowSource], positions: np.ndarray, start: int, stop: int
) -> list[Plan] | None:
    """Each source's rows ``start:stop`` as ``(ranges of its chunks holding queries, the ranges
    between them)``, or ``None`` where they cannot be taken from the scan: a source that is not
    stored chunks, a layer whose queries lie in more than :data:`QUERY_BLOCKS` chunks, or queries
    outside the rows. Found from the chunk grid: no read starts here."""
    if not len(positions) or positions.min() < start or positions.max() >= stop:
        return None
    plans = []
    for src in sources:
        if not isinstance(src, StoredRows):
            return None
        holding = []
        for c in src.chunks():
            first, end = c.first, c.first + c.hi - c.lo
            if end > start and first < stop and np.any((positions >= first) & (positions < end)):
                holding.append((first, end))
        if len(holding) > QUERY_BLOCKS:
            return None
        edges = [start, *(e for r in holding for e in r), stop]
        gaps = [(lo, hi) for lo, hi in zip(edges[::2], edges[1::2]) if hi > lo]
        plans.append((holding, gaps))
    return plans


def _queries_first(
    sources: Sequence[RowSource], plans: list[Plan], positions: np.ndarray
) -> Iterator[tuple[RowSource, Block, Rows, Callable[[], Rows]]]:
    """``(source, block, query rows, load)`` for every block of :func:`_in_stream`'s plans, each
    layer's blocks holding queries first: they are loaded here, and the queries' rows taken from
    them, while the reads of the blocks after them are already under way."""

    def items() -> Iterator[tuple[RowSource, Block, int]]:
        for src, (holding, gaps) in zip(sources, plans):
            codes = src.rep.takes_codes
            for lo, hi in holding:
                yield from ((src, block, len(holding)) for block in src.blocks(lo, hi, codes))
            for lo, hi in gaps:
                yield from ((src, block, 0) for block in src.blocks(lo, hi, codes))

    held: list[tuple[Block, Rows]] = []
    x: Rows = {}
    for src, block, holding in read_ahead(items()):
        if not holding:
            yield src, block, x, block.load
            continue
        held.append((block, block.load()))
        if len(held) == holding:
            x = _take(held, positions)
            for b, rows in held:
                yield src, b, x, functools.partial(dict, rows)
            held = []


def _take(held: list[tuple[Block, Rows]], positions: np.ndarray) -> Rows:
    """The rows at ``positions`` (in that order) from loaded blocks that hold them all (tensors or
    ``Coded``, as the blocks hold them)."""
    where, pieces = [], []
    for block, rows in held:
        sel = np.nonzero((positions >= block.first) & (positions < block.first + block.rows))[0]
        index = torch.from_numpy(positions[sel] - block.first)
        where.append(sel)
        pieces.append({name: values.index_select(0, index) for name, values in rows.items()})
    back = torch.from_numpy(np.argsort(np.concatenate(where), kind="stable"))
    out: Rows = {}
    for name in pieces[0]:
        parts = [p[name] for p in pieces]
        if all(isinstance(p, Coded) for p in parts):
            out[name] = Coded.cat(parts).index_select(0, back)
        else:  # some blocks came decoded, from the cache
            out[name] = torch.cat([floats(p) for p in parts]).index_select(0, back)
    return out


def gather(
    scan: Scan, epoch: int, ids: Sequence[int] | np.ndarray, layers: Layers, split: str
) -> dict[str, Rows]:
    """The rows of samples ``ids`` of each of ``layers``, ``{layer: rows}``."""
    return gather_rows(scan, epoch, scan.catalog.rows_of(epoch, ids, split), layers, split)


def gather_rows(scan: Scan, epoch: int, rows: np.ndarray, layers: Layers, split: str) -> dict[str, Rows]:
    """The rows at positions ``rows`` of each of ``layers``, ``{layer: rows}``."""
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
