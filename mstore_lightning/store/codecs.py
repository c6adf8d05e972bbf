"""Chunk codecs of the store.

Chunks are standard Zarr v3 ``zstd`` + ``crc32c``, readable by any Zarr reader. The one difference is
who compresses: numcodecs' zstd holds the GIL while it compresses, which stalls the training loop's
Python code for every chunk written in the background; python-zstandard releases it, so compression
runs beside training instead of in turns with it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import zstandard
from zarr.codecs import Crc32cCodec, ZstdCodec

ZSTD_LEVEL = 1  # level 3 compresses these arrays no better at half the speed

_local = threading.local()


class GilFreeZstdCodec(ZstdCodec):
    """The Zarr ``zstd`` codec, encoding with python-zstandard (same metadata, same frames)."""

    def _encode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        compressors = getattr(_local, "compressors", None)
        if compressors is None:
            compressors = _local.compressors = {}
        key = (self.level, self.checksum)
        if key not in compressors:  # a ZstdCompressor is not safe to share between threads
            compressors[key] = zstandard.ZstdCompressor(level=self.level, write_checksum=self.checksum)
        out = compressors[key].compress(chunk_bytes.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(out)

    async def _encode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return await asyncio.to_thread(self._encode_sync, chunk_bytes, chunk_spec)


def compressors(level: int = ZSTD_LEVEL) -> list[Any]:
    """The bytes-to-bytes codecs of every stored array: zstd, then a crc32c checksum."""
    return [GilFreeZstdCodec(level=level), Crc32cCodec()]
