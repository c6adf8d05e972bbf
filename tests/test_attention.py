"""``nn.MultiheadAttention`` captured exactly: the same function bit for bit, every parameter's
per-sample gradient equal to torch.func's, and nothing left on the module afterwards."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from hypothesis import HealthCheck, example, given, settings
from torch import nn

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.capture.hooks import HookManager
from mstore_lightning.capture.layers import select_layers
from mstore_lightning.config import CapturePolicy

RTOL = 1e-4  # per sample and parameter, relative to the reference gradient's norm
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over CPU attention

BASE = {
    "heads": 2,
    "batch_first": True,
    "inputs": "self",
    "kdim": None,
    "bias": True,
    "bias_kv": False,
    "zero_attn": False,
    "need_weights": False,
    "mask": "none",
    "query_len": 4,
    "key_len": 4,
}

configs = st.fixed_dictionaries(
    {
        "heads": st.sampled_from([1, 2, 4]),
        "batch_first": st.booleans(),
        "inputs": st.sampled_from(["self", "kv", "distinct"]),
        "kdim": st.sampled_from([None, 6]),
        "bias": st.booleans(),
        "bias_kv": st.booleans(),
        "zero_attn": st.booleans(),
        "need_weights": st.booleans(),
        "mask": st.sampled_from(["none", "key_padding", "bool", "float", "causal"]),
        "query_len": st.integers(1, 5),
        "key_len": st.integers(1, 5),
    }
)


class Attend(nn.Module):
    """A classifier around one ``nn.MultiheadAttention`` configured by ``cfg``.

    Queries come from the first positions of ``x`` and keys/values from the rest (or the same, for
    self-attention); the key padding mask is read from the data, so each sample has its own.
    """

    def __init__(self, cfg: dict, dim: int = 8, features: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.cfg, kdim = cfg, cfg["kdim"]
        self.inp = nn.Linear(features, dim)
        self.self_attention = cfg["inputs"] == "self" and kdim is None
        self.mem = None if self.self_attention else nn.Linear(features, kdim or dim)
        self.att = nn.MultiheadAttention(
            dim,
            cfg["heads"],
            bias=cfg["bias"],
            add_bias_kv=cfg["bias_kv"],
            add_zero_attn=cfg["zero_attn"],
            kdim=kdim,
            vdim=kdim,
            batch_first=cfg["batch_first"],
        )
        self.head = nn.Linear(dim, classes)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, lq = self.cfg, self.cfg["query_len"]
        q = self.inp(x[:, :lq])
        if self.self_attention:
            k = v = q
            pad = x[:, :lq, 0] > 0.8
        else:
            k = self.mem(x[:, lq:])
            v = k if cfg["inputs"] == "kv" or cfg["kdim"] else self.mem(x[:, lq:] * 0.5)
            pad = x[:, lq:, 0] > 0.8
        return q, k, v, pad.index_fill(1, torch.tensor([0]), False)  # one key always seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q, k, v, pad = self.split(x)
        lq, lk = q.shape[1], k.shape[1]
        if not cfg["batch_first"]:
            q, k, v = (
                (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
                if k is not q
                else (q.transpose(0, 1),) * 3
            )
            if cfg["inputs"] == "kv" or cfg["kdim"]:
                v = k
        kw = {"need_weights": cfg["need_weights"]}
        if cfg["mask"] == "key_padding":
            kw["key_padding_mask"] = pad
        elif cfg["mask"] in ("bool", "causal"):
            kw["attn_mask"] = torch.ones(lq, lk, dtype=torch.bool).triu(1)
            kw["is_causal"] = cfg["mask"] == "causal" and lq == lk
        elif cfg["mask"] == "float":
            kw["attn_mask"] = -torch.arange(lq * lk, dtype=torch.float32).reshape(lq, lk) / 10
        out = self.att(q, k, v, **kw)[0]
        if not cfg["batch_first"]:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


def _data(cfg: dict, n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = cfg["query_len"] + cfg["key_len"]
    return torch.randn(n, length, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_capture_computes_the_same_function_bit_for_bit(cfg):
    torch.manual_seed(0)
    net = Attend(cfg)
    plain = copy.deepcopy(net)
    x, _ = _data(cfg, n=5)
    plans, uncovered = select_layers(net, CapturePolicy())
    assert not uncovered
    hooks = HookManager()
    hooks.attach(plans)
    hooks.active = True
    try:
        out, ref = net(x), plain(x)
        out.square().sum().backward()
        ref.square().sum().backward()
        uses = hooks.take()
    finally:
        hooks.detach()
    assert torch.equal(out, ref)
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    fed = [n for n in plans if n.startswith("att")]
    assert fed and all(len(uses[n]) == 1 for n in fed), {n: len(uses[n]) for n in fed}
    assert "forward" not in net.att.__dict__  # the capture-time forward is gone with the hooks
    assert not net.att._forward_hooks and not net.att._forward_pre_hooks


def _restored_equals_reference(store, ref: Reference, epoch: int = 0) -> list[str]:
    ids = store.sample_ids(epoch).tolist()
    names = []
    for layer in store.layers:
        params = store.parameters(layer)
        for key, g in store.restore(epoch, layer, ids).items():
            name = params[key]
            names.append(name)
            r = ref.stacked(epoch, ids, name.partition("[")[0])
            if "[" in name:  # a slice of in_proj_bias
                lo, hi = (int(v) for v in name[name.index("[") + 1 : -1].split(":"))
                r = r[:, lo:hi]
            r = r.reshape(g.shape)
            err, scale = (g - r).flatten(1).norm(dim=1), r.flatten(1).norm(dim=1)
            assert (err <= RTOL * scale + 1e-9).all(), (name, (err / scale).max().item())
    return names


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
@example(cfg={**BASE, "mask": "causal"})
@example(
    cfg={**BASE, "inputs": "kv", "kdim": 6, "bias_kv": True, "mask": "key_padding", "batch_first": False}
)
@example(
    cfg={**BASE, "inputs": "distinct", "zero_attn": True, "need_weights": True, "mask": "float", "key_len": 2}
)
def test_drawn_attention_configurations_restore_exactly_through_fit(tmp_path_factory, cfg):
    torch.manual_seed(0)
    x, y = _data(cfg)
    task, ref = Task(Attend(cfg)), Reference()
    path = tmp_path_factory.mktemp("mha") / "s.zarr"
    trainer([ref, GradientCapture(path, policy=EXACT)]).fit(task, loader(x, y, batch_size=4))
    store = open_store(path)
    assert store.uncovered == []
    names = _restored_equals_reference(store, ref)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    covered = {n.partition("[")[0] for n in names}
    assert covered == trainable
    assert "forward" not in task.net.att.__dict__


class EncoderClassifier(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


class DecoderClassifier(nn.Module):
    """``nn.TransformerDecoder``: self-attention under a causal mask, then cross-attention to a memory."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.inp, self.mem = nn.Linear(4, dim), nn.Linear(4, dim)
        block = nn.TransformerDecoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(block, 1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tgt, mem = self.inp(x[:, :4]), self.mem(x[:, 4:])
        mask = nn.Transformer.generate_square_subsequent_mask(4)
        return self.head(self.dec(tgt, mem, tgt_mask=mask, tgt_is_causal=True).mean(1))


@pytest.mark.parametrize("make", [EncoderClassifier, DecoderClassifier])
def test_transformer_encoder_and_decoder_are_fully_covered_and_exact(tmp_path, make):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 7, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    task, ref = Task(make()), Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(task, loader(x, y, batch_size=8))
    store = open_store(tmp_path / "s.zarr")
    assert store.uncovered == []
    names = _restored_equals_reference(store, ref)
    assert set(names) == {n for n, p in task.named_parameters() if p.requires_grad}
    ids = store.sample_ids(0).tolist()
    flat = torch.cat([ref.stacked(0, ids, n).flatten(1) for n in names], 1).double()
    np.testing.assert_allclose(store.norms(0), flat.norm(dim=1).numpy(), rtol=1e-4)
    expected = (flat[:3] @ flat.T).numpy()
    np.testing.assert_allclose(
        store.dot(0, ids[:3], ids), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )
    for m in task.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks


def test_a_frozen_in_projection_costs_nothing_and_out_proj_alone_is_fed(tmp_path):
    torch.manual_seed(0)
    net = EncoderClassifier(layers=1)
    att = net.enc.layers[0].self_attn
    att.in_proj_weight.requires_grad_(False)
    att.in_proj_bias.requires_grad_(False)
    plans, _ = select_layers(net, CapturePolicy())
    assert "enc.layers.0.self_attn.in_proj" not in plans
    assert plans["enc.layers.0.self_attn.out_proj"].role == "out_proj"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    task, ref = Task(net), Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(task, loader(x, y, batch_size=8))
    store = open_store(tmp_path / "s.zarr")
    assert "net.enc.layers.0.self_attn.in_proj" not in store.layers
    assert store.uncovered == []
    _restored_equals_reference(store, ref)


def test_a_deep_copy_made_during_capture_runs_its_own_weights():
    torch.manual_seed(0)
    net = EncoderClassifier(layers=1)
    plans, _ = select_layers(net, CapturePolicy())
    hooks = HookManager()
    hooks.attach(plans)
    try:
        twin = copy.deepcopy(net)  # as an EMA or SWA callback would
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        x = torch.randn(2, 5, 4)
        hooks.active = True
        assert torch.equal(twin(x), copy.deepcopy(twin)(x))
        assert not torch.equal(twin(x), net(x))
    finally:
        hooks.detach()
    assert "forward" not in net.enc.layers[0].self_attn.__dict__
