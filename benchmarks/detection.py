"""Which training labels are wrong: ``store.suspects()`` against every single signal and cleanlab.

Protocols (10% of the training labels flipped; seeds 0-4 draw the split, the flips, the init and the
shuffling):

- ``digits_standard`` and ``digits_unit``: scikit-learn's digits, standardised or divided by 16, MLP
  64-128-128-10, 20 epochs;
- ``mnist1d``: MNIST-1D made locally, the small 1-D CNN of its paper, 10 epochs;
- ``text``: the text-classifier example's generated topic task, a 2-layer BERT (hidden 64), 5 epochs;

each with *uniform* flips (to any other class) and *pair* flips (class ``c`` to ``c + 1``: the
asymmetric noise of a confusable pair). SGD with momentum 0.9 (the text task: AdamW, as its example
trains), batch 64, mean cross-entropy.

Detectors, all from the same training run except cleanlab:

- ``suspects``: ``open_store(path).suspects()`` of a capture at its defaults;
- ``self_influence``: ``open_store(path).self_influence()`` of the same store;
- ``loss_mean``, ``loss_sum``, ``aum``: the per-sample loss averaged and summed over epochs, and the area
  under the margin, recorded by the training step itself (independent of the store);
- ``exact_tracin``: ``Σ_e lr_e ‖∇ℓ_i(θ_e)‖²`` with exact per-sample gradients at each epoch's end;
- ``cleanlab``: 5-fold cross-validated probabilities (5 more fits, timed), ``get_label_quality_scores``.

Each is scored by ROC-AUC and by precision among its top ``#flipped``; the table gives mean ± standard
error over seeds. Runs in the peers' environment (cleanlab, mnist1d)::

    .venv-peers/bin/python benchmarks/detection.py                       # every protocol, 5 seeds
    .venv-peers/bin/python benchmarks/detection.py --protocols digits_standard_uniform --seeds 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from mstore_lightning import GradientCapture, IndexedDataset, open_store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent / "example_projects" / "text_classifier"))
import capture_overhead as co
import debugging as dbg

DEFAULT_OUT = HERE / "results" / "detection.json"
NOISE = 0.10
FOLDS = 5
DETECTORS = ("suspects", "self_influence", "loss_mean", "loss_sum", "aum", "exact_tracin", "cleanlab")


@dataclass(frozen=True)
class Protocol:
    """A data set, its noise, its network and schedule."""

    data: Callable[
        [int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    ]  # seed -> x, y, x_test, y_test
    build: Callable[[], nn.Module]
    classes: int
    epochs: int
    flips: str  # "uniform" | "pairs"
    lr: float = 0.1
    integer_inputs: bool = False
    adamw: bool = False  # the text example's optimizer; SGD with momentum 0.9 otherwise


def digits(scaling: str) -> Callable[[int], tuple[np.ndarray, ...]]:
    def load(seed: int) -> tuple[np.ndarray, ...]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        # The demo's split and scaling; its labels before the demo's own flips.
        x, _, x_test, y_test, _ = dbg.attribution.load_demo().load_noisy_digits(seed, scaling=scaling)
        d = load_digits()
        _, _, y, _ = train_test_split(d.data, d.target, test_size=0.2, random_state=seed, stratify=d.target)
        return x, y, x_test, y_test

    return load


def mnist1d(seed: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return (
        np.asarray(d["x"], dtype=np.float32),
        np.asarray(d["y"], dtype=np.int64),
        np.asarray(d["x_test"], dtype=np.float32),
        np.asarray(d["y_test"], dtype=np.int64),
    )


def text(seed: int) -> tuple[np.ndarray, ...]:
    import train as tc

    rng = np.random.default_rng(seed)
    sentences, labels = tc.generate(tc.TRAIN_SIZE + tc.TEST_SIZE, rng)
    ids, _ = tc.encode(sentences)
    n = tc.TRAIN_SIZE
    return ids[:n].numpy(), labels[:n], ids[n:].numpy(), labels[n:]


class TextNet(nn.Module):
    """The example's BERT topic classifier on token ids (the padding mask read from them)."""

    def __init__(self) -> None:
        super().__init__()
        import train as tc

        self.pad = tc.TOKEN[tc.PAD]
        self.model = tc.TopicClassifier().bert

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, attention_mask=(ids != self.pad).long()).logits


