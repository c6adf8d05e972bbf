"""The Zarr v3 gradient store: layout, background writer, write session, verify, and the read side's
catalog, chunk reader and public scan.

Imports ``core`` and ``config`` only: it knows Zarr and bytes, never capture or analytics.
"""

from mstore_lightning.core.errors import IncompatibleStoreError, StoreExistsError, StoreReadError

__all__ = ["IncompatibleStoreError", "StoreExistsError", "StoreReadError"]
