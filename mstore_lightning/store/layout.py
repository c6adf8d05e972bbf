"""The on-disk layout of a gradient store: one Zarr v3 group per run.

::

    run.zarr/                          root group; attrs["mstore"] = run metadata (JSON, schema-versioned)
      epochs/<eeeee>/                  one group per captured epoch; attrs: state "open" | "committed", lr, rows
        r<rank>/rows/{ids,step,loss,label,lr}       per-sample row records of one training process
        r<rank>/layers/<module name>/{a,d}          factors: layer input (prefix) and output gradient (suffix)
        r<rank>/layers/<module name>/{weight,bias}  or full per-sample gradients, whichever is smaller
        r<rank>/layers/<module name>/<x>_scale      int8 scales of array <x> (see ``quant``)
        r<rank>/layers/<module name>/a_ref          (epoch, rank, row) of each deduplicated input row
        q<rank>/{rows,layers}/...                   query samples, captured at the epoch's end

Every array is chunked along the row axis and stored with zstd and a crc32c checksum per chunk. An
epoch is visible to readers only once its group says ``state: committed``; that attribute is written
after every chunk of the epoch, and local writes replace ``zarr.json`` atomically.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr

from mstore_lightning.store.codecs import compressors

SCHEMA_VERSION = 1
META_KEY = "mstore"
EPOCHS = "epochs"
ROWS = "rows"
LAYERS = "layers"
OPEN, COMMITTED = "open", "committed"
SPLITS = {"train": "r", "query": "q"}  # rank group prefix of each kind of row: r0, r1, ... and q0, ...


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
) -> zarr.Array:
    """Creates an array of ``rows`` rows, chunked along rows only.

    ``skip_empty`` leaves all-zero chunks unwritten (deduplicated rows are zeros); elsewhere the
    check would scan every chunk for nothing, since gradient rows are almost never all zero.
    """
    return group.create_array(
        name,
        shape=(rows, *row_shape),
        chunks=(chunk_rows, *row_shape),
        dtype=dtype,
        fill_value=0,
        compressors=compressors(),
        config={"write_empty_chunks": not skip_empty},
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
