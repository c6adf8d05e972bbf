"""Storage and inner-product error of factors, full gradients and Kronecker projections on a BERT encoder.

A small BERT-style classifier (Hugging Face ``BertForSequenceClassification`` built from a config,
random init, nothing downloaded) is trained for a few SGD steps at each sequence length ``T`` with
several :class:`~mstore_lightning.GradientCapture` callbacks in one ``Trainer``, so every store sees the
same forward and backward passes:

- ``factors`` and ``full`` (fp32): the two exact representations, forced on every layer;
- ``auto`` (fp32, ``budget=None``): the smaller exact form per layer;
- ``default`` (fp32): the default policy, whose whole-capture budget projects the largest layers
  once the exact rows pass it;
- ``projection k`` (fp32, and int8 for one ``k``): the seeded Kronecker sketch ``P_outᵀ G P_in`` of every
  linear layer, once per projection seed; embeddings and LayerNorms have no projection and stay exact.

The exact per-sample gradients are computed independently with ``torch.func`` at each batch's own
weights. For each store the script reports the bytes on disk per sample (linear layers, other layers,
total), and how far its per-sample gradient inner products are from the exact ones over all captured
parameters: the relative Frobenius error of the Gram matrix, the median error of a pairwise inner
product relative to the product of the two norms, the median relative error of the norms, and the
largest and median error of pairwise cosines. A projection's errors are averaged over its seeds (one
draw of a sketch is one sample of its error). Restorable stores are also compared gradient by gradient.

Usage:
    python benchmarks/transformer_projection.py                     # T = 128 and 512, 24 samples each
    python benchmarks/transformer_projection.py --lengths 32 --samples 8 --dims 16 --seeds 1  # smoke run
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config; nothing is fetched

import lightning as L
import numpy as np
import torch
import transformers
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, Dataset

from mstore_lightning import GradientCapture, GradientStore, open_store

# Machine description and JSON writing are capture_overhead's; it is a script, not a package.
sys.path.insert(0, str(Path(__file__).parent))
import capture_overhead as co

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "transformer_projection.json"
MODEL_SEED, DATA_SEED = 0, 1
VOCAB, HIDDEN, LAYERS, HEADS, FFN, CLASSES = 1000, 128, 2, 4, 512, 2
LR = 0.05


# ---------------------------------------------------------------------------------------------- model
def build_bert(max_len: int) -> nn.Module:
    """BERT-style encoder classifier: 2 layers, hidden 128, 4 heads, FFN 512, vocabulary 1000."""
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=max_len,
        hidden_dropout_prob=0.0,  # the torch.func reference must see the same function
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
    )
    return transformers.BertForSequenceClassification(cfg)


class Tokens(Dataset):
    """Random token sequences of one length, with random labels and a quarter of them padded."""

    def __init__(self, n: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=g)
        lengths = torch.where(
            torch.rand(n, generator=g) < 0.25, torch.randint(length // 4, length, (n,), generator=g), length
        )
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids *= self.mask
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.labels[i],
            "index": i,
        }


class Classifier(L.LightningModule):
    """Mean cross-entropy; ``forward`` returns the per-sample losses, which torch.func differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return nn.functional.cross_entropy(logits, labels, reduction="none")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch["labels"]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class ExactGradients(L.Callback):
    """torch.func per-sample gradients of every training batch, at the weights it is trained on.

    One sample at a time: Hugging Face's mask builder branches on the mask's values, which ``vmap``
    cannot trace.
    """

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Classifier, batch: dict, batch_idx: int
    ) -> None:
        params = {k: v.detach() for k, v in pl_module.named_parameters()}

        def loss(p: dict, ids: Tensor, mask: Tensor, label: Tensor) -> Tensor:
            return functional_call(pl_module, p, (ids[None], mask[None], label[None])).sum()

        for row, sid in enumerate(batch["index"].tolist()):
            g = grad(loss)(
                params, batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
            )
            self.grads[sid] = g

    def flat(self, ids: list[int], names: list[str]) -> Tensor:
        """``(len(ids), Σ numel)`` float64 gradients over parameters ``names``."""
        return torch.stack([torch.cat([self.grads[i][n].flatten() for n in names]) for i in ids]).double()


