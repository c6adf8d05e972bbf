"""Manifests: every chunk of a committed epoch, bound to its place by a digest.

A chunk's own crc32c catches flipped bytes, not a valid chunk in the wrong place: epoch 2's chunk of
``rows/ids`` copied over epoch 1's decodes fine and credits gradients to the wrong samples. So each
group that one process writes whole (a rank group ``r<k>`` or ``q<k>``, an epoch's ``weights``)
lists, in its attribute ``manifest``, every chunk below it with crc32c over the chunk's store key and
then its bytes. The writer records each digest as the chunk is stored (:class:`ManifestStore`) and
writes the list in one PUT of the group's ``zarr.json`` before the epoch's commit marker, which says
``manifest: 1``. Readers (:class:`~mstore_lightning.store.zarr_io.ReadStore`) and ``verify`` check
every chunk they read against it: a chunk missing, extra, altered or copied from elsewhere is damage.

Epochs committed before manifests existed carry no ``manifest`` attribute; they are read as before,
and ``verify`` says that they have none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import crc32c
import zarr.storage
from zarr.core.buffer import Buffer, default_buffer_prototype

from mstore_lightning.core.errors import StoreReadError
from mstore_lightning.store import layout

MANIFEST = "manifest"  # attribute of a sealed group: {chunk key under the group: digest}
FORMAT = 1  # the commit's "manifest": the format of its groups' manifests
METADATA = "zarr.json"
CRC_BYTES = 4  # every chunk ends with its crc32c (see store.codecs)


class ManifestError(StoreReadError):
    """A chunk disagrees with its group's manifest: missing, unlisted, altered or from elsewhere.

    Attributes:
        key: the chunk's store key.
        problem: what is wrong with it, in words.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"Chunk {key}: {problem}. Run `mstore verify` on the store to list every damaged chunk.")
        self.key, self.problem = key, problem


def digest(key: str, data: Any) -> int:
    """crc32c over ``key`` (the chunk's store key) and then the chunk's bytes before their own
    trailing crc32c: the same bytes under another key, another epoch's or another array's, give
    another digest.

    The trailing checksum (every array's last codec) is left out because a CRC over a message
    followed by its own CRC is the same for every message of that length.
    """
    return crc32c.crc32c(data[:-CRC_BYTES], crc32c.crc32c(key.encode()))


def is_chunk(key: str) -> bool:
    """Whether a store key names a chunk: in Zarr v3 everything but ``zarr.json`` is one."""
    return not (key == METADATA or key.endswith("/" + METADATA))


def group_of(key: str) -> str | None:
    """The sealed group a key lies in (``epochs/<e>/<group>``), or None outside the epochs."""
    parts = key.split("/", 3)
    if len(parts) < 4 or parts[0] != layout.EPOCHS:
        return None
    return "/".join(parts[:3])


def listed(epoch_attrs: dict[str, Any], group: str, attrs: dict[str, Any]) -> dict[str, int] | None:
    """The manifest of ``group`` (its chunk keys below it and their digests), or None when its epoch
    was committed before manifests existed (or is not committed).

    Raises:
        StoreReadError: the epoch was committed with manifests, and the group's is missing or malformed.
    """
    if epoch_attrs.get("state") != layout.COMMITTED or MANIFEST not in epoch_attrs:
        return None
    found = attrs.get(MANIFEST)
    if not isinstance(found, dict) or not all(isinstance(v, int) for v in found.values()):
        what = "has no manifest" if found is None else "has a malformed manifest"
        raise StoreReadError(
            f"{group} {what}, though its epoch was committed with one: its zarr.json was replaced or "
            "damaged. Run `mstore verify` on the store."
        )
    return found


def check(key: str, group: str, manifest: dict[str, int], got: Buffer | None) -> None:
    """Raises :class:`ManifestError` unless the chunk ``key`` read as ``got`` (None: absent) is the
    one ``group``'s manifest lists (a chunk it does not list is unwritten on purpose)."""
    want = manifest.get(key[len(group) + 1 :])
    if got is None:
        if want is not None:
            raise ManifestError(key, "chunk file is missing, though its group's manifest lists it")
        return
    if want is None:
        raise ManifestError(
            key, "chunk file is not in its group's manifest: it was added or copied in after the commit"
        )
    data = got.as_numpy_array()
    if digest(key, data) != want:
        if not _own_crc_holds(data):
            raise ManifestError(
                key, "crc32c checksum mismatch: the chunk file is corrupt (flipped bytes or truncated)"
            )
        raise ManifestError(
            key,
            "a valid chunk, but not the one its group's manifest lists here: it was copied from "
            "another array or epoch",
        )


def _own_crc_holds(data: Any) -> bool:
    """Whether a chunk's trailing crc32c (every array's last codec) matches the bytes before it."""
    body, trailer = data[:-CRC_BYTES], bytes(data[-CRC_BYTES:])
    return len(data) >= CRC_BYTES and crc32c.crc32c(body) == int.from_bytes(trailer, "little")


async def read_attrs(store: zarr.storage.StoreLike, path: str) -> dict[str, Any]:
    """The attributes in ``path``'s ``zarr.json`` (``{}`` where there is none)."""
    got = await store.get(f"{path}/{METADATA}", default_buffer_prototype())
    if got is None:
        return {}
    try:
        return dict(json.loads(got.to_bytes()).get("attributes", {}) or {})
    except (ValueError, AttributeError) as exc:
        raise StoreReadError(f"The metadata (zarr.json) of {path} is damaged: {exc}") from exc


class ManifestStore(zarr.storage.WrapperStore):
    """The writer's store: records the digest of each chunk it stores, and forgets deleted ones.

    Args:
        store: the store written to.
        digests: the record, shared with copies zarr makes of this wrapper.
    """

    def __init__(self, store: Any, digests: dict[str, int] | None = None) -> None:
        super().__init__(store)
        self.digests: dict[str, int] = {} if digests is None else digests

    def _with_store(self, store: Any) -> ManifestStore:
        return type(self)(store, self.digests)

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        if is_chunk(key):
            self.digests[key] = digest(key, value.as_numpy_array())

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # The inner store's own call keeps the write atomic; the digest is recorded only when a
        # key that was absent got these bytes.
        existed = await self._store.exists(key)
        await self._store.set_if_not_exists(key, value)
        if is_chunk(key) and not existed:
            self.digests[key] = digest(key, value.as_numpy_array())

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        self.digests.pop(key, None)

    async def delete_dir(self, prefix: str) -> None:
        await self._store.delete_dir(prefix)
        self.forget(prefix)

    def forget(self, prefix: str) -> None:
        """Drops the record of every chunk below ``prefix``."""
        below = prefix.rstrip("/") + "/" if prefix else ""
        for key in [k for k in self.digests if k.startswith(below)]:
            del self.digests[key]

    async def manifest(self, group: str, complete: bool = False) -> dict[str, int]:
        """The manifest of ``group``: its recorded chunks, by key below it, taken from the record.

        With ``complete``, chunks below the group that this process did not write (kept from an
        earlier process, as in a run resumed from a checkpoint) are read and digested too.
        """
        below = group + "/"
        out = {k[len(below) :]: d for k, d in self.digests.items() if k.startswith(below)}
        self.forget(group)
        if complete:
            async for key in self._store.list_prefix(below):
                name = key[len(below) :]
                if is_chunk(key) and name not in out:
                    got = await self._store.get(key, default_buffer_prototype())
                    if got is not None:
                        out[name] = digest(key, got.as_numpy_array())
        return dict(sorted(out.items()))
