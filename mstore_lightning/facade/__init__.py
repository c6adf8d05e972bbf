"""The facade users hold: ``open_store`` and ``GradientStore``, composing the store, capture and analytics.

Imports ``store``, ``capture``, ``analytics`` and below; ``reports``, ``callbacks`` and the CLI import it.
"""

from mstore_lightning.store.reader import GradientStore, QueryResult, explain_decision, open_store

__all__ = ["GradientStore", "QueryResult", "explain_decision", "open_store"]
