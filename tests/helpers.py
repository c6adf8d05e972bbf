"""Shared test fixtures: a tiny LightningModule, indexed data, and a torch.func reference."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

# Lossless storage: what tests comparing with torch.func at float32 tolerance capture with.
EXACT = {"precision": "fp32"}


class IndexedTensors(Dataset):
    """Dict items ``{"x", "y", "index"}`` over fixed tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class Task(L.LightningModule):
    """Wraps ``net`` with a per-sample loss reduced by ``reduction``."""

    def __init__(self, net: nn.Module, loss: str = "ce", reduction: str = "mean", lr: float = 0.1) -> None:
        super().__init__()
        self.net, self.loss_kind, self.reduction, self.lr = net, loss, reduction, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def sample_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "ce":
            return nn.functional.cross_entropy(out, y, reduction="none")
        return ((out - y) ** 2).reshape(out.shape[0], -1).sum(1)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        losses = self.sample_losses(self(batch["x"]), batch["y"])
        loss = losses.mean() if self.reduction == "mean" else losses.sum()
        return {"loss": loss, "per_sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def per_sample_grads(task: Task, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients of each sample's own loss, keyed by parameter name."""
    params = {k: v.detach() for k, v in task.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in task.named_buffers()}

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(task, (p, buffers), (xi.unsqueeze(0),))
        return task.sample_losses(out, yi.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="same")(params, x, y)


class Reference(L.Callback):
    """Records torch.func per-sample gradients of every training batch at the weights it is trained on."""

    def __init__(self, toggle: Callable[[Task, bool], None] | None = None) -> None:
        self.grads: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)
        # Switches the model to the same function without what torch.func cannot trace (checkpointing).
        self.toggle = toggle

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Task, batch: dict, batch_idx: int) -> None:
        if self.toggle is not None:
            self.toggle(pl_module, False)
        try:
            g = per_sample_grads(pl_module, batch["x"], batch["y"])
        finally:
            if self.toggle is not None:
                self.toggle(pl_module, True)
        for row, sid in enumerate(batch["index"].tolist()):
            self.grads[trainer.current_epoch][sid] = {k: v[row].clone() for k, v in g.items()}

    def stacked(self, epoch: int, ids: list[int], param: str) -> torch.Tensor:
        return torch.stack([self.grads[epoch][i][param] for i in ids])


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8, shuffle: bool = True, workers: int = 0) -> DataLoader:
    return DataLoader(
        IndexedTensors(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def trainer(callbacks: list, **kw: Any) -> L.Trainer:
    opts = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return L.Trainer(callbacks=callbacks, **opts)


def manifest_files(root: Any) -> dict[str, dict[str, int]]:
    """``{group path: {chunk key below it: crc32c(store key, then bytes)}}`` computed from the files
    of a local store's committed epochs, independently of the library: what each manifest must say
    (the digest leaves out each chunk's own trailing crc32c)."""
    import json
    from pathlib import Path

    import crc32c

    root, out = Path(root), {}
    for epoch in sorted(p for p in (root / "epochs").iterdir() if p.is_dir()):
        if json.loads((epoch / "zarr.json").read_text())["attributes"].get("state") != "committed":
            continue
        for group in sorted(p for p in epoch.iterdir() if p.is_dir()):
            files = sorted(f for f in group.rglob("*") if f.is_file() and f.name != "zarr.json")
            out[group.relative_to(root).as_posix()] = {
                f.relative_to(group).as_posix(): crc32c.crc32c(
                    f.read_bytes()[:-4], crc32c.crc32c(f.relative_to(root).as_posix().encode())
                )
                for f in files
            }
    return out


def stored_manifests(root: Any) -> dict[str, dict[str, int]]:
    """``{group path: its manifest attribute}`` of the committed epochs' groups of a local store."""
    import json
    from pathlib import Path

    root = Path(root)
    return {
        path: json.loads((root / path / "zarr.json").read_text())["attributes"].get("manifest")
        for path in manifest_files(root)
    }


def reseal(root: Any, key: str) -> None:
    """Lists chunk ``key`` of a local store in its group's manifest as it now is, as a faulty writer
    that stored those bytes would have: damage the manifest cannot see, left for other checks."""
    import json
    from pathlib import Path

    root = Path(root)
    group = "/".join(key.split("/")[:3])
    meta_path = root / group / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["manifest"][key[len(group) + 1 :]] = manifest_files(root)[group][key[len(group) + 1 :]]
    meta_path.write_text(json.dumps(meta))
