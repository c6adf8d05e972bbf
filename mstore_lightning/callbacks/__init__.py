"""Lightning callbacks."""

from mstore_lightning.callbacks.gradient_capture import GradientCapture, StoreWriteError

__all__ = ["GradientCapture", "StoreWriteError"]
