"""Per-layer extraction of per-sample gradient factors, and the hooks that feed it."""

from mstore_lightning.capture.identity import IndexedDataset
from mstore_lightning.capture.registry import Extractor, find_extractor, register

__all__ = ["Extractor", "IndexedDataset", "find_extractor", "register"]
