"""Layer families, Opacus-style: one small file per family, registered by module type.

Imports torch and ``core`` only: no hooks, no I/O.
"""

from mstore_lightning.core.families.registry import (
    Extractor,
    extractor_for_kind,
    find_extractor,
    register,
    register_duck,
)

__all__ = ["Extractor", "extractor_for_kind", "find_extractor", "register", "register_duck"]
