"""Operators on the stored factors: influence (self-influence, TracIn), top-k and class aggregates."""

from mstore_lightning.analytics.classes import (
    ClassConflicts,
    ClassGradients,
    class_conflicts,
    class_gradients,
)
from mstore_lightning.analytics.influence import Influence, Neighbours, self_influence, topk, tracin

__all__ = [
    "ClassConflicts",
    "ClassGradients",
    "Influence",
    "Neighbours",
    "class_conflicts",
    "class_gradients",
    "self_influence",
    "topk",
    "tracin",
]
