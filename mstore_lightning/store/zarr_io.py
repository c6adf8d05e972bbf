"""Zarr access for readers: nodes opened and chunks read many at a time, and damage named.

Each call into zarr's synchronous API is a round trip to its event loop thread; on small chunks that
trip, not the bytes, is the cost, so these helpers gather many opens or reads into one. zarr reads
an absent chunk as fill values and reports unparsable metadata as one of several exceptions; these
helpers turn both into a :class:`StoreReadError` that names the array or group, so a damaged store
is never read as zeros.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.core.sync import sync as zarr_sync

from mstore_lightning.core.errors import StoreReadError
from mstore_lightning.store import layout, manifest


class ReadStore(zarr.storage.WrapperStore):
    """The store as readers see it: each chunk checked against its group's manifest, and each chunk a
    read asked for and did not find noted.

    zarr reads a missing chunk as fill values. Some of our chunks are absent on purpose (all their
    rows deduplicated); in an epoch with manifests, a chunk its manifest lists is required, and any
    other is read as zeros; in an earlier epoch, the reader checks missing chunks itself.

    The catalog hands over the manifests of the groups it opens (:meth:`expect`); a chunk of a group
    not seen yet has its group's and its epoch's metadata read first, so no read goes unchecked.
    """

    def __init__(self, store: Any, shared: ReadStore | None = None) -> None:
        super().__init__(store)
        self.missing: set[str] = set() if shared is None else shared.missing
        # group path -> its manifest, or None where its epoch has none
        self.manifests: dict[str, dict[str, int] | None] = {} if shared is None else shared.manifests

    def _with_store(self, store: Any) -> ReadStore:
        return type(self)(store, self)

    def expect(self, epoch_attrs: dict[str, Any], group: str, attrs: dict[str, Any]) -> None:
        """Takes ``group``'s manifest from its attributes (see :func:`manifest.listed`)."""
        self.manifests[group] = manifest.listed(epoch_attrs, group, attrs)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        got = await super().get(key, prototype, byte_range)
        if not manifest.is_chunk(key):
            return got
        group = manifest.group_of(key)
        if group is not None and group not in self.manifests:
            epoch_attrs = await manifest.read_attrs(self._store, group.rsplit("/", 1)[0])
            self.expect(epoch_attrs, group, await manifest.read_attrs(self._store, group))
        listed = self.manifests.get(group) if group is not None else None
        if listed is None:
            if got is None and "/c/" in key:
                self.missing.add(key)
        elif byte_range is None:  # a part of a chunk cannot be checked against the whole's digest
            manifest.check(key, group, listed, got)
        return got


def _missing_chunks(arr: zarr.Array) -> list[str]:
    """Chunk keys of ``arr`` that reads found absent (and forgets them)."""
    store = arr.store
    if not isinstance(store, ReadStore) or not store.missing:
        return []
    prefix = f"{arr.path}/c/"
    found = [k for k in store.missing if k.startswith(prefix)]
    store.missing.difference_update(found)
    return found


def require_chunks(arr: zarr.Array, needed: np.ndarray | None = None) -> None:
    """Raises when a chunk of ``arr`` that holds data (``needed`` chunk indices, default: any) is missing."""
    missing = _missing_chunks(arr)
    if not missing:
        return
    indices = sorted(int(k[len(arr.path) + 3 :].split("/")[0]) for k in missing)
    if needed is not None:
        indices = sorted(set(indices) & {int(i) for i in np.atleast_1d(needed)})
    if indices:
        raise StoreReadError(
            f"Array {arr.path!r} cannot be read: chunk {indices[0]} (counted along rows) is missing from "
            "the store. Run `mstore verify` on the store to list every damaged chunk."
        )


# What zarr raises for metadata it cannot parse, or that names unknown codecs, types or grids.
DAMAGE = (ValueError, TypeError, KeyError, AttributeError)


def node(group: zarr.Group, path: str, missing_ok: bool = False) -> Any:
    """``group[path]``, a damaged ``zarr.json`` reported by name (and a missing one, unless ``missing_ok``)."""
    node = zarr_sync(anode(group._async_group, path, missing_ok))
    if node is None:
        return None
    return zarr.Group(node) if isinstance(node, zarr.AsyncGroup) else zarr.Array(node)


def check_crc(attrs: dict[str, Any], what: str) -> None:
    if layout.crc_mismatch(attrs):
        raise StoreReadError(
            f"The attributes of {what} fail their crc32c checksum: its zarr.json was altered."
        )


