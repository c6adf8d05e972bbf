"""Raw parameters of batch size 1 broadcast over the batch (class tokens, position tables): captured
at the broadcast, exact against torch.func; any other use is reported, not guessed at."""

from __future__ import annotations

import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from torch import nn

from mstore_lightning import GradientCapture, open_store


class Tokens(nn.Module):
    """A class token prepended by ``expand``, a position table added both ways, a gate multiplied."""

    def __init__(self, gate: bool = False, dim: int = 6, length: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, length + 1, dim) * 0.1)
        self.bias = nn.Parameter(torch.randn(1, 1, dim) * 0.1)  # broadcast over positions too
        self.gate = nn.Parameter(torch.ones(1, 1, dim)) if gate else None
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        h = self.pos + h  # the parameter on the left
        h = torch.add(h, self.bias)
        if self.gate is not None:
            h = h * self.gate  # not a broadcast the capture can split: reported
        return self.head(torch.tanh(h).mean(1))


def test_broadcast_parameters_restore_exactly(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, 3), torch.randint(0, 3, (16,))
    task, ref = Task(Tokens()), Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(task, loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    assert store.uncovered == []
    ids = store.sample_ids(0).tolist()
    for layer in ("net.cls", "net.pos", "net.bias"):
        ((key, got),) = store.restore(0, layer, ids).items()
        want = ref.stacked(0, ids, store.parameters(layer)[key]).reshape(got.shape)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert "forward" not in task.net.__dict__


def test_another_use_of_a_broadcast_parameter_is_reported(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, 3), torch.randint(0, 3, (16,))
    with pytest.warns(UserWarning, match=r"through mul, besides any broadcast"):
        trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(
            Task(Tokens(gate=True)), loader(x, y)
        )
    store = open_store(tmp_path / "s.zarr")
    (u,) = store.uncovered
    assert u["module"] == "net" and u["params"] == ["gate"] and "through mul" in u["reason"]
    assert {"net.cls", "net.pos", "net.bias"} <= set(store.layers)


def test_a_broadcast_parameter_shared_between_modules_is_reported_not_planned():
    from mstore_lightning.capture.layers import select_layers
    from mstore_lightning.config import CapturePolicy

    net = nn.Module()
    net.a, net.b = Tokens(), Tokens()
    net.b.pos = net.a.pos  # one table, used by two modules: its gradient sums both uses
    plans, uncovered = select_layers(net, CapturePolicy())
    # As for any module with a shared parameter, none of the module's own parameters is captured,
    # and none is both planned and reported.
    assert not {n for n in plans if n.split(".")[1] in ("cls", "pos", "bias")}
    shared = {u["module"]: u for u in uncovered if "shared with" in u["reason"]}
    assert set(shared) == {"a", "b"} and all(
        set(u["params"]) == {"cls", "pos", "bias"} for u in shared.values()
    )
