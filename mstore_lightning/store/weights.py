"""Model weights kept in the store as plain Zarr arrays (no pickle), for layers that are recomputed."""

from __future__ import annotations

import numpy as np
import torch
import zarr
from torch import nn

from mstore_lightning.store.codecs import compressors

WEIGHTS = "weights"  # group of an epoch holding the end-of-epoch state when layers are recomputed


def save_weights(group: zarr.Group, module: nn.Module) -> None:
    """The module's state as one Zarr array per tensor (floats as float32), under ``group``."""
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        values = (t.float() if t.is_floating_point() else t).numpy()
        group.create_array(name, data=values, compressors=compressors(), overwrite=True)


def load_weights(group: zarr.Group, module: nn.Module) -> None:
    """Loads a state saved by :func:`save_weights` into ``module`` (dtypes follow the module)."""
    state = module.state_dict()
    missing = [k for k in state if k not in group]
    if missing:
        raise ValueError(f"The stored weights lack {missing[:5]}: attach the model the run trained.")
    module.load_state_dict(
        {k: torch.from_numpy(np.asarray(group[k][...])).to(state[k].dtype) for k in state}, strict=True
    )
