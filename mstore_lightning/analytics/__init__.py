"""Operators on the stored factors: influence (self-influence, TracIn) and nearest neighbours (top-k)."""

from mstore_lightning.analytics.influence import Influence, Neighbours, self_influence, topk, tracin

__all__ = ["Influence", "Neighbours", "self_influence", "topk", "tracin"]
