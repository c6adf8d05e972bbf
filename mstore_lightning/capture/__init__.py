"""Capture during training: hooks, layer plans, sample identity, store-or-recompute, the recorder.

Imports ``core``, ``config`` and ``store``; never ``analytics``, the facade, ``reports`` or ``callbacks``.
"""

from mstore_lightning.capture.identity import IndexedDataset
from mstore_lightning.capture.plan import DiskSpaceError
from mstore_lightning.core.families import Extractor, find_extractor, register

__all__ = ["DiskSpaceError", "Extractor", "IndexedDataset", "find_extractor", "register"]
