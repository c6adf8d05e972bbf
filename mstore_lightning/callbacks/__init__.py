"""Lightning callbacks."""

from mstore_lightning.callbacks.gradient_capture import GradientCapture

__all__ = ["GradientCapture"]