def check_rows(arr: zarr.Array, rows: int) -> None:
    if arr.shape[0] != rows:
        raise StoreReadError(
            f"Array {arr.path!r} claims {arr.shape[0]} rows where its epoch holds {rows}: its metadata is damaged."
        )


def open_many(items: list[tuple[zarr.Group, str]]) -> list[zarr.Array | None]:
    """Opens the arrays at ``(group, path)`` together (``None`` for any that is not there)."""

    async def one(group: zarr.Group, path: str) -> zarr.Array | None:
        node = await anode(group._async_group, path, missing_ok=True)
        return None if node is None else zarr.Array(node)

    async def all_of() -> list[zarr.Array | None]:
        return list(await asyncio.gather(*(one(g, p) for g, p in items)))

    return zarr_sync(all_of())


async def anode(group: Any, path: str, missing_ok: bool = False) -> Any:
    """:func:`node` on zarr's async API, so that many reads can overlap."""
    try:
        return await group.getitem(path)
    except KeyError:
        if missing_ok:
            return None
        raise StoreReadError(f"{group.path}/{path} is missing from the store.") from None
    except DAMAGE as exc:
        raise StoreReadError(f"The metadata (zarr.json) of {group.path}/{path} is damaged: {exc}") from exc


def take_many(items: list[tuple[zarr.Array, slice | np.ndarray]]) -> list[np.ndarray]:
    """``[take(arr, where, complete=False) ...]`` in one round trip to zarr's event loop, reads
    overlapping; the caller checks missing chunks with :func:`require_chunks`."""
    if len(items) == 1:
        return [take(*items[0], complete=False)]

    async def one(arr: zarr.Array, where: slice | np.ndarray) -> np.ndarray:
        try:
            if isinstance(where, slice):
                return np.asarray(await arr._async_array.getitem(where))
            return np.asarray(await arr._async_array.get_orthogonal_selection((where,)))
        except StoreReadError:
            raise
        except ValueError as exc:
            raise _damaged(arr, where, exc) from exc

    async def all_of() -> list[np.ndarray]:
        return list(await asyncio.gather(*(one(a, w) for a, w in items)))

    return zarr_sync(all_of())


def take(arr: zarr.Array, where: slice | np.ndarray, complete: bool = True) -> np.ndarray:
    """Rows ``where`` of ``arr``; with ``complete``, every chunk read must exist."""
    try:
        got = arr[where] if isinstance(where, slice) else arr.get_orthogonal_selection((where,))
    except StoreReadError:
        raise
    except ValueError as exc:  # zarr's crc32c and decompression failures are ValueErrors
        raise _damaged(arr, where, exc) from exc
    if complete:
        require_chunks(arr)
    return got


def _damaged(arr: zarr.Array, where: slice | np.ndarray, exc: Exception) -> StoreReadError:
    rows = np.arange(arr.shape[0])[where]
    chunks = sorted({int(r) // int(arr.chunks[0]) for r in np.atleast_1d(rows)})
    shown = ", ".join(map(str, chunks[:5])) + (", ..." if len(chunks) > 5 else "")
    return StoreReadError(
        f"Array {arr.path!r} cannot be read: chunk {shown} (counted along rows) is damaged ({exc}). "
        "Run `mstore verify` on the store to list every damaged chunk."
    )


def object_sizes(store: Any, prefix: str, skip: set[str] = frozenset()) -> dict[str, int]:
    """``{key below prefix: bytes}`` of every file or object stored under ``prefix`` of ``store``,
    less those under the folders ``skip`` (keys below ``prefix``)."""
    while isinstance(store, zarr.storage.WrapperStore):
        store = store._store
    if isinstance(store, zarr.storage.LocalStore):
        # os.scandir's entries carry their type, so each file costs one stat: twice as fast as
        # os.walk with getsize, and a report lists every epoch's files.
        sizes, folders = {}, [(os.path.join(store.root, prefix), "")]
        while folders:
            folder, key = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = f"{key}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    if name not in skip:
                        folders.append((entry.path, f"{name}/"))
                else:
                    try:
                        sizes[name] = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:  # renamed or removed since the listing: a write in flight
                        continue
        return sizes
    if isinstance(store, zarr.storage.FsspecStore):
        base = f"{store.path}/{prefix}".rstrip("/")
        try:
            found = zarr_sync(store.fs._find(base, detail=True))
        except FileNotFoundError:
            return {}
        sizes = {k[len(base) + 1 :]: int(v.get("size") or 0) for k, v in found.items()}
        return {k: v for k, v in sizes.items() if not any(k.startswith(f"{d}/") for d in skip)}
    return {}
