"""``nn.LSTM`` and ``nn.GRU`` captured exactly: every weight's per-sample gradient equals a per-sample
backward loop's (torch.func's vmap cannot run their fused kernels), through ``Trainer.fit``."""

from __future__ import annotations

from collections import defaultdict

import hypothesis.strategies as st
import lightning as L
import pytest
import torch
from helpers import EXACT, Task, loader, trainer
from hypothesis import HealthCheck, example, given, settings
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.capture.layers import select_layers
from mstore_lightning.config import CapturePolicy

RTOL = 1e-4

configs = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["LSTM", "GRU"]),
        "layers": st.integers(1, 2),
        "bidirectional": st.booleans(),
        "batch_first": st.booleans(),
        "bias": st.booleans(),
        "initial_state": st.booleans(),
        "reads": st.sampled_from(["out", "state", "both"]),
        "steps": st.integers(1, 6),
    }
)


class Recurrent(nn.Module):
    def __init__(self, cfg: dict, features: int = 3, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(features, 4)
        self.rnn = getattr(nn, cfg["kind"])(
            4,
            hidden,
            cfg["layers"],
            bias=cfg["bias"],
            batch_first=cfg["batch_first"],
            bidirectional=cfg["bidirectional"],
        )
        dirs = 2 if cfg["bidirectional"] else 1
        self.h0 = nn.Linear(features, cfg["layers"] * dirs * hidden)  # a per-sample initial state
        self.head = nn.Linear(hidden * dirs + hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, h = self.cfg, self.inp(x)
        if not cfg["batch_first"]:
            h = h.transpose(0, 1)
        args = (h,)
        if cfg["initial_state"]:
            h0 = self.h0(x[:, 0]).reshape(x.shape[0], -1, self.rnn.hidden_size).transpose(0, 1).contiguous()
            args = (h, (h0, torch.zeros_like(h0)) if cfg["kind"] == "LSTM" else h0)
        out, state = self.rnn(*args)
        h_n = state[0] if isinstance(state, tuple) else state
        last = out[:, -1] if cfg["batch_first"] else out[-1]
        if cfg["reads"] == "out":
            return self.head(torch.cat([last, last[:, : self.rnn.hidden_size] * 0], -1))
        if cfg["reads"] == "state":
            return self.head(torch.cat([torch.zeros_like(last), h_n[-1]], -1))
        return self.head(torch.cat([last, h_n[-1]], -1))


class LoopReference(L.Callback):
    """Per-sample gradients of every training batch by one backward pass per sample."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Task, batch: dict, batch_idx: int) -> None:
        params = {k: v for k, v in pl_module.named_parameters() if v.requires_grad}
        for row, sid in enumerate(batch["index"].tolist()):
            out = pl_module(batch["x"][row : row + 1])
            loss = pl_module.sample_losses(out, batch["y"][row : row + 1]).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            self.grads[trainer.current_epoch][sid] = {
                k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(params, grads)
            }

    def stacked(self, epoch: int, ids: list[int], param: str) -> torch.Tensor:
        return torch.stack([self.grads[epoch][i][param] for i in ids])


BASE = {
    "kind": "LSTM",
    "layers": 2,
    "bidirectional": True,
    "batch_first": False,
    "bias": True,
    "initial_state": True,
    "reads": "both",
    "steps": 5,
}


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cfg=configs)
@example(cfg=BASE)
@example(cfg={**BASE, "kind": "GRU", "batch_first": True})
def test_recurrent_weights_restore_exactly_through_fit(tmp_path_factory, cfg):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, cfg["steps"], 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    task, ref = Task(Recurrent(cfg)), LoopReference()
    path = tmp_path_factory.mktemp("rnn") / "s.zarr"
    trainer([ref, GradientCapture(path, policy=EXACT)]).fit(task, loader(x, y, batch_size=4))
    store = open_store(path)
    assert store.uncovered == []
    ids = store.sample_ids(0).tolist()
    seen = set()
    for layer in store.layers:
        names = store.parameters(layer)
        for key, got in store.restore(0, layer, ids).items():
            seen.add(names[key])
            want = ref.stacked(0, ids, names[key])
            err, scale = (got - want).flatten(1).norm(dim=1), want.flatten(1).norm(dim=1)
            assert (err <= RTOL * scale + 1e-7).all(), (
                names[key],
                (err / scale.clamp_min(1e-12)).max().item(),
            )
    assert {n for n in seen if ".rnn." in n} == {f"net.rnn.{n}" for n, _ in task.net.rnn.named_parameters()}
    assert not task.net.rnn._forward_hooks


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: nn.LSTM(4, 5, 2, dropout=0.5), "dropout between recurrent layers"),
        (lambda: nn.LSTM(4, 5, proj_size=3), "proj_size"),
    ],
)
def test_what_a_re_run_cannot_reproduce_is_reported(make, reason):
    model = nn.Sequential(make())
    plans, uncovered = select_layers(model, CapturePolicy())
    assert plans == {}
    (u,) = uncovered
    assert reason in u["reason"] and u["numel"] == sum(p.numel() for p in model.parameters())


def test_a_packed_sequence_stops_with_the_fix(tmp_path):
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lengths = torch.full((x.shape[0],), x.shape[1])
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
            return self.head(self.rnn(packed)[1][-1])

    x, y = torch.randn(8, 4, 3), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match="padded, batched tensors.*pad_packed_sequence"):
        trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(Task(Packed()), loader(x, y))
