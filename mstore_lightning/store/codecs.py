"""Chunk codecs of the store: a compressor where it pays, then a crc32c checksum on every chunk.

Every codec is a standard Zarr v3 codec, recorded in each array's metadata, so any Zarr reader
decodes any array. Which compressor an array gets is measured on its first chunk of at least
:data:`TRIAL_BYTES` (:func:`choose`): int8 codes of gradients sit within a few percent of their
entropy, where any compressor costs CPU for nothing, while ReLU activations and float scales shrink
by half or more.

Example:
    >>> import numpy as np
    >>> noise = np.random.default_rng(0).integers(-127, 128, 1 << 19, dtype=np.int8)
    >>> choose(noise).name
    'none'
    >>> choose(np.zeros(1 << 19, dtype=np.float32)).name != 'none'
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

ZSTD_LEVEL = 1  # level 3 compresses these arrays no better at half the speed
DEFAULT = f"zstd:{ZSTD_LEVEL}"  # arrays too small to judge, and the weights
TRIAL_BYTES = 256 << 10  # a smaller first chunk (a flushed partial one) says little about the rest
SAMPLE_BYTES = 256 << 10  # bytes of a chunk each candidate compresses when measured
# A compressor saving less than this share of an array's bytes is not worth its CPU. zstd gives up
# fast on bytes it cannot shrink, so keeping it where it saves 5% costs less than writing the 5%:
# at 15%, capture_overhead.py --versus zstd-everywhere measured 4-8% more time and 3-7% more bytes.
MIN_SAVING = 0.03
NEAR_BEST = 0.9  # the fastest candidate saving at least this share of the best saving is chosen
COMPRESSION_ATTR = "compression"  # on each stored array: the choice and what it measured


@dataclass(frozen=True)
class Compressor:
    """One candidate: the Zarr v3 codec stored in the metadata, and its numcodecs twin to measure."""

    name: str
    zarr_codec: Callable[[], Any] | None
    measure: Callable[[], Any] | None


# Blosc byte-shuffles by the array's item size (floats: exponent bytes together), so it is tried on
# numbers wider than a byte only. Its own threads stay off: the writer already compresses several
# chunks at once on its pool.
COMPRESSORS = {
    c.name: c
    for c in (
        Compressor("none", None, None),
        Compressor(
            "blosc-lz4",
            lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
            lambda: numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
        ),
        Compressor("zstd:-1", lambda: ZstdCodec(level=-1), lambda: numcodecs.Zstd(level=-1)),
        Compressor(DEFAULT, lambda: ZstdCodec(level=ZSTD_LEVEL), lambda: numcodecs.Zstd(level=ZSTD_LEVEL)),
        Compressor(
            "blosc-zstd",
            lambda: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
            lambda: numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE),
        ),
    )
}


@dataclass(frozen=True)
class Choice:
    """The compressor chosen for an array, and what each candidate measured on its sample.

    Attributes:
        name: a key of :data:`COMPRESSORS`.
        measured: ``{candidate: {"ratio": input/output bytes, "mb_per_s": input MB per CPU second}}``;
            empty when the sample was too small to judge and :data:`DEFAULT` was taken.
        sample_bytes: bytes the candidates compressed.
    """

    name: str
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.name, "sample_bytes": self.sample_bytes, "measured": self.measured}


def choose(block: np.ndarray) -> Choice:
    """Measures the candidates on (the first :data:`SAMPLE_BYTES` of) ``block`` and picks one.

    No compressor, unless one saves at least :data:`MIN_SAVING` of the bytes; else the fastest that
    saves at least :data:`NEAR_BEST` of what the best one saves. A block under :data:`TRIAL_BYTES`
    gets :data:`DEFAULT` unmeasured.
    """
    if block.nbytes < TRIAL_BYTES:
        return Choice(DEFAULT)
    row = max(1, block[:1].nbytes)
    sample = np.ascontiguousarray(block[: max(1, SAMPLE_BYTES // row)]).reshape(-1)
    measured = {}
    for name, comp in COMPRESSORS.items():
        if comp.measure is None or (name.startswith("blosc") and sample.itemsize == 1):
            continue
        codec = comp.measure()
        t0 = time.thread_time()  # CPU time: the writer runs at low priority and may wait for a core
        size = len(codec.encode(sample))
        cpu = max(time.thread_time() - t0, 1e-6)
        measured[name] = {
            "ratio": round(sample.nbytes / max(size, 1), 3),
            "mb_per_s": round(sample.nbytes / cpu / 1e6, 1),
        }
    saving = {name: 1 - 1 / m["ratio"] for name, m in measured.items()}
    best = max(saving.values())
    if best < MIN_SAVING:
        return Choice("none", measured, sample.nbytes)
    good = [name for name in measured if saving[name] >= NEAR_BEST * best]
    return Choice(max(good, key=lambda name: measured[name]["mb_per_s"]), measured, sample.nbytes)


def compressors(name: str = DEFAULT) -> list[Any]:
    """The bytes-to-bytes codecs of an array compressed with ``name``: the compressor, if any, then
    crc32c, which every chunk carries (manifests digest the bytes before it)."""
    make = COMPRESSORS[name].zarr_codec
    return ([make()] if make is not None else []) + [Crc32cCodec()]
