"""The recorder on its own: a plain training loop, no Trainer and no Lightning, against torch.func."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from mstore_lightning import CapturePolicy, open_store
from mstore_lightning.capture.recorder import Recorder

LR = 0.1


def mlp(d_in: int = 6, hidden: int = 8, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def batches(n: int, d_in: int, classes: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)
    order = torch.randperm(n, generator=g)  # shuffled: ids, not positions, name the samples
    return [
        {"x": x[i], "y": y[i], "index": i}
        for i in (order[lo : lo + batch_size] for lo in range(0, n, batch_size))
    ]


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch.func gradients of each sample's own cross-entropy loss, by parameter name."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def train(recorder: Recorder, model: nn.Module, data: list[dict], epochs: int) -> dict:
    """A plain SGD loop driving ``recorder``; returns the reference gradients by epoch and sample id."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    recorder.plan(model, max_epochs=epochs)
    recorder.start()
    recorder.open(recorder.run_meta(type(model).__name__), resume=False)
    reference: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    step = 0
    for epoch in range(epochs):
        captured, _ = recorder.captures_epoch(epoch, epochs)
        if captured:
            recorder.begin_epoch(epoch, lr_groups=[[LR]])
        for batch_idx, batch in enumerate(data):
            grads = per_sample_grads(model, batch["x"], batch["y"])
            for row, sid in enumerate(batch["index"].tolist()):
                reference.setdefault(epoch, {})[sid] = {k: v[row] for k, v in grads.items()}
            planned, _ = recorder.plan_step(batch, batch_idx)
            recorder.begin_step(planned)
            opt.zero_grad()
            losses = nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
            losses.mean().backward()
            recorder.record_backward(accumulation=1, global_step=step, lr=LR)
            recorder.end_step(losses.detach(), batch)
            opt.step()
            step += 1
        if captured:
            recorder.finish_epoch(model, global_step=step)
    recorder.detach()
    recorder.close()
    return reference


def assert_restores(path: Path, reference: dict, layers: dict[str, str], n: int) -> None:
    store = open_store(path)
    assert store.epochs == sorted(reference)
    for epoch in store.epochs:
        ids = store.sample_ids(epoch)
        assert sorted(ids.tolist()) == list(range(n))
        for layer, prefix in layers.items():
            got = store.restore(epoch, layer, ids)
            for param in ("weight", "bias"):
                want = torch.stack([reference[epoch][i][f"{prefix}.{param}"] for i in ids.tolist()])
                torch.testing.assert_close(got[param], want, atol=1e-6, rtol=1e-5)


def test_a_plain_loop_stores_each_samples_own_gradient(tmp_path):
    torch.manual_seed(0)
    model, data = mlp(), batches(n=20, d_in=6, classes=3, batch_size=8)  # a last batch of 4
    recorder = Recorder(tmp_path / "s.zarr", CapturePolicy(precision="fp32"))
    reference = train(recorder, model, data, epochs=2)
    assert recorder.committed == [0, 1] and recorder.epoch is None and recorder.writer is None
    assert_restores(tmp_path / "s.zarr", reference, {"0": "0", "2": "2"}, n=20)
    store = open_store(tmp_path / "s.zarr")
    # The row fields came from the loop's plain values: its steps, learning rate, labels and losses.
    ids = store.sample_ids(1)
    assert set(store.row_field(1, "step").tolist()) == {3, 4, 5}
    assert np.all(store.row_field(1, "lr") == LR) and store.lr(1) == LR
    labels = {int(i): int(y) for b in data for i, y in zip(b["index"], b["y"])}
    assert store.row_field(1, "label").tolist() == [labels[i] for i in ids.tolist()]
    assert np.isfinite(store.row_field(1, "loss")).all()
    # Norms kept at capture agree with the reference's.
    want = torch.stack([sum(g.pow(2).sum() for g in reference[1][i].values()) for i in ids.tolist()]).double()
    got = torch.as_tensor(np.asarray(store.norms(1))).double() ** 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_hooks_are_on_the_model_while_capturing_and_gone_after(tmp_path):
    model = mlp()
    recorder = Recorder(tmp_path / "s.zarr", CapturePolicy(precision="fp32"))
    recorder.plan(model, max_epochs=1)
    assert recorder.plans.keys() == {"0", "2"}
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    recorder.detach()
    assert not any(m._forward_hooks for m in model.modules())
    train(recorder, model, batches(n=8, d_in=6, classes=3, batch_size=4), epochs=1)
    assert not any(m._forward_hooks for m in model.modules())