def flip(y: np.ndarray, classes: int, how: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``NOISE`` of ``y`` flipped: to a uniformly drawn other class, or ``c -> c + 1`` (pairs)."""
    rng = np.random.default_rng(10_000 + seed)
    chosen = rng.choice(len(y), size=round(NOISE * len(y)), replace=False)
    noisy = y.copy()
    shift = rng.integers(1, classes, size=len(chosen)) if how == "uniform" else 1
    noisy[chosen] = (y[chosen] + shift) % classes
    mask = np.zeros(len(y), dtype=bool)
    mask[chosen] = True
    return noisy, mask


PROTOCOLS: dict[str, Protocol] = {}
for flips in ("uniform", "pairs"):
    PROTOCOLS[f"digits_standard_{flips}"] = Protocol(
        digits("standard"), dbg.attribution.build_net, 10, 20, flips
    )
    PROTOCOLS[f"digits_unit_{flips}"] = Protocol(digits("unit"), dbg.attribution.build_net, 10, 20, flips)
    PROTOCOLS[f"mnist1d_{flips}"] = Protocol(mnist1d, dbg.build_cnn, 10, 10, flips)
    PROTOCOLS[f"text_{flips}"] = Protocol(
        text, TextNet, 4, 5, flips, lr=2e-3, integer_inputs=True, adamw=True
    )


class Recording(L.LightningModule):
    """Mean cross-entropy under SGD; records each sample's loss and margin per epoch, as it trains."""

    def __init__(self, net: nn.Module, lr: float, n: int, epochs: int, adamw: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.adamw = net, lr, adamw
        self.losses = np.full((epochs, n), np.nan)
        self.margins = np.full((epochs, n), np.nan)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.net(batch["x"])
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        with torch.no_grad():
            y = batch["y"].unsqueeze(1)
            other = logits.scatter(1, y, float("-inf")).amax(dim=1)
            ids = batch["index"].numpy()
            self.losses[self.current_epoch, ids] = losses.numpy()
            self.margins[self.current_epoch, ids] = (logits.gather(1, y).squeeze(1) - other).numpy()
        return losses.mean()  # nothing else: the capture finds losses and margins by itself

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.adamw:
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    @torch.no_grad()
    def probabilities(self, x: Tensor) -> np.ndarray:
        self.net.eval()
        return torch.softmax(self.net(x), dim=1).double().numpy()


class ExactSelfInfluence(L.Callback):
    """``Σ_e lr_e ‖∇ℓ_i(θ_e)‖²`` at each epoch's end, one backward pass per sample (any network)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.scores = np.zeros(len(y))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Recording) -> None:
        net, lr = pl_module.net, trainer.optimizers[0].param_groups[0]["lr"]
        params = [p for p in net.parameters() if p.requires_grad]
        was = net.training
        net.train()
        for i in range(len(self.y)):
            loss = F.cross_entropy(net(self.x[i : i + 1]), self.y[i : i + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            self.scores[i] += lr * sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
        net.train(was)


def fit(
    p: Protocol, x: Tensor, y: Tensor, rows: np.ndarray, seed: int, callbacks: list
) -> tuple[float, Recording]:
    L.seed_everything(seed, verbose=False)
    data = Subset(IndexedDataset(TensorDataset(x, y)), rows.tolist())
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = Recording(p.build(), p.lr, len(y), p.epochs, p.adamw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        dbg.common.quiet_trainer(callbacks, max_epochs=p.epochs).fit(model, loader)
    return time.perf_counter() - start, model


def run(
    name: str, p: Protocol, seed: int, work: Path, dump: Path | None = None, cleanlab: bool = True
) -> dict[str, Any]:
    x_np, y_clean, x_test_np, y_test = p.data(seed)
    y_np, flipped = flip(y_clean, p.classes, p.flips, seed)
    dtype = torch.long if p.integer_inputs else torch.float32
    x, y = torch.as_tensor(x_np, dtype=dtype), torch.as_tensor(y_np, dtype=torch.long)
    rows = np.arange(len(y))
    path = work / f"{name}_{seed}.zarr"
    exact = ExactSelfInfluence(x, y)
    fit_s, model = fit(p, x, y, rows, seed, [GradientCapture(str(path), mode="overwrite"), exact])
    store = open_store(path)
    start = time.perf_counter()
    sus = store.suspects()
    suspects_s = time.perf_counter() - start
    order = np.argsort(sus.ids)
    si = store.self_influence()
    scores = {
        "suspects": sus.scores[order],
        "self_influence": np.asarray(si.scores),
        "loss_mean": model.losses.mean(0),
        "loss_sum": model.losses.sum(0),
        "aum": -model.margins.mean(0),
        "exact_tracin": exact.scores,
    }
    stored_loss = np.nanmean(
        [store.row_field(e, "loss")[np.argsort(store.sample_ids(e))] for e in store.epochs], 0
    )
    clean_s = None
    if cleanlab:
        try:
            probs = np.full((len(y), p.classes), np.nan)
            start = time.perf_counter()
            folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
            for k, (train_rows, held) in enumerate(folds.split(np.zeros(len(y)), y_np)):
                _, m = fit(p, x, y, train_rows, seed + 1000 * (k + 1), [])
                probs[held] = m.probabilities(x[held])
            from cleanlab.rank import get_label_quality_scores

            scores["cleanlab"] = 1.0 - get_label_quality_scores(y_np, probs)
            clean_s = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a result
            print(f"  cleanlab failed: {type(exc).__name__}: {exc}", flush=True)
    if dump is not None:  # every score by id, to study combinations without training again
        dump.mkdir(parents=True, exist_ok=True)
        arrays = {f"signal_{n}": v for n, v in _signals(sus, order).items()}
        arrays.update({f"detector_{d}": v for d, v in scores.items()})
        arrays.update(epoch_losses=model.losses, epoch_margins=model.margins)  # (epochs, samples)
        arrays.update(labels=y_np)  # the labels trained on, flips included
        arrays.update(_layer_inputs(store))  # features_<i>: (samples, width) of each layer, by id
        np.savez(dump / f"{name}_{seed}.npz", flipped=flipped, **arrays)
    with torch.no_grad():
        model.net.eval()
        acc = float((model.net(torch.as_tensor(x_test_np, dtype=dtype)).argmax(1).numpy() == y_test).mean())
    return {
        "seed": seed,
        "flipped": int(flipped.sum()),
        "test_accuracy": acc,
        "fit_s": fit_s,
        "suspects_s": suspects_s,
        "cleanlab_extra_s": clean_s,
        "stored_vs_recorded_loss_max_diff": float(np.nanmax(np.abs(stored_loss - model.losses.mean(0)))),
        "signals": {
            n: dbg.detection(np.nan_to_num(v, nan=np.nanmedian(v)), flipped)
            for n, v in _signals(sus, order).items()
        },
        "detection": {d: dbg.detection(s, flipped) for d, s in scores.items()},
    }


def _layer_inputs(store: Any) -> dict[str, np.ndarray]:
    """The last epoch's stored inputs of each layer the neighbour signal reads, as it compares them
    (``suspects.points``), by id: ``features_<i>`` in layer order."""
    from mstore_lightning.analytics.kernels import as_scan
    from mstore_lightning.analytics.suspects import points

    scan = as_scan(store)
    epoch = store.epochs[-1]
    order = np.argsort(np.asarray(scan.catalog.row_field(epoch, "ids")))
    reps = [r for r in scan.catalog.select(None) if r.input_width is not None]
    return {f"features_{i}": points(scan, epoch, rep).numpy()[order] for i, rep in enumerate(reps)}


def _signals(sus: Any, order: np.ndarray) -> dict[str, np.ndarray]:
    """Each signal of ``suspects()`` alone, as a suspicion score (high = suspicious), by id."""
    from mstore_lightning.analytics.suspects import DIRECTION

    return {n: DIRECTION[n] * v[order] for n, v in sus.signals.items()}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for d in DETECTORS:
        done = [r for r in runs if d in r["detection"]]
        if done:
            out[d] = {
                m: _mean_se([r["detection"][d][m] for r in done]) for m in ("roc_auc", "precision_at_k")
            }
    return out


def _mean_se(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}


def table(results: dict[str, Any]) -> str:
    lines = ["| protocol | " + " | ".join(DETECTORS) + " |", "|---|" + "---|" * len(DETECTORS)]
    for name, r in results.items():
        s = r["summary"]
        best = max(s, key=lambda d: s[d]["roc_auc"]["mean"])
        cells = []
        for d in DETECTORS:
            if d not in s:
                cells.append("-")
                continue
            a, pk = s[d]["roc_auc"], s[d]["precision_at_k"]
            cell = f"{a['mean']:.3f}±{a['se']:.3f} / {pk['mean']:.3f}"
            cells.append(f"**{cell}**" if d == best else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dump", type=Path, default=None, help="a folder for every run's scores by id (.npz)")
    ap.add_argument(
        "--no-cleanlab",
        action="store_true",
        help="leave out cleanlab's 5 extra fits a run (to study signals)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mstore_lightning").setLevel(logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.protocols:
            runs = []
            for seed in seeds:
                r = run(name, PROTOCOLS[name], seed, Path(tmp), args.dump, not args.no_cleanlab)
                runs.append(r)
                print(
                    f"{name} seed {seed}: acc {r['test_accuracy']:.3f}, suspects {r['suspects_s'] * 1e3:.0f} ms; AUC "
                    + ", ".join(f"{d} {m['roc_auc']:.3f}" for d, m in r["detection"].items())
                    + " | signals "
                    + ", ".join(f"{d} {m['roc_auc']:.3f}" for d, m in r["signals"].items()),
                    flush=True,
                )
            results[name] = {"runs": runs, "summary": summarise(runs)}
    print(table(results))
    print(f"machine: {co.machine_info()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "detection",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": co.machine_info(),
        "versions": co.versions(),
        "library_digest": co.library_digest(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "noise_fraction": NOISE,
        "seeds": seeds,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
