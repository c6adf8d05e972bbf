"""Store or recompute (MISTIQUE's cost model): keep a layer's rows, or the weights to recompute them.

For each layer, after the first captured epoch, the capture measures on this machine

- ``t_read``: seconds to read and decode one sample's stored rows of the layer;
- ``t_recompute``: seconds of one sample's forward and backward pass (eval mode), which recomputes
  every layer's rows at once;
- ``bytes``: the layer's bytes on disk per sample,

and keeps storing the layer while ``γ = (t_recompute − t_read) · expected_queries / GB`` is at least
the policy's ``threshold_s_per_gb``: the seconds that storing saves the expected queries, per GB it
costs. Otherwise later epochs store the model's weights (as Zarr arrays, no pickle) instead of the
layer's rows, and reads recompute the rows from those weights and the training data
(:meth:`GradientStore.attach_recompute`).

Recomputed rows are exact for the *end-of-epoch* weights, in eval mode. Captured rows use the
weights of their own step, in train mode, so the two agree only where the weights did not move.

Example:
    >>> round(gamma(t_recompute=2e-3, t_read=1e-4, queries=10, nbytes=2048), 1)
    9277.3
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import default_collate

from mstore_lightning.capture.hooks import HookManager
from mstore_lightning.capture.layers import LayerPlan
from mstore_lightning.capture.scaling import grad_multiplier
from mstore_lightning.core import quant, tensor_codes
from mstore_lightning.core.errors import StoreReadError
from mstore_lightning.core.representation import Representation
from mstore_lightning.store import layout
from mstore_lightning.store.catalog import Catalog
from mstore_lightning.store.chunks import Chunk
from mstore_lightning.store.scan import RECOMPUTED, Block, RowSource
from mstore_lightning.store.weights import WEIGHTS, load_weights


def gamma(t_recompute: float, t_read: float, queries: int, nbytes: float) -> float:
    """Seconds saved per GB stored: ``(t_recompute − t_read) · queries / (bytes / 1e9)``."""
    return (t_recompute - t_read) * queries / max(nbytes / 1e9, 1e-12)


def batch_loss(
    module: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Any] | None
) -> torch.Tensor:
    """The batch loss: ``loss_fn(module, batch)``, else ``training_step``'s tensor or its ``"loss"``.

    ``training_step`` runs with ``self.log`` silenced: this pass is not a training step, and Lightning
    refuses step-level logging outside one.
    """
    if loss_fn is not None:
        out = loss_fn(module, batch)
    else:
        module.log = module.log_dict = _no_log  # instance attributes shadow the methods ...
        try:
            out = module.training_step(batch, 0)
        finally:
            del module.log, module.log_dict  # ... and are removed, leaving the module as it was
    loss = out["loss"] if isinstance(out, dict) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "Recomputing needs the batch loss as a scalar tensor: training_step must return it (or a dict "
            "with 'loss'), or pass loss_fn=callable(module, batch) -> loss."
        )
    return loss


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


class Recomputer:
    """Recomputes per-sample rows of planned layers from a model's current weights and the data.

    Args:
        module: the model (a LightningModule or any module whose ``loss_fn`` gives the batch loss).
        dataset: indexable by sample id; items are collated with ``collate_fn``.
        plans: the layers to recompute, by name, as the store describes them.
        loss_reduction: how the loss reduces per-sample losses (``"mean"`` or ``"sum"``).
        collate_fn: builds a batch from items; ``torch.utils.data.default_collate`` by default.
        loss_fn: ``callable(module, batch) -> loss``; by default ``training_step(batch, 0)``.
        batch_size: samples per recompute pass.
    """

    def __init__(
        self,
        module: nn.Module,
        dataset: Any,
        plans: dict[str, LayerPlan],
        loss_reduction: str,
        collate_fn: Callable[[list], Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.module, self.dataset, self.plans = module, dataset, plans
        self.loss_reduction = loss_reduction
        self.collate_fn = collate_fn or default_collate
        self.loss_fn = loss_fn
        self.batch_size = batch_size

    def rows(self, ids: Sequence[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Rows of every planned layer for samples ``ids``, in the stored representation (float)."""
        ids = [int(i) for i in ids]
        parts: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in self.plans}
        for lo in range(0, len(ids), self.batch_size):
            part = ids[lo : lo + self.batch_size]
            batch = self.collate_fn([self.dataset[i] for i in part])
            for name, rows in self._batch_rows(batch, len(part)).items():
                parts[name].append(rows)
        return {n: {k: torch.cat([p[k] for p in ps]) for k in ps[0]} for n, ps in parts.items() if ps}

    def _batch_rows(self, batch: Any, rows: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
        hooks = HookManager()
        hooks.attach(self.plans)
        hooks.batch_rows = rows
        was_training = self.module.training
        self.module.eval()
        try:
            hooks.active = True
            with torch.enable_grad():
                loss = batch_loss(self.module, batch, self.loss_fn)
                params = [
                    p for plan in self.plans.values() for p in plan.module.parameters() if p.requires_grad
                ]
                torch.autograd.grad(loss, params, allow_unused=True)  # fires the hooks; no .grad is touched
            uses = hooks.take()
        finally:
            hooks.detach()
            self.module.train(was_training)
        out = {}
        for name, plan in self.plans.items():
            if not uses[name]:
                raise RuntimeError(f"Recomputing {name!r}: the layer got no output gradient from this loss.")
            n = uses[name][0][1].shape[0]
            out[name] = {
                k: v.detach().cpu()
                for k, v in plan.rows(uses[name], grad_multiplier(self.loss_reduction, n)).items()
            }
        return out

    def seconds_per_sample(self, batch: Any, repeats: int = 2) -> float:
        """Measured seconds of one sample's recompute pass on ``batch`` (the last of ``repeats``)."""
        n = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows = self._batch_rows(batch)
            elapsed = time.perf_counter() - t0
            n = next(iter(next(iter(rows.values())).values())).shape[0]
        return elapsed / max(1, n)


def read_seconds_per_sample(group: zarr.Group, spec: dict[str, Any], max_rows: int = 4096) -> float:
    """Measured seconds to read and decode one sample's rows of a layer from ``group``."""
    stored = [s for s in quant.stored_arrays(spec["arrays"]) if s.role != "ref"]
    rows = min(group[stored[0].name].shape[0], max_rows)
    if rows == 0:
        return 0.0
    t0 = time.perf_counter()
    for name, arr_spec in spec["arrays"].items():
        parts = {}
        for s in stored:
            if s.owner != name or s.role != "part":
                continue
            values = group[s.name][:rows]
            codec = quant.chunk_codec(arr_spec, name, s.name)
            if codec is not None:
                tables = group[s.name + quant.TABLE][:]
                values = codec.decode(values, tables[np.arange(rows) // int(group[s.name].chunks[0])])
            parts[s.name] = values
        tensor_codes.decode(arr_spec, name, parts)
    return (time.perf_counter() - t0) / rows


def layer_nbytes(group: zarr.Group) -> int:
    """Bytes on disk of every array in a layer's group."""
    return int(sum(arr.nbytes_stored() for _, arr in group.arrays()))


class Recompute:
    """Makes the row sources of layers an epoch stored as weights: the store's scan calls it
    (``Scan.recompute``) for each such layer, and it recomputes the rows from the epoch's weights.

    Its arguments are those of ``GradientStore.attach_recompute``, which makes one; the model is
    copied, and the copy gets each epoch's stored weights.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        collate_fn: Callable[[list], Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model = copy.deepcopy(model)
        self.dataset, self.collate_fn, self.loss_fn, self.batch_size = (
            dataset,
            collate_fn,
            loss_fn,
            batch_size,
        )
        self.loaded: int | None = None  # the epoch whose weights the copy holds

    def __call__(self, catalog: Catalog, rep: Representation, epoch: int) -> RecomputedRows:
        return RecomputedRows(self, catalog, rep, epoch)

    def rows(
        self, catalog: Catalog, rep: Representation, epoch: int, ids: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """Rows of ``rep``'s layer for samples ``ids``, from ``epoch``'s weights."""
        if self.loaded != epoch:
            load_weights(catalog.root[f"{layout.EPOCHS}/{layout.epoch_key(epoch)}/{WEIGHTS}"], self.model)
            self.loaded = epoch
        try:
            plan = LayerPlan.from_spec(
                catalog.meta["layers"][rep.name], dict(self.model.named_modules()), rep.extractor
            )
        except KeyError:
            raise StoreReadError(
                f"The attached model has no module {rep.name!r}; attach the trained architecture."
            ) from None
        recomputer = Recomputer(
            self.model,
            self.dataset,
            {rep.name: plan},
            catalog.meta.get("loss_reduction", "mean"),
            collate_fn=self.collate_fn,
            loss_fn=self.loss_fn,
            batch_size=self.batch_size,
        )
        return recomputer.rows(ids)[rep.name]


class RecomputedRows(RowSource):
    """A layer's training rows of one epoch, recomputed from the epoch's weights in blocks."""

    BLOCK = 1024  # rows recomputed at once

    def __init__(self, recompute: Recompute, catalog: Catalog, rep: Representation, epoch: int) -> None:
        super().__init__(rep, epoch, "train")
        self.recompute, self.catalog = recompute, catalog

    def __len__(self) -> int:
        return self.catalog.row_count(self.epoch)

    def _ids(self) -> np.ndarray:
        return self.catalog.row_field(self.epoch, "ids")

    def blocks(self, start: int = 0, stop: int | None = None, codes: bool = False) -> Iterator[Block]:
        stop = len(self) if stop is None else stop
        for first in range(start - start % self.BLOCK, stop, self.BLOCK):
            ids = self._ids()[first : first + self.BLOCK]
            # Recomputed here, on the scanning thread: the model's hooks must not run on two threads.
            yield Block(first, len(ids), functools.partial(dict, self._rows(ids)))

    def gather(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self._rows(self._ids()[np.asarray(rows, dtype=np.int64)])

    def _rows(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        return dict(self.recompute.rows(self.catalog, self.rep, self.epoch, ids))

    @property
    def approximate(self) -> str | None:
        return "; ".join(w for w in (self.rep.approximate, RECOMPUTED) if w)

    def chunks(self) -> list[Chunk]:
        return [Chunk(0, lo, min(lo + self.BLOCK, len(self)), lo) for lo in range(0, len(self), self.BLOCK)]

    def read_chunk(self, chunk: Chunk) -> dict[str, torch.Tensor]:
        return self._rows(self._ids()[chunk.first : chunk.first + chunk.hi - chunk.lo])
