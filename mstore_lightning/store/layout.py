"""The on-disk layout of a gradient store: one Zarr v3 group per run.

::

    run.zarr/                          root group; attrs["mstore"] = run metadata (JSON, schema-versioned)
      epochs/<eeeee>/                  one group per captured epoch; attrs: state "open" | "committed", lr, rows, manifest
        r<rank>/rows/{ids,step,loss,label,lr}       per-sample row records of one training process
        r<rank>/layers/<module name>/{a,d}          factors: layer input (prefix) and output gradient (suffix)
        r<rank>/layers/<module name>/{weight,bias}  or full per-sample gradients, whichever is smaller
        r<rank>/layers/<module name>/<x>_scale      int8 scales of array <x> (see ``quant``)
        r<rank>/layers/<module name>/a_ref          (epoch, rank, row) of each deduplicated input row
        q<rank>/{rows,layers}/...                   query samples, captured at the epoch's end

Every array is chunked along the row axis and stored with a crc32c checksum per chunk, after the
compressor its first chunk measured best (none, zstd or blosc: see :mod:`~.codecs`); each
rank group (and ``weights``) lists its chunks and their digests in its attribute ``manifest`` (see
:mod:`~mstore_lightning.store.manifest`). An epoch is visible to readers only once its group says
``state: committed``; that attribute is written after every chunk and manifest of the epoch, and
local writes replace ``zarr.json`` atomically.

A store is a local directory or an fsspec URL (``s3://bucket/run.zarr``); :func:`zarr_store` opens
either.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import numpy as np
import zarr
import zarr.storage

from mstore_lightning.store.codecs import DEFAULT, compressors

SCHEMA_VERSION = 1
ZARR_FORMAT = 3  # opened as such: no probing for Zarr v2 metadata, one request per node on object stores
META_KEY = "mstore"
EPOCHS = "epochs"
ROWS = "rows"
LAYERS = "layers"
OPEN, COMMITTED = "open", "committed"
SPLITS = {"train": "r", "query": "q"}  # rank group prefix of each kind of row: r0, r1, ... and q0, ...
# Every rank group's per-row records (``rows/<name>``) and their dtypes.
ROW_FIELDS = {"ids": np.int64, "step": np.int64, "label": np.int64, "lr": np.float64, "loss": np.float32}
MARGINS = "margin"  # rows/margin: z_y - max other logit of each training row, where the capture saw logits
SQNORMS = "sqnorm"  # rows/sqnorm: exact squared norms of every captured layer, one column each


def is_url(uri: str) -> bool:
    """Whether ``uri`` names a store through fsspec (``s3://...``, ``file://...``) rather than a path."""
    return "://" in uri


def zarr_store(uri: str, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> Any:
    """The Zarr store at a local path or an fsspec URL.

    URL stores list afresh every time: fsspec would otherwise keep a listing per process, so a
    process that listed the store once would not see epochs (or any object) another process wrote
    since. ``storage_options`` given by the caller win over these defaults.

    Example:
        >>> zarr_store("s3://bucket/run.zarr", {"endpoint_url": "http://localhost:9000"})  # doctest: +SKIP
    """
    if is_url(uri):
        protocol = uri.split("://", 1)[0].lower()
        options = {"use_listings_cache": False, **_url_defaults(protocol), **(storage_options or {})}
        return zarr.storage.FsspecStore.from_url(uri, storage_options=options, read_only=read_only)
    return zarr.storage.LocalStore(os.fspath(uri), read_only=read_only)


@functools.cache
def _url_defaults(protocol: str) -> dict[str, Any]:
    if protocol in ("file", "local"):
        return {"auto_mkdir": True}  # fsspec's local files otherwise need their folders made first
    if protocol not in ("s3", "s3a"):
        return {}
    try:
        from s3fs import S3FileSystem
    except ImportError:  # fsspec says what to install when the store is opened
        return {}
    # Recent s3fs asks for an object's size (one more request) before each read, to split reads of
    # objects over its 50 MB block size; chunks are far smaller, so that request only doubles the
    # latency of every read.
    if "max_concurrency" in inspect.signature(S3FileSystem.__init__).parameters:
        return {"max_concurrency": 1}
    return {}


def epoch_key(epoch: int) -> str:
    return f"{epoch:05d}"


def rank_key(rank: int, split: str = "train") -> str:
    return f"{SPLITS[split]}{rank}"


def create_row_array(
    group: zarr.Group,
    name: str,
    rows: int,
    row_shape: tuple[int, ...],
    dtype: np.dtype,
    chunk_rows: int,
    skip_empty: bool = False,
    attributes: dict[str, Any] | None = None,
    compressor: str = DEFAULT,
) -> zarr.Array:
    """Creates an array of ``rows`` rows, chunked along rows only, with its ``attributes``, compressed
    with ``compressor`` (a name in :data:`~.codecs.COMPRESSORS`).

    ``skip_empty`` leaves all-zero chunks unwritten (deduplicated rows are zeros); elsewhere the
    check would scan every chunk for nothing, since gradient rows are almost never all zero.
    """
    return group.create_array(
        name,
        shape=(rows, *row_shape),
        chunks=(chunk_rows, *row_shape),
        dtype=dtype,
        fill_value=0,
        compressors=compressors(compressor),
        config={"write_empty_chunks": not skip_empty},
        attributes=attributes,
    )


CRC_KEY = "crc32c"  # checksum of a group's other attributes, so that edited metadata is found


def attrs_crc(attrs: dict[str, Any]) -> int:
    """crc32c of ``attrs`` (less any checksum) as canonical JSON."""
    import crc32c

    body = {k: v for k, v in attrs.items() if k != CRC_KEY}
    return crc32c.crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def crc_mismatch(attrs: dict[str, Any]) -> bool:
    """Whether ``attrs`` carry a checksum that they no longer match."""
    return CRC_KEY in attrs and attrs[CRC_KEY] != attrs_crc(attrs)


def with_crc(attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` with their checksum."""
    attrs = to_json(attrs)
    return {**attrs, CRC_KEY: attrs_crc(attrs)}


def to_json(value: Any) -> Any:
    """Round-trips ``value`` through JSON so that nothing but JSON types reach the store."""
    return json.loads(json.dumps(value))