# ---------------------------------------------------------------------------------------------- runs
def variants(dims: list[int], seeds: int, int8_dim: int | None) -> dict[str, dict[str, Any]]:
    """The stores of one run, by name (``<variant>`` or ``<variant> seed <s>``): each a policy."""
    base = {"layers": ["*"], "precision": "fp32", "loss_reduction": "mean"}
    out = {
        "factors": {**base, "representation": "factors"},
        "full": {**base, "representation": "full"},
        "auto": {**base, "budget": None},
        "default": dict(base),
    }
    for k in dims:
        for seed in range(seeds):
            out[f"projection {k} seed {seed}"] = {
                **base,
                "representation": "projection",
                "projection_dim": k,
                "projection_seed": seed,
            }
    if int8_dim is not None:
        for seed in range(seeds):
            proj = out[f"projection {int8_dim} seed {seed}"]
            out[f"projection {int8_dim} int8 seed {seed}"] = {**proj, "precision": "int8"}
    return out


def fit(length: int, samples: int, batch_size: int, policies: dict[str, dict], workdir: Path) -> tuple:
    """Trains once with one capture per policy; returns the stores, the exact gradients and the model."""
    torch.manual_seed(MODEL_SEED)
    task = Classifier(build_bert(length))
    exact = ExactGradients()
    captures = [
        GradientCapture(str(workdir / f"{i}.zarr"), policy=p, mode="overwrite")
        for i, p in enumerate(policies.values())
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=[exact, *captures],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(Tokens(samples, length, DATA_SEED), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the position-embedding notice repeats once per capture
        trainer.fit(task, loader)
    seconds = time.perf_counter() - start
    stores = {name: open_store(workdir / f"{i}.zarr") for i, name in enumerate(policies)}
    return stores, exact, task, seconds


def param_names(store: GradientStore, layers: list[str]) -> list[str]:
    return [f"{layer}.{p}" for layer in layers for p in store.layer_spec(layer)["params"]]


def gram_errors(est: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How far an estimated Gram matrix of per-sample gradients is from the exact one."""
    n = ref.shape[0]
    off = ~np.eye(n, dtype=bool)
    nr, ne = np.sqrt(np.diag(ref)), np.sqrt(np.clip(np.diag(est), 0, None))
    scale = np.outer(nr, nr)
    cos_ref = ref / scale
    cos_est = est / np.maximum(np.outer(ne, ne), np.finfo(float).tiny)
    return {
        "gram_rel_error": float(np.linalg.norm(est - ref) / np.linalg.norm(ref)),
        "pair_error_median": float(np.median(np.abs(est - ref)[off] / scale[off])),
        "norm_rel_error_median": float(np.median(np.abs(ne / nr - 1))),
        "cosine_abs_error_max": float(np.abs(cos_est - cos_ref)[off].max()),
        "cosine_abs_error_median": float(np.median(np.abs(cos_est - cos_ref)[off])),
        "exact_cosine_spread": float(np.std(cos_ref[off])),
    }


def estimated_grams(
    store: GradientStore, ids: list[int], part: list[str]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Gram matrices over all captured layers and over the layers ``part``, as the store answers them.

    A projected store answers with ``dot`` on its sketches. An exact one is restored and multiplied
    out, which also compares each restored gradient with the exact one.
    """
    if any(store.approximate(lay) for lay in store.layers):
        total = np.asarray(store.dot(0, ids, ids), dtype=np.float64)
        return total, np.asarray(store.dot(0, ids, ids, layers=part), dtype=np.float64), {}
    blocks = {
        lay: [g.flatten(1).double() for g in store.restore(0, lay, ids).values()] for lay in store.layers
    }
    every = torch.cat([b for lay in store.layers for b in blocks[lay]], 1)
    sub = torch.cat([b for lay in part for b in blocks[lay]], 1)
    return (every @ every.T).numpy(), (sub @ sub.T).numpy(), {"restored": every}


def measure(store: GradientStore, exact: ExactGradients, task: Classifier) -> dict[str, Any]:
    """Bytes per sample and inner-product errors of one store against the torch.func gradients."""
    ids = store.sample_ids(0).tolist()
    n = len(ids)
    linear = [lay for lay in store.layers if store.layer_spec(lay)["kind"] == "linear"]
    # The encoder's linear layers see every position; the pooler and classifier see one, yet at random
    # init they hold most of the gradient norm, so the encoder's error is reported on its own too.
    encoder = [lay for lay in linear if ".encoder." in lay]
    ref = exact.flat(ids, param_names(store, store.layers))
    enc_ref = exact.flat(ids, param_names(store, encoder))
    out: dict[str, Any] = {
        "representations": sorted({store.layer_spec(lay)["representation"] for lay in store.layers}),
        "bytes_per_sample": {
            "linear": sum(store.nbytes_stored(0, lay) for lay in linear) / n,
            "other": sum(store.nbytes_stored(0, lay) for lay in store.layers if lay not in linear) / n,
        },
        "uncompressed_bytes_per_sample": sum(
            store.layer_spec(lay)["choice"]["bytes_per_sample"] for lay in store.layers
        ),
    }
    out["bytes_per_sample"]["total"] = out["bytes_per_sample"]["linear"] + out["bytes_per_sample"]["other"]
    predicted = [
        store.layer_spec(lay)["projection"]["predicted_error"] for lay in linear if store.approximate(lay)
    ]
    out["predicted_layer_error_max"] = max(predicted) if predicted else 0.0
    est, enc_est, extra = estimated_grams(store, ids, encoder)
    out.update(gram_errors(est, (ref @ ref.T).numpy()))
    out["encoder_linear"] = gram_errors(enc_est, (enc_ref @ enc_ref.T).numpy())
    out["encoder_share_of_sqnorm"] = float((enc_ref.pow(2).sum(1) / ref.pow(2).sum(1)).mean())
    if "restored" in extra:
        restored = extra["restored"]
        out["restored_rel_error_max"] = float(((restored - ref).norm(dim=1) / ref.norm(dim=1)).max())
        out["restored_cosine_min"] = float(nn.functional.cosine_similarity(restored, ref, dim=1).min())
    names = set(param_names(store, store.layers))
    out["param_count"] = int(sum(p.numel() for name, p in task.named_parameters() if name in names))
    out["dense_fp32_bytes_per_sample"] = 4 * out["param_count"]
    return out


ERROR_KEYS = (
    "gram_rel_error",
    "pair_error_median",
    "norm_rel_error_median",
    "cosine_abs_error_median",
    "cosine_abs_error_max",
)


def summarize(stores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per variant: bytes of its first seed, errors as the mean and std over its seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, r in stores.items():
        groups.setdefault(name.split(" seed ")[0], []).append(r)
    out = {}
    for variant, runs in groups.items():
        first = runs[0]
        row = {
            "seeds": len(runs),
            "bytes_per_sample": first["bytes_per_sample"],
            "dense_fp32_bytes_per_sample": first["dense_fp32_bytes_per_sample"],
            "predicted_layer_error_max": first["predicted_layer_error_max"],
            "encoder_share_of_sqnorm": first["encoder_share_of_sqnorm"],
        }
        values = {key: [r[key] for r in runs] for key in ERROR_KEYS}
        values["encoder_gram_rel_error"] = [r["encoder_linear"]["gram_rel_error"] for r in runs]
        for key, v in values.items():
            row[key], row[f"{key}_std_over_seeds"] = float(np.mean(v)), float(np.std(v))
        out[variant] = row
    return out


# ---------------------------------------------------------------------------------------------- report
def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'T':>4}  {'store':<17} {'linear B/s':>11} {'other B/s':>10} {'total B/s':>10} {'vs fp32':>8} "
        f"{'gram err':>13} {'encoder gram':>13} {'pair err':>9} {'norm err':>9} {'|dcos| med':>10} "
        f"{'|dcos| max':>10} {'predicted':>9}"
    )
    lines = [head, "-" * len(head)]
    for t, run in results.items():
        for name, r in run["summary"].items():
            b = r["bytes_per_sample"]
            gram = _pm(r["gram_rel_error"], r["gram_rel_error_std_over_seeds"])
            enc = _pm(r["encoder_gram_rel_error"], r["encoder_gram_rel_error_std_over_seeds"])
            lines.append(
                f"{t:>4}  {name:<17} {b['linear']:>11,.0f} {b['other']:>10,.0f} {b['total']:>10,.0f} "
                f"{r['dense_fp32_bytes_per_sample'] / b['total']:>7.1f}x {gram:>13} {enc:>13} "
                f"{r['pair_error_median']:>9.2e} {r['norm_rel_error_median']:>9.2e} "
                f"{r['cosine_abs_error_median']:>10.2e} {r['cosine_abs_error_max']:>10.2e} "
                f"{r['predicted_layer_error_max']:>9.3f}"
            )
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    """``mean±std`` over seeds, or the single value of an exact store."""
    return f"{mean:.3f}±{std:.3f}" if std > 0 else f"{mean:.1e}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,512", help="comma-separated sequence lengths T")
    parser.add_argument("--samples", type=int, default=24, help="training samples per length (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dims", default="16,32,64", help="comma-separated projection sizes k")
    parser.add_argument(
        "--seeds", type=int, default=4, help="projection seeds per size (errors are averaged)"
    )
    parser.add_argument(
        "--int8-dim", type=int, default=64, help="projection size also stored at int8 (0: none)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        args.dims = [int(x) for x in args.dims.split(",") if x.strip()]
    except ValueError:
        parser.error("--lengths and --dims take comma-separated integers, e.g. --lengths 128,512")
    if not args.lengths or min(args.lengths) < 2 or min(args.dims or [1]) < 1:
        parser.error("--lengths needs integers >= 2 and --dims integers >= 1")
    if args.samples < 2 or args.batch_size < 1 or args.seeds < 1:
        parser.error("--samples must be >= 2, --batch-size and --seeds >= 1")
    if args.int8_dim and args.int8_dim not in args.dims:
        args.dims.append(args.int8_dim)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    machine = co.machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}")
    policies = variants(args.dims, args.seeds, args.int8_dim or None)
    results: dict[str, dict[str, Any]] = {}
    for length in args.lengths:
        with tempfile.TemporaryDirectory(prefix="mstore-bench-") as tmp:
            stores, exact, task, seconds = fit(length, args.samples, args.batch_size, policies, Path(tmp))
            measured = {name: measure(s, exact, task) for name, s in stores.items()}
            results[str(length)] = {
                "fit_seconds_all_captures": round(seconds, 2),
                "uncovered": stores["full"].uncovered,
                "summary": summarize(measured),
                "stores": measured,
            }
        print(f"T={length}: trained and captured {len(policies)} stores in {seconds:.1f} s")
    print()
    print(format_table(results))
    print(
        "\nB/s: bytes on disk per sample (zstd); 'other' is the embeddings and LayerNorms, never projected."
        "\nvs fp32: dense fp32 per-sample gradient of the captured parameters / total B/s."
        "\ngram err: ||K - K*||_F / ||K*||_F over all captured parameters, mean±std over projection seeds;"
        "\nencoder gram: the same over the encoder's linear layers alone (the pooler and classifier hold "
        "most of the norm at random init).\npair err: median |K_ij - K*_ij| / (|g_i||g_j|). norm err: "
        "median relative error of |g_i|. |dcos|: error of pairwise cosines.\npredicted: the largest "
        "per-layer predicted relative error std of the projection. K*: torch.func per-sample gradients at "
        "each batch's weights."
    )
    report = {
        "benchmark": "transformer_projection",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": {**co.versions(), "transformers": transformers.__version__},
        "library_digest": co.library_digest(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "type": "BertForSequenceClassification (random init)",
            "vocab": VOCAB,
            "hidden": HIDDEN,
            "layers": LAYERS,
            "heads": HEADS,
            "ffn": FFN,
            "classes": CLASSES,
        },
        "samples": args.samples,
        "batch_size": args.batch_size,
        "sgd_lr": LR,
        "projection_seeds": list(range(args.seeds)),
        "policies": policies,
        "results": results,
    }
    co.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
