"""mstore-lightning: keep and query the per-sample gradients of a PyTorch Lightning run.

Example:
    >>> from mstore_lightning import GradientCapture, open_store
    >>> capture = GradientCapture("runs/demo.zarr", policy={"precision": "fp16"})
"""

from __future__ import annotations

import importlib
from typing import Any

from mstore_lightning.config import CapturePolicy, PolicyError
from mstore_lightning.facade import GradientStore, open_store
from mstore_lightning.store import IncompatibleStoreError, StoreExistsError, StoreReadError

# Loaded on first use: reading a store (and the `mstore` command) need not import Lightning.
_LAZY = {
    "GradientCapture": "mstore_lightning.callbacks",
    "StoreWriteError": "mstore_lightning.callbacks",
    "IndexedDataset": "mstore_lightning.capture",
    "DiskSpaceError": "mstore_lightning.capture",
}

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mstore_lightning' has no attribute {name!r}")
