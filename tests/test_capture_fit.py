"""Capture through a real ``Trainer.fit``, checked against torch.func per-sample gradients."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import zarr
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, PolicyError, open_store
from mstore_lightning.store import layout
from test_extractors import Conv1D


def assert_matches_reference(
    store,
    ref,
    atol=1e-5,
    rtol=1e-4,
):
    """restore, norms and dot of every committed epoch equal the torch.func reference."""
    assert store.epochs
    for epoch in store.epochs:
        ids = store.sample_ids(epoch).tolist()
        names = []
        for layer in store.layers:
            for p, g in store.restore(epoch, layer, ids).items():
                name = f"{layer}.{p}"
                names.append(name)
                torch.testing.assert_close(g.float(), ref.stacked(epoch, ids, name), atol=atol, rtol=rtol)
        flat = torch.cat([ref.stacked(epoch, ids, n).flatten(1) for n in names], 1).double()
        np.testing.assert_allclose(store.norms(epoch), flat.norm(dim=1).numpy(), rtol=rtol * 10, atol=atol)
        q = ids[: min(4, len(ids))]
        np.testing.assert_allclose(
            store.dot(epoch, q, ids), (flat[: len(q)] @ flat.T).numpy(), rtol=rtol * 10, atol=atol
        )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data(n=30, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_reduction_with_shuffling_workers(tmp_path, reduction):
    torch.manual_seed(0)
    x, y = data()
    task, ref = Task(mlp(), reduction=reduction), Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "loss_reduction": reduction})
    trainer([ref, cap], max_epochs=2).fit(task, loader(x, y, batch_size=7, shuffle=True, workers=2))
    store = open_store(tmp_path / "s.zarr")
    assert store.epochs == [0, 1]
    for e in store.epochs:
        assert sorted(store.sample_ids(e).tolist()) == list(range(30))
        np.testing.assert_array_equal(store.row_field(e, "label"), y[store.sample_ids(e)].numpy())
    assert_matches_reference(store, ref)


def test_gradient_accumulation_captures_every_micro_batch(tmp_path):
    torch.manual_seed(0)
    x, y = data()
    task, ref = Task(mlp()), Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    trainer([ref, cap], max_epochs=1, accumulate_grad_batches=3).fit(task, loader(x, y, batch_size=4))
    store = open_store(tmp_path / "s.zarr")
    assert sorted(store.sample_ids(0).tolist()) == list(range(30))
    # 8 micro-batches, 3 per optimizer step: steps 0,0,0,1,1,1,2,2 (Lightning counts optimizer steps).
    steps = store.row_field(0, "step")
    assert sorted(set(steps.tolist())) == [0, 1, 2]
    assert_matches_reference(store, ref)


class Zoo(nn.Module):
    """Every extractor family in one model, with a layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding="same", groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 4, 2, stride=2, dilation=1)
        self.ln = nn.LayerNorm(4)
        self.emb = nn.Embedding(50, 4, padding_idx=0)
        self.gpt = Conv1D(4, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img, tok = x[:, :32].reshape(-1, 2, 4, 4), x[:, 32:].long()
        h = torch.relu(self.gn(self.conv(img)))  # (B, 4, 4, 4)
        h = self.conv1d(h.flatten(2)).transpose(1, 2)  # (B, 8, 4)
        h = self.ln(h) + self.emb(tok)[:, :8]
        h = torch.tanh(self.gpt(h))
        h = self.shared(torch.relu(self.shared(h)))  # two calls: their gradients add up
        return self.head(h.mean(1))


def zoo_data(n=12):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(n, 32, generator=g), torch.randint(0, 50, (n, 8), generator=g).float()], 1)
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("norms", ["all", "cheap"])
def test_norms_of_every_family_are_kept_at_capture(tmp_path, norms):
    """``norms="all"`` keeps every layer's squared norms, positions and uses included, equal to
    torch.func's; ``"cheap"`` keeps only those that cost nothing, and readers compute the rest."""
    torch.manual_seed(0)
    x, y = zoo_data()
    ref = Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "norms": norms})
    trainer([ref, cap], max_epochs=1).fit(Task(Zoo()), loader(x, y, batch_size=5))
    store = open_store(tmp_path / "s.zarr")
    e = store.epochs[-1]
    rank = zarr.open_group(tmp_path / "s.zarr", mode="r")[
        f"{layout.EPOCHS}/{layout.epoch_key(e)}/{layout.rank_key(0)}"
    ]
    kept = set(rank.attrs["sqnorms"]["layers"])
    if norms == "all":
        assert kept == set(store.layers)
    else:  # full gradients, and the head: factors with one position a sample
        full = {n for n in store.layers if store.layer_spec(n)["representation"] == "full"}
        assert kept == full | {"net.head"} and kept != set(store.layers)
    ids = store.sample_ids(e).tolist()
    for layer in store.layers:
        exact = [
            sum(float(g.pow(2).sum()) for k, g in ref.grads[e][i].items() if k.rsplit(".", 1)[0] == layer)
            for i in ids
        ]
        np.testing.assert_allclose(
            np.asarray(store.norms(e, layers=[layer])) ** 2, exact, rtol=1e-4, atol=1e-10
        )
    assert (store.catalog.captured_sqnorms(e, store.layers) is not None) == (norms == "all")


