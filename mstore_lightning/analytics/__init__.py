"""Operators on the stored form: norms and inner products, influence, top-k, class aggregates,
cosine, outliers, clustering; each streams through the public scan (``store.scan``).

Imports ``core``, ``config`` and ``store`` only; never ``capture``, the facade, ``reports`` or ``callbacks``."""

from mstore_lightning.analytics.classes import (
    ClassConflicts,
    ClassGradients,
    class_conflicts,
    class_gradients,
)
from mstore_lightning.analytics.geometry import Clusters, Outliers, cluster, cosine, outliers, sketches
from mstore_lightning.analytics.influence import Influence, Neighbours, self_influence, topk, tracin
from mstore_lightning.analytics.suspects import Suspects, suspects

__all__ = [
    "ClassConflicts",
    "ClassGradients",
    "Clusters",
    "Influence",
    "Neighbours",
    "Outliers",
    "Suspects",
    "class_conflicts",
    "class_gradients",
    "cluster",
    "cosine",
    "outliers",
    "self_influence",
    "sketches",
    "suspects",
    "topk",
    "tracin",
]
