"""The Zarr v3 gradient store: layout, background writer, reader."""

from mstore_lightning.store.reader import GradientStore, StoreReadError, open_store
from mstore_lightning.store.session import IncompatibleStoreError, StoreExistsError

__all__ = ["GradientStore", "IncompatibleStoreError", "StoreExistsError", "StoreReadError", "open_store"]
