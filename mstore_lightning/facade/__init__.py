"""The facade users hold: ``open_store`` and ``GradientStore``, composing the store, capture and analytics.

Imports ``store``, ``capture``, ``analytics`` and below; ``reports``, ``callbacks`` and the CLI import it.
"""

from mstore_lightning.facade.describe import describe, explain_decision
from mstore_lightning.facade.gradient_store import GradientStore, QueryResult, open_store

__all__ = ["GradientStore", "QueryResult", "describe", "explain_decision", "open_store"]
