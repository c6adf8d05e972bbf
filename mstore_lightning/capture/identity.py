"""Sample identity and labels from a training batch.

A dict batch with an ``"index"`` entry (global dataset indices) is recognised as is; anything else
needs ``sample_ids=callable``. Without ids, rows can be numbered by position only when the loader
visits the dataset in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

from mstore_lightning.core.transfer import DeviceCopies, HostCopy

COPIES = DeviceCopies()  # the side streams that bring ids and labels back from CUDA

LABEL_KEYS = ("label", "labels", "target", "targets", "y")

MISSING_IDS = (
    "GradientCapture needs the dataset index of every sample, and the training batches carry none{why}. "
    "Return batches as dicts with an 'index' entry holding each sample's dataset index (for example by "
    "wrapping the dataset in mstore_lightning.IndexedDataset), or pass "
    "GradientCapture(sample_ids=lambda batch: ...) returning them."
)


def batch_ids(batch: Any, fn: Callable[[Any], Any] | None) -> np.ndarray | HostCopy | None:
    """The batch's sample ids as int64, or ``None`` when the batch does not carry them.

    Ids on CUDA come back as a :class:`~mstore_lightning.core.transfer.HostCopy` in flight: reading
    them back would make the step wait for the device.
    """
    if fn is not None:
        ids = fn(batch)
        if ids is None:
            raise ValueError(
                "`sample_ids` returned None for a training batch; it must return the batch's ids."
            )
    elif isinstance(batch, Mapping) and "index" in batch:
        ids = batch["index"]
    else:
        return None
    if isinstance(ids, torch.Tensor) and ids.is_cuda:
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"Sample ids must be a 1-D integer sequence, got {ids.dtype} of shape {tuple(ids.shape)}."
            )
        return HostCopy(ids.detach().long(), COPIES)
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Sample ids must be a 1-D integer sequence, got {ids.dtype} of shape {ids.shape}.")
    return ids.astype(np.int64, copy=False)


def batch_labels(batch: Any, n: int, fn: Callable[[Any], Any] | None) -> np.ndarray | HostCopy | None:
    """Integer class labels of the batch when they can be found, else ``None`` (on CUDA: in flight,
    as ids are)."""
    if fn is not None:
        lab = fn(batch)
    elif isinstance(batch, Mapping):
        lab = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        lab = batch[1]
    else:
        lab = None
    if isinstance(lab, torch.Tensor) and lab.ndim == 1 and lab.shape[0] == n and not lab.is_floating_point():
        if lab.is_cuda:
            return HostCopy(lab.detach().long(), COPIES)
        return lab.detach().cpu().numpy().astype(np.int64)
    if (
        isinstance(lab, np.ndarray)
        and lab.ndim == 1
        and lab.shape[0] == n
        and np.issubdtype(lab.dtype, np.integer)
    ):
        return lab.astype(np.int64)
    return None


def positional_batch_size(loader: Any) -> int | None:
    """The batch size when positions in the loader are dataset indices, else ``None``."""
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler) and loader.batch_size:
        return int(loader.batch_size)
    return None


def describe_sampler(loader: Any) -> str:
    if isinstance(loader, DataLoader):
        return f" and the loader's sampler is {type(loader.sampler).__name__}"
    return f" and the training data is a {type(loader).__name__}"


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that each item is a dict carrying its index.

    Tuple items become ``{"x": item[0], "y": item[1], "index": i}``; dict items gain ``"index"``.

    Example:
        >>> ds = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.zeros(3)))
        >>> sorted(ds[1])
        ['index', 'x', 'y']
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            return {**item, "index": i}
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return {"x": item[0], "y": item[1], "index": i}
        return {"x": item, "index": i}


def batch_size(batch: Any) -> int:
    """The leading size of a tensor batch, or of its first tensor; ``-1`` when it has none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return first.shape[0] if first is not None else -1
    return -1