def test_every_layer_family_in_one_fit(tmp_path):
    torch.manual_seed(0)
    x, y = zoo_data()
    task, ref = Task(Zoo()), Reference()
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    trainer([ref, cap], max_epochs=2).fit(task, loader(x, y, batch_size=5))
    store = open_store(tmp_path / "s.zarr")
    assert set(store.layers) == {
        "net.conv",
        "net.gn",
        "net.conv1d",
        "net.ln",
        "net.emb",
        "net.gpt",
        "net.shared",
        "net.head",
    }
    assert store.layer_spec("net.shared")["uses"] == 2
    assert store.layer_spec("net.gn")["representation"] == "full"
    assert store.layer_spec("net.emb")["arrays"]["a"]["dtype"] == "int64"
    assert not store.uncovered
    assert_matches_reference(store, ref)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.enabled = True  # the torch.func reference runs the same block without checkpointing
        self.block = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.head(self.block(x))
        if self.reentrant:
            x = x.requires_grad_()  # the reentrant variant needs an input that requires grad
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_does_not_double_capture(tmp_path, reentrant):
    torch.manual_seed(0)
    x, y = data()
    task, ref = Task(Checkpointed(reentrant)), Reference(toggle=lambda t, on: setattr(t.net, "enabled", on))
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(task, loader(x, y, batch_size=8))
    store = open_store(tmp_path / "s.zarr")
    assert all(store.layer_spec(n)["uses"] == 1 for n in store.layers)
    assert set(store.layers) == {"net.block.0", "net.block.2", "net.head"}
    assert_matches_reference(store, ref)


def test_bf16_autocast_is_close_to_fp32_reference(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=24)
    task, ref = Task(mlp()), Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)], precision="bf16-mixed").fit(
        task, loader(x, y)
    )
    store = open_store(tmp_path / "s.zarr")
    ids = store.sample_ids(0).tolist()
    for layer in store.layers:
        g = store.restore(0, layer, ids)["weight"].flatten(1)
        r = ref.stacked(0, ids, f"{layer}.weight").flatten(1)
        cos = nn.functional.cosine_similarity(g, r, dim=1)
        assert cos.min() > 0.98, cos.min()
        assert ((g.norm(dim=1) / r.norm(dim=1)) - 1).abs().max() < 0.05


def test_grad_scaler_scale_is_divided_out(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=24)
    task, ref = Task(mlp()), Reference()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)], plugins=[amp]).fit(task, loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    ids = store.sample_ids(0).tolist()
    g = torch.cat([store.restore(0, n, ids)["weight"].flatten(1) for n in store.layers], 1)
    r = torch.cat([ref.stacked(0, ids, f"{n}.weight").flatten(1) for n in store.layers], 1)
    ratio = g.norm(dim=1) / r.norm(dim=1)
    assert (ratio - 1).abs().max() < 0.02, ratio  # unscaled it would be 4096


@pytest.mark.parametrize(("precision", "tol"), [("fp16", 2e-3), ("bf16", 1.6e-2)])
def test_reduced_precision_restores_within_its_rounding(tmp_path, precision, tol):
    torch.manual_seed(0)
    x, y = data()
    task, ref = Task(mlp()), Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "precision": precision})]).fit(
        task, loader(x, y)
    )
    store = open_store(tmp_path / "s.zarr")
    assert (
        store.layer_spec("net.0")["arrays"]["a"]["encoding"]
        == {"fp16": "float16", "bf16": "bfloat16-bits"}[precision]
    )
    ids = store.sample_ids(0).tolist()
    for layer in store.layers:
        g = store.restore(0, layer, ids)["weight"]
        r = ref.stacked(0, ids, f"{layer}.weight")
        # Each factor is rounded once (relative error <= 2^-11 or 2^-8); their product at most twice that.
        assert ((g - r).norm() / r.norm()) < tol


