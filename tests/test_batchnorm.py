"""BatchNorm: exact per-sample rows in eval mode; in training mode, rows flagged as batch-coupled."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from test_capture_fit import assert_matches_reference
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.capture.coupling import coupled_layers


def net() -> nn.Module:
    """Conv -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


class FrozenStats(Task):
    """Fine-tuning with BatchNorm in eval mode: its running statistics frozen."""

    def on_train_epoch_start(self) -> None:
        self.net[1].eval()


def images(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


def warmed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics away from their (0, 1) start, so eval mode is a real test."""
    with torch.no_grad():
        model.train()(x)
    return model


def test_batchnorm_in_eval_mode_is_captured_exactly_and_unflagged(tmp_path, recwarn):
    torch.manual_seed(0)
    x, y = images()
    task, ref = FrozenStats(warmed(net(), x)), Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    trainer([ref, cap], max_epochs=2).fit(task, loader(x, y, batch_size=6))
    store = open_store(tmp_path / "s.zarr")
    assert set(store.layers) == {"net.0", "net.1", "net.4"}
    assert store.uncovered == []
    assert all(store.approximate(layer) is None for layer in store.layers)
    assert not [w for w in recwarn if "BatchNorm" in str(w.message)]
    assert_matches_reference(store, ref)


def test_batchnorm_in_training_mode_flags_the_layers_it_couples(tmp_path):
    torch.manual_seed(0)
    x, y = images()
    task, grads = Task(net()), BatchGradients()
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    with pytest.warns(UserWarning, match=r"2 captured layer\(s\) have rows coupled by BatchNorm") as caught:
        trainer([grads, cap], max_epochs=1).fit(task, loader(x, y, batch_size=6))
    assert sum("coupled by BatchNorm" in str(w.message) for w in caught) == 1  # one summary
    store = open_store(tmp_path / "s.zarr")
    # The conv's output gradient passes through net.1; the BatchNorm's own rows use batch statistics;
    # the linear layer after it sees each sample's own output gradient.
    assert store.layer_spec("net.0")["batch_coupled"] == ["net.1"]
    assert store.layer_spec("net.1")["batch_coupled"] == ["net.1"]
    assert "batch_coupled" not in store.layer_spec("net.4")
    for layer in ("net.0", "net.1"):
        assert "batch-coupled" in store.approximate(layer)
    assert store.approximate("net.4") is None
    assert set(store.norms(0).approximate) == {"net.0", "net.1"}
    assert set(store.self_influence().scores.approximate) == {"net.0", "net.1"}
    assert set(store.topk([0], 3, epoch=0).scores.approximate) == {"net.0", "net.1"}
    assert store.self_influence(layers=["net.4"]).scores.approximate == {}
    assert "batch-coupled" in store.describe()
    # Coupled or not, each batch's rows sum to its gradient (a mean loss: B times it).
    for ids, grad in grads.by_batch.items():
        for layer, param in (("net.0", "weight"), ("net.1", "weight"), ("net.4", "weight")):
            rows = store.restore(0, layer, list(ids))[param]
            torch.testing.assert_close(rows.sum(0), len(ids) * grad[f"{layer}.{param}"], rtol=1e-4, atol=1e-5)


class BatchGradients(L.Callback):
    """Each training batch's gradient, by its sample ids."""

    def __init__(self) -> None:
        self.by_batch: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._ids: tuple[int, ...] = ()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._ids = tuple(batch["index"].tolist())

    def on_after_backward(self, trainer, pl_module) -> None:
        self.by_batch[self._ids] = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


def test_coupling_follows_the_graph_not_the_module_order():
    """A layer run after a BatchNorm, on a branch that does not feed it, is not coupled."""
    x = torch.randn(4, 3)
    side, main, bn = nn.Linear(3, 3), nn.Linear(3, 3), nn.BatchNorm1d(3)
    h = main(x)
    y = bn(h)
    s = side(x)
    out = y + s
    assert coupled_layers({"main": [h.grad_fn], "side": [s.grad_fn]}, {"bn": [y.grad_fn]}) == {"main": ["bn"]}
    assert out.grad_fn is not None
    np.testing.assert_equal(len(coupled_layers({}, {"bn": [y.grad_fn]})), 0)
