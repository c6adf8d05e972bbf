"""The public scan: a layer's rows, by block, window or id set, whether stored or recomputed.

Every operator (norms, inner products, influence, top-k, class sums, sketches, the reports, the Dask
engine) reads rows through a :class:`RowSource`, which :meth:`Scan.source` picks for a layer and an
epoch. The contract comes first, as an abstract class; :class:`StoredRows` fills it from the store's
chunks, and ``capture.recompute.RecomputedRows`` from the model, for layers an epoch chose to
recompute. No operator needs to know which one it holds.

Example::

    scan = Scan.open("runs/demo.zarr")
    src = scan.source(scan.catalog.epochs[-1], "net.0")
    total = np.zeros(len(src))
    for block in src.blocks():
        total[block.first : block.first + block.rows] = src.rep.sqnorm(block.load()).numpy()
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

from mstore_lightning.core.checks import whole
from mstore_lightning.core.representation import Representation, Rows
from mstore_lightning.store.catalog import Catalog
from mstore_lightning.store.chunks import Chunk, ChunkReader
from mstore_lightning.store.zarr_io import StoreReadError

RECOMPUTED = "recomputed from the end-of-epoch weights in eval mode (captured rows use their step's)"
READ_AHEAD = 8  # blocks taken ahead of their use by `read_ahead`: at most 8 decoded chunks held

T = TypeVar("T")


class Block(NamedTuple):
    """Rows ``first:first + rows`` of a source; ``load()`` decodes them (``{array: (rows, ...)}``).

    Loading is deferred so that a scan can read the next block while worker threads decode this one.
    """

    first: int
    rows: int
    load: Callable[[], Rows]


def read_ahead(items: Iterable[T], depth: int = READ_AHEAD) -> Iterator[T]:
    """Yields ``items`` in order, taking up to ``depth`` more from them meanwhile.

    A stored block's read starts when its source yields it, so taking blocks ahead keeps several
    reads in flight while the caller runs its kernels on the current one: across layers too, when
    ``items`` chains the blocks of several sources.

    Example::

        pairs = ((src, block) for src in scan.sources(epoch, None) for block in src.blocks())
        for src, block in read_ahead(pairs):
            total[block.first : block.first + block.rows] += src.rep.sqnorm(block.load()).numpy()
    """
    taken: deque[T] = deque()
    for item in items:
        taken.append(item)
        if len(taken) > depth:
            yield taken.popleft()
    while taken:
        yield taken.popleft()


class RowSource(ABC):
    """The rows of one layer in one epoch and split.

    Contract:
        - ``len(source)`` is the number of rows, aligned with ``catalog.sample_ids(epoch, split)``.
        - :meth:`blocks` yields, in row order, blocks that together cover ``start:stop`` (a block
          may start before ``start`` or end after ``stop``); each row appears in one block.
        - :meth:`gather` returns the rows at any positions, in the order asked for.
        - Rows are the decoded stored arrays that ``rep``'s kernels take.
        - :meth:`chunks` and :meth:`read_chunk` serve readers that take one unit at a time (the
          Dask engine, where :meth:`Scan.portable` allows).

    Attributes:
        rep: the layer's representation, whose kernels apply to the rows.
        epoch: the epoch.
        split: ``"train"`` or ``"query"``.
    """

    def __init__(self, rep: Representation, epoch: int, split: str) -> None:
        self.rep, self.epoch, self.split = rep, epoch, split

    @abstractmethod
    def __len__(self) -> int:
        """Rows of the layer in the epoch's split."""

    @abstractmethod
    def blocks(self, start: int = 0, stop: int | None = None, codes: bool = False) -> Iterator[Block]:
        """Blocks covering rows ``start:stop`` (all by default), in row order. With ``codes``, stored
        ``int8`` arrays may load as ``tensor_codes.Coded`` rows, for ``rep.gram`` where
        ``rep.takes_codes``."""

    @abstractmethod
    def gather(self, rows: np.ndarray) -> Rows:
        """The rows at global positions ``rows``, in that order."""

    @property
    @abstractmethod
    def approximate(self) -> str | None:
        """Why these rows give estimates, beyond the storage precision; ``None`` when exact."""

    @abstractmethod
    def chunks(self) -> list[Chunk]:
        """The units a distributed reader reads one at a time."""

    @abstractmethod
    def read_chunk(self, chunk: Chunk) -> Rows:
        """The decoded rows of one of :meth:`chunks`."""


