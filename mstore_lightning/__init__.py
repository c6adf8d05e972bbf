"""mstore-lightning: keep and query the per-sample gradients of a PyTorch Lightning run.

Example:
    >>> from mstore_lightning import GradientCapture, open_store
    >>> capture = GradientCapture("runs/demo.zarr", policy={"precision": "fp16"})
"""

from mstore_lightning.callbacks import GradientCapture
from mstore_lightning.capture import IndexedDataset
from mstore_lightning.config import CapturePolicy, PolicyError
from mstore_lightning.store import (
    GradientStore,
    IncompatibleStoreError,
    StoreExistsError,
    StoreReadError,
    open_store,
)

__all__ = [
    "CapturePolicy",
    "GradientCapture",
    "GradientStore",
    "IncompatibleStoreError",
    "IndexedDataset",
    "PolicyError",
    "StoreExistsError",
    "StoreReadError",
    "open_store",
]