def test_sample_fraction_and_id_set(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=40)
    task, ref = Task(mlp()), Reference()
    cap = GradientCapture(tmp_path / "f.zarr", policy={**EXACT, "samples": 0.5, "sample_seed": 3})
    trainer([ref, cap], max_epochs=2).fit(task, loader(x, y, batch_size=6))
    store = open_store(tmp_path / "f.zarr")
    kept = np.nonzero(cap.policy.sample_mask(np.arange(40)))[0]
    assert 10 < len(kept) < 30
    for e in store.epochs:
        assert sorted(store.sample_ids(e).tolist()) == kept.tolist()
    assert_matches_reference(store, ref)

    cap = GradientCapture(tmp_path / "i.zarr", policy={**EXACT, "samples": {"ids": [0, 7, 39, 99]}})
    trainer([cap]).fit(Task(mlp()), loader(x, y, batch_size=6))
    assert sorted(open_store(tmp_path / "i.zarr").sample_ids(0).tolist()) == [0, 7, 39]


def test_epoch_and_step_policy(tmp_path):
    x, y = data(n=40)
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "epochs": {"every": 2}, "every_n_steps": 2})
    trainer([cap], max_epochs=4).fit(Task(mlp()), loader(x, y, batch_size=10, shuffle=False))
    store = open_store(tmp_path / "s.zarr")
    assert store.epochs == [0, 2]
    # batches 0 and 2 of each epoch: 4 batches per epoch, global steps 0..3 then 8..11
    assert sorted(set(store.row_field(0, "step").tolist())) == [0, 2]
    assert sorted(set(store.row_field(2, "step").tolist())) == [8, 10]
    assert len(store.sample_ids(2)) == 20

    cap = GradientCapture(tmp_path / "last.zarr", policy={**EXACT, "epochs": "last"})
    trainer([cap], max_epochs=3).fit(Task(mlp()), loader(x, y, batch_size=10))
    assert open_store(tmp_path / "last.zarr").epochs == [2]


def test_positional_ids_for_an_unshuffled_loader_without_ids(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=20)

    class Plain(Task):
        def training_step(self, batch, batch_idx):
            return self.sample_losses(self(batch[0]), batch[1]).mean()

    ds = torch.utils.data.TensorDataset(x, y)
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    task = Plain(mlp())
    trainer([cap]).fit(task, torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False))
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.sample_ids(0), np.arange(20))
    np.testing.assert_array_equal(store.row_field(0, "label"), y.numpy())  # labels from (x, y) batches


def test_refuses_shuffled_batches_without_ids(tmp_path):
    x, y = data(n=20)

    class Plain(Task):
        def training_step(self, batch, batch_idx):
            return self.sample_losses(self(batch[0]), batch[1]).mean()

    ds = torch.utils.data.TensorDataset(x, y)
    task = Plain(mlp())
    before = [p.detach().clone() for p in task.parameters()]
    with pytest.raises(
        RuntimeError, match=r"needs the dataset index.*RandomSampler.*'index' entry.*sample_ids="
    ):
        trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(
            task, torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True)
        )
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))  # refused before any step
    assert not any(m._forward_hooks for m in task.modules())


def test_sample_ids_callable(tmp_path):
    torch.manual_seed(0)
    x, y = data(n=20)
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(20) + 100)

    class Triple(Task):
        def training_step(self, batch, batch_idx):
            return self.sample_losses(self(batch[0]), batch[1]).mean()

    cap = GradientCapture(tmp_path / "s.zarr", sample_ids=lambda b: b[2], labels=lambda b: b[1], policy=EXACT)
    trainer([cap]).fit(Triple(mlp()), torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True))
    store = open_store(tmp_path / "s.zarr")
    ids = store.sample_ids(0)
    assert sorted(ids.tolist()) == list(range(100, 120))
    np.testing.assert_array_equal(store.row_field(0, "label"), y[ids - 100].numpy())


class WithUncovered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.raw = nn.Parameter(torch.randn(8, 8) * 0.1)  # used through F.linear: hooks cannot see it
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(self.bn(self.fc(x)), self.raw)
        h = self.attn(h[:, None], h[:, None], h[:, None])[0][:, 0]
        return self.head(h)


