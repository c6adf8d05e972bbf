"""Training samples as pictures for the reports' image grids: what a dataset item holds, as an array."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def images(
    sample_input: Callable[[int], Any] | None, ids: np.ndarray, shape: Any, key: str | None
) -> list[np.ndarray] | None:
    """The inputs of ``ids`` as images, or ``None`` when they are not images."""
    if sample_input is None or not len(ids):
        return None
    images = []
    for sid in ids:
        item = sample_input(int(sid))
        if isinstance(item, dict) and "index" in item and int(item["index"]) != int(sid):
            return None  # the loader's dataset is not indexed by sample id: no picture beats a wrong one
        x = input_array(item, key)
        if x is None:
            return None
        if shape is not None:
            if x.size != int(np.prod(shape)):
                raise ValueError(f"image_shape {list(shape)} does not fit a sample input of {x.size} values.")
            x = x.reshape(shape)
        elif not (x.ndim == 2 or (x.ndim == 3 and (x.shape[0] in (1, 3) or x.shape[-1] in (1, 3)))):
            return None
        images.append(x)
    return images


def input_array(item: Any, key: str | None) -> np.ndarray | None:
    if isinstance(item, dict):
        if key is not None:
            return as_array(item.get(key))
        for value in item.values():
            arr = as_array(value)
            if arr is not None and arr.dtype.kind == "f":
                return arr
        return None
    if isinstance(item, (tuple, list)) and item:
        return as_array(item[0])
    return as_array(item)


def as_array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    return arr if arr.dtype.kind in "fiu" and arr.ndim >= 1 else None
