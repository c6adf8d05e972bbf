"""mstore-lightning: keep and query the per-sample gradients of a PyTorch Lightning run.

Example:
    >>> from mstore_lightning import GradientCapture, open_store
    >>> capture = GradientCapture("runs/demo.zarr", policy={"precision": "fp16"})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mstore_lightning.core.lazy import lazy_names

# Each name is imported on first use: the `mstore` command's metadata commands (inspect, verify)
# then start without torch, and reading a store never imports Lightning.
_LAZY = {
    "CapturePolicy": "mstore_lightning.config",
    "PolicyError": "mstore_lightning.config",
    "GradientStore": "mstore_lightning.facade",
    "open_store": "mstore_lightning.facade",
    "IncompatibleStoreError": "mstore_lightning.store",
    "StoreExistsError": "mstore_lightning.store",
    "StoreReadError": "mstore_lightning.store",
    "GradientCapture": "mstore_lightning.callbacks",
    "StoreWriteError": "mstore_lightning.callbacks",
    "IndexedDataset": "mstore_lightning.capture",
    "DiskSpaceError": "mstore_lightning.capture",
}

if TYPE_CHECKING:
    from mstore_lightning.callbacks import GradientCapture, StoreWriteError
    from mstore_lightning.capture import DiskSpaceError, IndexedDataset
    from mstore_lightning.config import CapturePolicy, PolicyError
    from mstore_lightning.facade import GradientStore, open_store
    from mstore_lightning.store import IncompatibleStoreError, StoreExistsError, StoreReadError

__all__ = [
    "CapturePolicy",
    "DiskSpaceError",
    "GradientCapture",
    "GradientStore",
    "IncompatibleStoreError",
    "IndexedDataset",
    "PolicyError",
    "StoreExistsError",
    "StoreReadError",
    "StoreWriteError",
    "open_store",
]


__getattr__ = lazy_names(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