def test_uncovered_parameters_are_warned_and_recorded(tmp_path):
    x, y = data(n=16)
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    with pytest.warns(UserWarning, match=r"does not capture 64 of the 451 selected parameter") as caught:
        trainer([cap]).fit(Task(WithUncovered()), loader(x, y))
    summary = [str(w.message) for w in caught if "does not capture" in str(w.message)]
    assert len(summary) == 1  # one message for every module, not one each
    assert "WithUncovered x1 (net; raw; 64 numbers)" in summary[0]
    assert any("coupled by BatchNorm in training mode (net.bn)" in str(w.message) for w in caught)
    store = open_store(tmp_path / "s.zarr")
    got = {u["module"]: u for u in store.uncovered}
    assert set(got) == {"net"}  # nn.MultiheadAttention is captured (tests/test_attention.py)
    assert got["net"]["params"] == ["raw"] and got["net"]["numel"] == 64
    assert set(store.layers) == {"net.fc", "net.bn", "net.attn.in_proj", "net.attn.out_proj", "net.head"}
    coupled = {n: store.layer_spec(n).get("batch_coupled") for n in store.layers}
    assert coupled == {
        "net.fc": ["net.bn"],
        "net.bn": ["net.bn"],
        "net.attn.in_proj": None,
        "net.attn.out_proj": None,
        "net.head": None,
    }


def test_tied_parameters_are_reported_not_half_captured(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
            self.c = nn.Linear(6, 6)
            self.c.weight = self.a.weight

        def forward(self, x):
            return self.b(self.c(torch.relu(self.a(x))))

    x, y = data(n=8)
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    with pytest.warns(UserWarning, match="is shared with"):
        trainer([cap]).fit(Task(Tied()), loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    assert {u["module"] for u in store.uncovered} == {"net.a", "net.c"}
    assert "net.b" in store.layers


def test_unknown_layer_pattern_fails_at_setup_and_lists_layers(tmp_path):
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "layers": ["encoder.*"]})
    x, y = data(n=8)
    with pytest.raises(
        PolicyError, match=r"'encoder\.\*' matches no module of Task.*net\.0 \(Linear\), net\.2 \(Linear\)"
    ):
        trainer([cap]).fit(Task(mlp()), loader(x, y))
    assert not (tmp_path / "s.zarr").exists()


def test_torch_compile_is_refused(tmp_path):
    task = Task(mlp())
    task.net = torch.compile(task.net)
    x, y = data(n=8)
    with pytest.raises(RuntimeError, match="cannot capture a torch.compile'd model"):
        trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(task, loader(x, y))


def test_hooks_removed_and_modules_untouched(tmp_path):
    x, y = data(n=16)
    plain, task = Task(mlp()), Task(mlp())
    trainer([]).fit(plain, loader(x, y))
    trainer([GradientCapture(tmp_path / "a.zarr", policy=EXACT)]).fit(task, loader(x, y))
    assert not any(m._forward_hooks for m in task.modules())
    # Capture leaves no attribute on any module that Lightning itself did not set.
    assert {n: set(vars(m)) for n, m in task.named_modules()} == {
        n: set(vars(m)) for n, m in plain.named_modules()
    }
    assert not any(hasattr(p, "grad_sample") for p in task.parameters())

    class Boom(L.Callback):
        def on_train_batch_end(self, *args):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        trainer([GradientCapture(tmp_path / "b.zarr", policy=EXACT), Boom()]).fit(task, loader(x, y))
    assert not any(m._forward_hooks for m in task.modules())
    assert open_store(tmp_path / "b.zarr").epochs == []  # the interrupted epoch is never visible


