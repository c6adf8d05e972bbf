"""The facade users hold: ``open_store`` and ``GradientStore``, composing the store, capture and analytics;
``StoreInfo``, what a store holds, from its metadata alone.

Imports ``store``, ``capture``, ``analytics`` and below; ``reports``, ``callbacks`` and the CLI import it.
Names are imported on first use, so that ``facade.info`` loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mstore_lightning.core.lazy import lazy_names

_LAZY = {
    "describe": "mstore_lightning.facade.describe",
    "explain_decision": "mstore_lightning.facade.describe",
    "StoreInfo": "mstore_lightning.facade.info",
    "GradientStore": "mstore_lightning.facade.gradient_store",
    "QueryResult": "mstore_lightning.facade.gradient_store",
    "open_store": "mstore_lightning.facade.gradient_store",
}

if TYPE_CHECKING:
    from mstore_lightning.facade.describe import describe, explain_decision
    from mstore_lightning.facade.gradient_store import GradientStore, QueryResult, open_store
    from mstore_lightning.facade.info import StoreInfo

__all__ = ["GradientStore", "QueryResult", "StoreInfo", "describe", "explain_decision", "open_store"]


__getattr__ = lazy_names(__name__, _LAZY)