def test_decisions_say_what_is_not_captured_and_why(tmp_path):
    model, data = mlp(), batches(n=16, d_in=6, classes=3, batch_size=4)
    policy = CapturePolicy(precision="fp32", every_n_steps=2, epochs=[1], samples={"ids": [0, 1, 2, 3]})
    recorder = Recorder(tmp_path / "s.zarr", policy)
    recorder.plan(model, max_epochs=2)
    recorder.start()
    recorder.open(recorder.run_meta("MLP"), resume=False)
    assert recorder.captures_epoch(1, 2) == (True, "")
    captured, why = recorder.captures_epoch(0, 2)
    assert not captured and "leave out epoch 0" in why
    assert recorder.plan_step(data[0], 0) == (None, "the epoch is not captured")
    assert recorder.record_backward(1, 0, LR) == (False, "no step is being captured")
    recorder.begin_epoch(1, lr_groups=[[LR]])
    step, why = recorder.plan_step(data[0], 1)
    assert step is None and why == "every_n_steps=2 leaves out batch 1"
    selected = next(b for b in data if set(b["index"].tolist()) & {0, 1, 2, 3})
    unselected = next(b for b in data if not set(b["index"].tolist()) & {0, 1, 2, 3})
    step, why = recorder.plan_step(unselected, 2)
    assert step is None and why == "the policy's samples select none of the batch"
    step, why = recorder.plan_step(selected, 2)
    assert why == "" and step.ids.tolist() == selected["index"].tolist()
    kept = sorted(int(i) for i in selected["index"] if i < 4)
    assert step.ids[step.keep.numpy()].tolist() == [i for i in selected["index"].tolist() if i in kept]
    recorder.begin_step(step)
    nn.functional.cross_entropy(model(selected["x"]), selected["y"]).backward()
    assert recorder.record_backward(1, 2, LR) == (True, "")
    recorder.end_step()
    recorder.finish_epoch(model, global_step=4)
    recorder.detach()
    recorder.close()
    store = open_store(tmp_path / "s.zarr")
    assert store.epochs == [1] and sorted(store.sample_ids(1).tolist()) == kept


def test_a_batch_without_ids_on_a_loader_of_unknown_order_is_refused(tmp_path):
    recorder = Recorder(tmp_path / "s.zarr", CapturePolicy(precision="fp32"))
    recorder.plan(mlp(), max_epochs=1)
    recorder.start()
    recorder.open(recorder.run_meta("MLP"), resume=False)
    recorder.begin_epoch(0, lr_groups=[[LR]], loader=[(torch.zeros(2, 6), torch.zeros(2))])
    with pytest.raises(RuntimeError, match="needs the dataset index of every sample"):
        recorder.plan_step((torch.zeros(2, 6), torch.zeros(2, dtype=torch.long)), 0)
    recorder.detach()
    recorder.close()


@settings(max_examples=6, deadline=None)
@given(
    d_in=st.integers(1, 7),
    hidden=st.integers(1, 9),
    classes=st.integers(2, 5),
    batch_size=st.integers(1, 6),
)
def test_restores_torch_func_gradients_for_any_mlp_shape(d_in, hidden, classes, batch_size):
    torch.manual_seed(1)
    model, data = mlp(d_in, hidden, classes), batches(n=7, d_in=d_in, classes=classes, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        reference = train(Recorder(path, CapturePolicy(precision="fp32")), model, data, epochs=1)
        assert_restores(path, reference, {"0": "0", "2": "2"}, n=7)


def test_the_recorder_imports_no_lightning():
    code = (
        "import sys, mstore_lightning.capture.recorder; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