class StoredRows(RowSource):
    """Rows read from the store's chunks (through the reader's cache and staging)."""

    def __init__(self, reader: ChunkReader, rep: Representation, epoch: int, split: str) -> None:
        super().__init__(rep, epoch, split)
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.catalog.row_count(self.epoch, self.split)

    def blocks(self, start: int = 0, stop: int | None = None, codes: bool = False) -> Iterator[Block]:
        stop = len(self) if stop is None else stop
        for c, load in self.reader.deferred(self.epoch, self.rep, self.split, start, stop, codes):
            yield Block(c.first, c.hi - c.lo, load)

    def gather(self, rows: np.ndarray) -> Rows:
        return self.reader.gather(self.epoch, self.rep, np.asarray(rows, dtype=np.int64), self.split)

    @property
    def approximate(self) -> str | None:
        return self.rep.approximate

    def chunks(self) -> list[Chunk]:
        return self.reader.chunks(self.epoch, self.rep, self.split)

    def read_chunk(self, chunk: Chunk) -> Rows:
        return self.reader.chunk(self.epoch, self.rep, self.split, chunk)


# A source for a layer an epoch recomputes: ``(catalog, representation, epoch) -> RowSource``.
RecomputeFactory = Callable[[Catalog, Representation, int], RowSource]


class Scan:
    """The public read API of a store: its catalog, and a row source per layer and epoch.

    Attributes:
        catalog: epochs, layers, ranks and row records.
        reader: the stored rows' chunk reader (its ``cache`` and ``reads`` counter).
        recompute: makes the sources of recomputed layers; ``None`` until a model is attached.
    """

    def __init__(self, catalog: Catalog, cache_bytes: int = 0) -> None:
        self.catalog = catalog
        self.reader = ChunkReader(catalog, cache_bytes)
        self.recompute: RecomputeFactory | None = None

    @classmethod
    def open(
        cls, uri: str | os.PathLike, storage_options: dict[str, Any] | None = None, cache_bytes: int = 0
    ) -> Scan:
        """Opens the store at a local path or fsspec URL, read-only."""
        whole("cache_bytes", cache_bytes, low=0, noun="a number of bytes >= 0")
        return cls(Catalog.open(uri, storage_options), cache_bytes)

    def source(self, epoch: int, layer: str | Representation, split: str = "train") -> RowSource:
        """The rows of ``layer`` in ``epoch``'s ``split``: stored, or recomputed where the epoch
        stored the weights instead."""
        rep = layer if isinstance(layer, Representation) else self.catalog.rep(layer)
        if rep.name not in self.catalog.recomputed(epoch):
            return StoredRows(self.reader, rep, epoch, split)
        if split != "train":
            raise StoreReadError(
                f"Layer {rep.name!r} is recomputed, which covers training rows only, not queries."
            )
        if self.recompute is None:
            why = self.catalog.meta.get("recompute", {}).get(rep.name, {})
            raise StoreReadError(
                f"Epoch {epoch} did not store layer {rep.name!r} (store-or-recompute: {why or 'recompute'}); "
                "call store.attach_recompute(model, dataset) to recompute it from the epoch's weights."
            )
        return self.recompute(self.catalog, rep, epoch)

    def portable(self, epoch: int, layer: str) -> tuple[bool, str]:
        """``(whether another process can read the rows from the store alone, why not)``: a Dask
        worker has the store's URL, but not the model that recomputed layers need."""
        if layer in self.catalog.recomputed(epoch):
            return False, f"Layer {layer!r} is recomputed in epoch {epoch}; run it without a Dask client."
        return True, ""

    def sources(
        self, epoch: int, layers: Sequence[str] | str | None, split: str = "train"
    ) -> list[RowSource]:
        """:meth:`source` of each of ``layers`` (all by default)."""
        return [self.source(epoch, rep, split) for rep in self.catalog.select(layers)]

    def approximate(self, epoch: int, layers: Sequence[str] | str | None) -> dict[str, str]:
        """``{layer: why}`` for each of ``layers`` whose rows in ``epoch`` give estimates."""
        out = {}
        recomputed = set(self.catalog.recomputed(epoch))
        for rep in self.catalog.select(layers):
            why = [w for w in (rep.approximate, RECOMPUTED if rep.name in recomputed else None) if w]
            if why:
                out[rep.name] = "; ".join(why)
        return out

    def prepare(
        self, epochs: Sequence[int], layers: Sequence[str] | str | None, splits: Sequence[str]
    ) -> None:
        """Opens every stored array of ``layers`` in ``epochs`` at once (one trip to zarr's loop)."""
        self.reader.open_layers(list(epochs), self.catalog.select(layers), list(dict.fromkeys(splits)))

    def stage(
        self, epochs: Sequence[int], layers: Sequence[str] | str | None, splits: Sequence[str]
    ) -> Iterator[list[int]]:
        """Yields ``epochs`` in runs whose stored chunks are read ahead in one batch and held (a
        bounded number of bytes) while the run is processed. See ``ChunkReader.stage``."""
        return self.reader.stage(epochs, self.catalog.select(layers), splits)