def test_epoch_is_invisible_until_committed(tmp_path):
    seen = []

    class Peek(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                seen.append((trainer.current_epoch, open_store(tmp_path / "s.zarr").epochs))

    x, y = data(n=20)
    trainer([GradientCapture(tmp_path / "s.zarr", policy=EXACT), Peek()], max_epochs=3).fit(
        Task(mlp()), loader(x, y, batch_size=5)
    )
    assert seen == [(0, []), (1, [0]), (2, [0, 1])]


def test_existing_store_modes(tmp_path):
    x, y = data(n=10)
    path = tmp_path / "s.zarr"
    trainer([GradientCapture(path, policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    from mstore_lightning import StoreExistsError

    with pytest.raises(
        StoreExistsError, match="already holds a gradient store.*mode='overwrite'.*mode='append'"
    ):
        trainer([GradientCapture(path, policy=EXACT)]).fit(Task(mlp()), loader(x, y))
    assert open_store(path).epochs == [0]  # untouched
    trainer([GradientCapture(path, mode="append", policy={**EXACT, "epochs": [1]})], max_epochs=2).fit(
        Task(mlp()), loader(x, y)
    )
    assert open_store(path).epochs == [0, 1]
    trainer([GradientCapture(path, mode="overwrite", policy={**EXACT, "epochs": [1]})], max_epochs=2).fit(
        Task(mlp()), loader(x, y)
    )
    assert open_store(path).epochs == [1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"store": ""}, r"`store` must be a non-empty path or URL, got ''"),
        ({"mode": "replace"}, r"`mode` can be 'error', 'overwrite', 'append'; got 'replace'"),
        ({"queue_bytes": 0}, r"`queue_bytes` must be a positive number of bytes, got 0"),
        ({"chunk_bytes": -1}, r"`chunk_bytes` must be a positive number of bytes, got -1"),
        ({"sample_ids": 3}, r"`sample_ids` must be a callable taking a batch, got int"),
        ({"on_pressure": "skip"}, r"`on_pressure` can be 'block', 'drop'; got 'skip'"),
        ({"policy": {"precision": "fp8"}}, r"`precision` can be"),
    ],
)
def test_callback_argument_errors(tmp_path, kwargs, match):
    args = {"store": tmp_path / "s.zarr", **kwargs}
    with pytest.raises((ValueError, PolicyError), match=match):
        GradientCapture(**args)


def test_epochs_last_needs_max_epochs(tmp_path):
    x, y = data(n=8)
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "epochs": "last"})
    with pytest.raises(PolicyError, match=r"`epochs='last'` needs Trainer\(max_epochs=...\)"):
        trainer([cap], max_epochs=-1, max_steps=2).fit(Task(mlp()), loader(x, y))


def test_positional_ids_with_a_sample_subset_keep_rows_aligned(tmp_path):
    x, y = data(n=20)

    class Plain(Task):
        def training_step(self, batch, batch_idx):
            losses = self.sample_losses(self(batch[0]), batch[1])
            return {"loss": losses.mean(), "per_sample_loss": losses.detach()}

    ds = torch.utils.data.TensorDataset(x, y)
    cap = GradientCapture(tmp_path / "s.zarr", policy={**EXACT, "samples": {"ids": [1, 2, 13]}})
    trainer([cap]).fit(Plain(mlp()), torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False))
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.sample_ids(0), [1, 2, 13])
    for name in ("loss", "label", "step", "lr"):
        assert len(store.row_field(0, name)) == 3, name  # batches with no kept sample add no row anywhere
    assert np.isfinite(store.row_field(0, "loss")).all()
    assert len(store.norms(0)) == 3


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_norms_kept_at_capture_are_exact_and_agree_with_the_factors(tmp_path, precision):
    # Linear layers with one position per sample keep each row's squared norm as it is captured, before
    # quantization; norms reads those, and computes them from the stored factors where none were kept.
    torch.manual_seed(0)
    x, y = data(n=24)
    ref = Reference()
    path = tmp_path / "s.zarr"
    cap = GradientCapture(path, policy={**EXACT, "precision": precision})
    trainer([ref, cap], max_epochs=2).fit(Task(mlp()), loader(x, y))
    kept = {}
    store = open_store(path)
    for e in store.epochs:
        ids = store.sample_ids(e).tolist()
        exact = np.sqrt([sum(float(g.pow(2).sum()) for g in ref.grads[e][i].values()) for i in ids])
        kept[e] = np.asarray(store.norms(e))
        np.testing.assert_allclose(kept[e], exact, rtol=1e-5)  # exact at int8 too
        first = np.sqrt(
            [
                sum(float(g.pow(2).sum()) for k, g in ref.grads[e][i].items() if k.startswith("net.0"))
                for i in ids
            ]
        )
        np.testing.assert_allclose(np.asarray(store.norms(e, layers=["net.0"])), first, rtol=1e-5)
    root = zarr.open_group(path, mode="r+")
    for e in store.epochs:  # forget the kept norms: readers fall back to the stored factors
        rank = root[f"{layout.EPOCHS}/{layout.epoch_key(e)}/{layout.rank_key(0)}"]
        assert set(rank.attrs["sqnorms"]["layers"]) == {"net.0", "net.2"}
        rank.attrs.put({k: v for k, v in rank.attrs.asdict().items() if k != "sqnorms"})
    store = open_store(path)
    for e in store.epochs:
        from_factors = np.asarray(store.norms(e))
        if precision == "fp32":
            np.testing.assert_allclose(from_factors, kept[e], rtol=1e-5)
        else:  # int8 factors: within a few percent, and not the same numbers
            assert np.abs(from_factors / kept[e] - 1).max() < 0.05
            assert not np.array_equal(from_factors, kept[e])
