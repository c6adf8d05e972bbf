"""Chunk codecs of the store: zstd, then a crc32c checksum, both standard Zarr v3 codecs."""

from __future__ import annotations

from typing import Any

from zarr.codecs import Crc32cCodec, ZstdCodec

ZSTD_LEVEL = 1  # level 3 compresses these arrays no better at half the speed


def compressors(level: int = ZSTD_LEVEL) -> list[Any]:
    """The bytes-to-bytes codecs of every stored array."""
    return [ZstdCodec(level=level), Crc32cCodec()]
