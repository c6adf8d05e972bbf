"""Hugging Face transformers captured during ``Trainer.fit``, checked against torch.func.

Tiny BERT and GPT-2 models are built from configs (random init, nothing downloaded) and trained a few
SGD steps with :class:`~mstore_lightning.GradientCapture` at fp32. A reference callback computes each
batch's torch.func per-sample gradients at the weights that batch is trained on (before its optimizer
step), so every captured row has its own exact reference. The reference runs one sample at a time:
Hugging Face's mask builder branches on the mask's values, which ``vmap`` cannot trace.

Parameters hooks cannot see must be reported as uncovered, exactly those and with their sizes: BERT's
and GPT-2's position tables (looked up once for the whole batch, so their output gradient sums the
samples' gradients), a tied LM head, raw ``Parameter``s such as ViT's class token and position table,
and a fused QKV weight used through ``F.linear``. ``nn.MultiheadAttention`` is captured (see
``tests/test_attention.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs; nothing is fetched

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import lightning as L
import numpy as np
import pytest
import torch
from helpers import EXACT, Reference, Task, loader, trainer
from hypothesis import HealthCheck, example, given, settings
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, Dataset

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.store.verify import verify

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # tiny vocabularies make the default token ids out of range

# Three drawn shapes per test, plus one padded case given explicitly: each case is a Trainer.fit.
SETTINGS = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-4  # per sample and parameter, relative to the reference gradient's norm
VOCAB, PAD = 50, 0


# ----------------------------------------------------------------------------- models and data
def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        pad_token_id=PAD,
    )
    return transformers.BertForSequenceClassification(cfg)


def gpt2(tie: bool) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=PAD,
        eos_token_id=PAD,
        tie_word_embeddings=tie,
    )
    return transformers.GPT2LMHeadModel(cfg)


class TokenData(Dataset):
    """Right-padded token sequences with their attention masks, labels and dataset index."""

    def __init__(self, n: int, length: int, padded: bool, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=g)
        lengths = torch.randint(1, length + 1, (n,), generator=g) if padded else torch.full((n,), length)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # padded positions hold the pad token
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.labels[i],
            "index": i,
        }


class TextTask(L.LightningModule):
    """A Hugging Face model trained on each sample's own loss, averaged over the batch.

    ``kind="cls"``: cross-entropy of the sequence label. ``kind="lm"``: next-token cross-entropy
    averaged over each sample's real (unpadded) tokens. ``positions``: pass ``position_ids`` with one
    row per sample instead of letting the model broadcast one row over the batch.
    """

    def __init__(self, model: nn.Module, kind: str, lr: float = 0.5, positions: bool = False) -> None:
        super().__init__()
        self.model, self.kind, self.lr, self.positions = model, kind, lr, positions

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample losses, shape ``(B,)``."""
        kw = {}
        if self.positions:
            kw["position_ids"] = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        logits = getattr(out, "logits", out)
        if self.kind == "cls":
            return nn.functional.cross_entropy(logits, labels, reduction="none")
        target = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        tok = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        return tok.sum(1) / (target != -100).sum(1).clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        losses = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return {"loss": losses.mean(), "per_sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def per_sample_grads(task: TextTask, batch: dict) -> dict[str, torch.Tensor]:
    """torch.func gradients of each sample's own loss, one sample at a time, keyed by parameter name."""
    params = {k: v.detach() for k, v in task.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in task.named_buffers()}

    def loss_one(p: dict, ids: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return functional_call(task, (p, buffers), (ids[None], mask[None], label[None])).sum()

    grads = [
        grad(loss_one)(params, batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i])
        for i in range(len(batch["input_ids"]))
    ]
    return {k: torch.stack([g[k] for g in grads]) for k in params}


class TextReference(L.Callback):
    """Per-sample gradients of every training batch at the weights it is trained on."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)
        self.weights_seen: list[torch.Tensor] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: TextTask, batch: dict, batch_idx: int
    ) -> None:
        g = per_sample_grads(pl_module, batch)
        for row, sid in enumerate(batch["index"].tolist()):
            self.grads[trainer.current_epoch][sid] = {k: v[row] for k, v in g.items()}
        self.weights_seen.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone())

    def stacked(self, epoch: int, ids: list[int], param: str) -> torch.Tensor:
        return torch.stack([self.grads[epoch][i][param] for i in ids])


def fit(path: Path, task: TextTask, data: Dataset, batch_size: int, epochs: int = 1, **policy: Any):
    ref = TextReference()
    cap = GradientCapture(path, policy={**EXACT, **policy})
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    trainer([ref, cap], max_epochs=epochs).fit(task, loader)
    return open_store(path), ref


def assert_exact(store, ref: TextReference, task: TextTask) -> None:
    """Every captured parameter's restored gradients, norms and dot products equal the reference."""
    # The weights moved between batches, so a reference at the wrong step would not match.
    assert len(ref.weights_seen) > 1 and not torch.equal(ref.weights_seen[0], ref.weights_seen[-1])
    for epoch in store.epochs:
        ids = store.sample_ids(epoch).tolist()
        names = []
        for layer in store.layers:
            params = store.parameters(layer)
            for p, g in store.restore(epoch, layer, ids).items():
                name = params[p]
                names.append(name)
                r = ref.stacked(epoch, ids, name)
                err = (g.float() - r).flatten(1).norm(dim=1)
                scale = r.flatten(1).norm(dim=1)
                assert scale.max() > 0, name
                assert (err <= RTOL * scale + 1e-9).all(), (name, (err / scale).max().item())
        params = {n for n, p in task.named_parameters() if p.requires_grad}
        assert set(names) <= params
        flat = torch.cat([ref.stacked(epoch, ids, n).flatten(1) for n in names], 1).double()
        np.testing.assert_allclose(store.norms(epoch), flat.norm(dim=1).numpy(), rtol=10 * RTOL)
        q = ids[:3]
        expected = (flat[: len(q)] @ flat.T).numpy()
        np.testing.assert_allclose(
            store.dot(epoch, q, ids), expected, rtol=10 * RTOL, atol=10 * RTOL * np.abs(expected).max()
        )


def assert_accounted(store, task: TextTask, uncovered: dict[str, list[str]]) -> None:
    """Each trainable parameter is captured or reported uncovered, never both, with its true size."""
    got = {u["module"]: u["params"] for u in store.uncovered}
    assert got == uncovered
    params = dict(task.named_parameters(remove_duplicate=False))  # a tied weight under each name
    for u in store.uncovered:
        assert u["numel"] == sum(params[f"{u['module']}.{p}"].numel() for p in u["params"]), u
    covered = {name for n in store.layers for name in store.parameters(n).values()}
    missing = {f"{m}.{p}" for m, ps in uncovered.items() for p in ps}
    assert not covered & missing
    assert covered | missing == {n for n, p in params.items() if p.requires_grad}


# ----------------------------------------------------------------------------- exactness
@SETTINGS
@given(length=st.integers(3, 12), batch=st.integers(2, 5), padded=st.booleans())
@example(length=9, batch=4, padded=True)
def test_bert_classifier_restores_exactly(length, batch, padded):
    torch.manual_seed(0)
    task = TextTask(bert(), "cls")
    with tempfile.TemporaryDirectory() as tmp:
        store, ref = fit(Path(tmp) / "s.zarr", task, TokenData(2 * batch + 1, length, padded), batch)
        assert_accounted(store, task, {})  # every parameter, the position table included
        assert store.layer_spec("model.bert.embeddings.position_embeddings")["broadcast"] is True
        assert "model.bert.encoder.layer.1.attention.self.query" in store.layers
        assert_exact(store, ref, task)


@pytest.mark.parametrize(
    ("make", "kind"), [(bert, "cls"), (lambda: gpt2(tie=False), "lm")], ids=["bert", "gpt2"]
)
def test_position_ids_given_per_sample_make_the_position_table_exact(tmp_path, make, kind):
    torch.manual_seed(0)
    task = TextTask(make(), kind, positions=True)
    store, ref = fit(tmp_path / "s.zarr", task, TokenData(9, 7, padded=True), 4)
    assert_accounted(store, task, {})
    assert_exact(store, ref, task)


def test_a_position_table_is_expanded_whatever_the_batch_size(tmp_path):
    """A first batch of one sample shows no broadcast; the next batch's is expanded to its four samples."""
    torch.manual_seed(0)
    task = TextTask(bert(), "cls")
    data = TokenData(5, 6, padded=False)
    ref = TextReference()
    cap = GradientCapture(tmp_path / "s.zarr", policy=EXACT)
    trainer([ref, cap]).fit(task, DataLoader(data, batch_sampler=[[0], [1, 2, 3, 4]]))
    store = open_store(tmp_path / "s.zarr")
    assert_accounted(store, task, {})
    assert_exact(store, ref, task)


def test_bert_factors_with_deduplicated_and_all_zero_inputs_restore_exactly(tmp_path):
    """Forced factors over two epochs: token ids repeat across epochs and token-type ids are all zeros.

    Rows of zeros are stored nowhere, so the token types' chunks are never written; they must read back
    as zeros, exactly, and ``verify`` must not take the absent chunks for damage.
    """
    torch.manual_seed(0)
    task = TextTask(bert(), "cls")
    store, ref = fit(
        tmp_path / "s.zarr", task, TokenData(10, 6, padded=True), 4, epochs=2, representation="factors"
    )
    types = "model.bert.embeddings.token_type_embeddings"
    assert store.layer_spec(types)["arrays"]["a"].get("dedup")
    assert store.dedup_stats(1)["model.bert.embeddings.word_embeddings/a"]["duplicates"] == 10  # all seen
    for epoch, repeats in ((0, 9), (1, 10)):  # all ten rows are one row of zeros
        assert store.dedup_stats(epoch)[f"{types}/a"]["duplicates"] == repeats
        chunks = tmp_path / f"s.zarr/epochs/0000{epoch}/r0/layers/{types}/a/c"
        assert not chunks.exists() or not any(p.is_file() for p in chunks.rglob("*"))
    report = verify(tmp_path / "s.zarr")
    assert report.ok, report.problems
    assert_exact(store, ref, task)


@SETTINGS
@given(length=st.integers(3, 12), batch=st.integers(2, 5), padded=st.booleans())
@example(length=9, batch=4, padded=True)
def test_gpt2_lm_restores_exactly(length, batch, padded):
    torch.manual_seed(0)
    task = TextTask(gpt2(tie=False), "lm")
    with tempfile.TemporaryDirectory() as tmp:
        store, ref = fit(Path(tmp) / "s.zarr", task, TokenData(2 * batch + 1, length, padded), batch)
        assert_accounted(store, task, {})
        assert store.layer_spec("model.transformer.wpe")["broadcast"] is True
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert store.layer_spec(f"model.transformer.h.1.{name}")["kind"] == "conv1d_transposed"
        assert_exact(store, ref, task)


def test_tied_lm_head_is_reported_with_its_size(tmp_path):
    torch.manual_seed(0)
    task = TextTask(gpt2(tie=True), "lm")
    wte = task.model.transformer.wte.weight
    assert task.model.lm_head.weight is wte
    with pytest.warns(
        UserWarning, match=r"Linear x1 \(model\.lm_head; weight; .*shared with \['model\.transformer\.wte'\]"
    ):
        store, ref = fit(tmp_path / "s.zarr", task, TokenData(9, 8, padded=True), 4)
    assert_accounted(
        store,
        task,
        {
            "model.transformer.wte": ["weight"],
            "model.lm_head": ["weight"],
        },
    )
    tied = [u for u in store.uncovered if "shared with" in u["reason"]]
    assert [u["numel"] for u in tied] == [wte.numel(), wte.numel()]  # one tensor, named by both modules
    assert_exact(store, ref, task)


class FusedSelfAttention(nn.Module):
    """Self-attention whose fused QKV projection is a raw ``Parameter`` applied with ``F.linear``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_weight = nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            h.reshape(b, t, self.heads, -1).transpose(1, 2)
            for h in nn.functional.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, -1)
        )
        mask = keep[:, None, None, :].bool()
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class RawEncoder(nn.Module):
    """A classifier with what hooks cannot see.

    A raw position table and a fused QKV weight used through ``F.linear``; beside them an
    ``nn.MultiheadAttention``, which is captured.
    """

    def __init__(self, dim: int = 16, heads: int = 2, max_len: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.1)
        self.fused = FusedSelfAttention(dim, heads)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos[:, :t]
        h = h + self.fused(h, attention_mask)
        h = h + self.mha(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)[0]
        h = self.norm(h)
        pooled = (h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_fused_qkv_is_reported_with_its_size_and_multihead_attention_is_exact(tmp_path):
    torch.manual_seed(0)
    dim = 16
    task = TextTask(RawEncoder(dim), "cls")
    with pytest.warns(
        UserWarning, match=r"FusedSelfAttention x1 \(model\.fused; qkv_bias, qkv_weight; [\d,]+ numbers\)"
    ):
        store, ref = fit(tmp_path / "s.zarr", task, TokenData(9, 10, padded=True), 4)
    assert_accounted(
        store,
        task,
        {
            "model": ["pos"],
            "model.fused": ["qkv_weight", "qkv_bias"],
        },
    )
    got = {u["module"]: u for u in store.uncovered}
    assert got["model.fused"]["numel"] == 3 * dim * dim + 3 * dim
    assert set(store.layers) == {
        "model.tok",
        "model.fused.out",
        "model.mha.in_proj",
        "model.mha.out_proj",
        "model.norm",
        "model.head",
    }
    assert_exact(store, ref, task)


class ViTClassifier(nn.Module):
    """A tiny ViT: its class token and position table are raw ``Parameter``s of ``ViTEmbeddings``."""

    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=2,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        )
        self.vit = transformers.ViTForImageClassification(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over CPU attention kernels
def test_vit_position_table_and_class_token_are_captured_at_their_broadcast(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 2, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    task, ref = Task(ViTClassifier()), Reference()
    trainer([ref, GradientCapture(tmp_path / "s.zarr", policy=EXACT)]).fit(task, loader(x, y, batch_size=4))
    store = open_store(tmp_path / "s.zarr")
    assert store.uncovered == []  # every parameter, the class token and position table included
    emb = "net.vit.vit.embeddings"
    assert store.layer_spec(f"{emb}.cls_token")["kind"] == "broadcast"
    assert store.parameters(f"{emb}.position_embeddings") == {
        "position_embeddings": f"{emb}.position_embeddings"
    }
    assert store.layer_spec(f"{emb}.patch_embeddings.projection")["kind"] == "conv"
    ids = store.sample_ids(0).tolist()
    names = set()
    for layer in store.layers:
        params = store.parameters(layer)
        for p, g in store.restore(0, layer, ids).items():
            names.add(params[p])
            r = ref.stacked(0, ids, params[p]).reshape(g.shape)
            err, scale = (g - r).flatten(1).norm(dim=1), r.flatten(1).norm(dim=1)
            assert (err <= RTOL * scale + 1e-9).all(), (layer, p)
    assert names == {n for n, p in task.named_parameters() if p.requires_grad}
