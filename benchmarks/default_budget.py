"""What a sample costs to store, exact and within whole-capture budgets, on models people train.

For each model, one captured ``Trainer.fit`` step with ``budget=None`` (every layer exact) records each
layer's exact bytes a sample and the projections it could take; the script then applies the whole-capture
rule (:func:`mstore_lightning.capture.choice.fit_total`: the largest layers are projected, largest first,
until the capture fits) for several budgets, and reports the bytes a sample, the layers projected and the
largest predicted error of their inner products. One more step with the default policy records the plan
the library itself makes, which is committed (``plans`` in the JSON).

Models: the digits demo's MLP; the MLP, CNN and transformer of ``capture_overhead.py``; a ViT-tiny
(hidden 192, 12 layers, 3 heads) on 32x32 images with 4x4 patches; and GPT-2-small (124M parameters,
``GPT2Config()``, T=1024). All are built from code or configs, nothing is downloaded, int8, CPU.

Usage:
    python benchmarks/default_budget.py                  # every model (about 5 minutes)
    python benchmarks/default_budget.py --models mlp cnn # a subset
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mstore_lightning import GradientCapture, IndexedDataset, open_store
from mstore_lightning.capture import choice
from mstore_lightning.config import DEFAULT_BUDGET

sys.path.insert(0, str(Path(__file__).parent))
import capture_overhead as co

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "default_budget.json"
BUDGETS = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)
EPOCH_ROWS = 1_000_000  # the epoch size the per-epoch figures assume


class Task(L.LightningModule):
    def __init__(self, net: nn.Module, lm: bool = False) -> None:
        super().__init__()
        self.net, self.lm = net, lm

    def training_step(self, batch: dict, _: int) -> dict:
        out = self.net(batch["x"])
        if self.lm:
            losses = nn.functional.cross_entropy(
                out[:, :-1].transpose(1, 2), batch["x"][:, 1:], reduction="none"
            ).mean(1)
        else:
            losses = nn.functional.cross_entropy(out, batch["y"], reduction="none")
        return {"loss": losses.mean(), "per_sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Logits(nn.Module):
    """A Hugging Face model's logits from ``x`` (pixel values or token ids)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


def vit_tiny() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
    )
    return Logits(transformers.ViTForImageClassification(cfg), "pixel_values")


def gpt2_small() -> nn.Module:
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Logits(transformers.GPT2LMHeadModel(cfg), "input_ids")


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


MODELS = {
    "digits": (
        "digits demo MLP 64-64-10",
        digits_mlp,
        lambda g, n: torch.randn(n, 64, generator=g),
        8,
        False,
    ),
    "mlp": ("MLP 784-512-512-10", co.build_mlp, lambda g, n: torch.randn(n, 784, generator=g), 8, False),
    "cnn": (
        "4-conv CNN, 3x32x32",
        co.build_cnn,
        lambda g, n: torch.randn(n, 3, 32, 32, generator=g),
        8,
        False,
    ),
    "transformer": (
        "nn.TransformerEncoder d128 h4 L2, T=64",
        co.build_transformer,
        lambda g, n: torch.randint(0, co.VOCAB, (n, 64), generator=g),
        8,
        False,
    ),
    "vit_tiny": (
        "ViT-tiny (192, 12 layers), 32x32, patch 4",
        vit_tiny,
        lambda g, n: torch.randn(n, 3, 32, 32, generator=g),
        4,
        False,
    ),
    "gpt2_small": (
        "GPT-2-small (124M, GPT2Config()), T=1024",
        gpt2_small,
        lambda g, n: torch.randint(0, 50257, (n, 1024), generator=g),
        2,
        True,
    ),
}


class _Cand:
    """What :func:`choice.fit_total` reads of a candidate."""

    def __init__(self, nbytes: int, error: float, name: str) -> None:
        self.nbytes, self.error, self.name = nbytes, error, name


def one_step(key: str, policy: dict[str, Any], where: Path) -> tuple[Any, float]:
    _, build, inputs, batch, lm = MODELS[key]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = inputs(g, batch)
    y = torch.randint(0, 10, (batch,), generator=g)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GradientCapture(where, policy={"precision": "int8", **policy})],
    )
    t0 = time.perf_counter()
    trainer.fit(Task(build(), lm), DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch))
    return open_store(where), time.perf_counter() - t0


def measure(key: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact, t_exact = one_step(key, {"budget": None}, Path(tmp) / "exact.zarr")
        sizes, projections = {}, {}
        for layer in exact.layers:
            c = exact.layer_spec(layer)["choice"]
            sizes[layer] = c["bytes_per_sample"]
            projections[layer] = [
                _Cand(v["bytes"], v["error"], k)
                for k, v in c["considered"].items()
                if k.startswith("projection")
            ]
        total = sum(sizes.values())
        budgets = {}
        for b in BUDGETS:
            picks = choice.fit_total(sizes, projections, 0, b)
            after = total + sum(p.nbytes - sizes[n] for n, p in picks.items())
            budgets[str(b)] = {
                "bytes_per_sample": after,
                "fits": after <= b,
                "layers_projected": len(picks),
                "of_layers": len(sizes),
                "max_predicted_error": max((p.error for p in picks.values()), default=0.0),
                "epoch_bytes_1M_rows": after * EPOCH_ROWS,
            }
        default, t_default = one_step(key, {}, Path(tmp) / "default.zarr")
        plan = default.meta.get("plan")
        projected = [n for n in default.layers if default.layer_spec(n)["representation"] == "projection"]
    return {
        "model": MODELS[key][0],
        "parameters": sum(p.numel() for p in MODELS[key][1]().parameters()),
        "exact_bytes_per_sample": total,
        "layers": len(sizes),
        "uncovered": exact.uncovered,
        "budgets": budgets,
        "default_plan": plan,
        "default_projected_layers": projected,
        "fit_seconds": {"exact": round(t_exact, 1), "default": round(t_default, 1)},
    }


def table(results: dict[str, Any]) -> str:
    head = "| model | exact B/sample | " + " | ".join(f"{b >> 10} KiB budget" for b in BUDGETS) + " |"
    lines = [head, "|" + "---|" * (2 + len(BUDGETS))]
    for r in results.values():
        cells = []
        for b in BUDGETS:
            v = r["budgets"][str(b)]
            if not v["layers_projected"]:
                cells.append("exact")
            else:
                mark = "" if v["fits"] else " (over)"
                cells.append(
                    f"{v['bytes_per_sample'] / 1024:,.0f} KiB{mark}, {v['layers_projected']}/{v['of_layers']} "
                    f"proj., err <= {v['max_predicted_error']:.2f}"
                )
        lines.append(f"| {r['model']} | {r['exact_bytes_per_sample']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mstore_lightning").setLevel(logging.ERROR)
    results = {}
    for key in args.models:
        print(f"{key} ...", flush=True)
        results[key] = measure(key)
    print(table(results))
    print(f"default budget: {DEFAULT_BUDGET}")
    print(f"machine: {co.machine_info()}")
    co.write_report(
        args.out,
        {
            "benchmark": "default_budget",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": co.machine_info(),
            "versions": co.versions(),
            "library_digest": co.library_digest(),
            "command": "python benchmarks/default_budget.py " + " ".join(sys.argv[1:]),
            "epoch_rows_assumed": EPOCH_ROWS,
            "default_budget": DEFAULT_BUDGET,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
