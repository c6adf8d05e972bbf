"""Mislabeled-data detection: self-influence from a training run's store against cleanlab and loss baselines.

Two tasks, each with 10% of the training labels flipped uniformly to another class:

- **digits**: scikit-learn's digits, the demo's split; MLP 64-128-128-10, SGD lr 0.1 momentum 0.9, batch 64,
  20 epochs (the model and schedule of ``attribution.py`` and ``benchmarks/analytics.py``);
- **mnist1d**: MNIST-1D generated locally (``mnist1d.data.make_dataset`` with its default arguments:
  4,000 training and 1,000 test sequences of length 40, nothing downloaded); the small CNN of the MNIST-1D
  paper (three Conv1d of 25 channels, stride 2, then Linear 125-10), SGD lr 0.1 momentum 0.9, batch 64,
  10 epochs.

For each seed (model init, shuffling, label noise, and for digits the split) and task, in this order:

1. **plain**: ``Trainer.fit`` without capture. Its ``training_step`` records each sample's loss and margin
   (true-class logit minus the largest other logit) as it trains, which gives the loss baselines at no extra
   training: the last epoch's loss, the mean loss over epochs, and the area under the margin (AUM, low is
   suspicious);
2. **ours**: the same fit with ``GradientCapture`` at its defaults (int8, every layer, every epoch), then
   ``open_store(path).self_influence()``: ``Σ_e lr_e ‖g_i(e)‖²`` over every layer, and from the same
   store over the output layer alone (``self_influence(layers=[...])``);
3. **cleanlab**: 5-fold cross-validated predicted probabilities (stratified folds; 5 extra fits of the same
   model for the same epochs), then ``cleanlab.filter.find_label_issues`` (its flagged set) and
   ``cleanlab.rank.get_label_quality_scores`` (a score for every sample, for ROC-AUC and precision).

Each detector is scored by ROC-AUC against the flipped labels and by precision among its top k, with k the
number flipped. *Time to scores* is every fit a detector needs plus its analysis; *extra* is what it costs
beyond the one ordinary training run (plain fit) a user does anyway. The table gives mean ± std over seeds
and median times.

Torch runs on one thread by default (``--threads``): these networks are small enough that a second
intra-op thread buys little, and on a busy machine its spin-waits made every fit many times slower.

Usage (with the peers installed, see this folder's README)::

    python benchmarks/peers/debugging.py                         # 5 seeds, both tasks, ~4 minutes on 2 cores
    python benchmarks/peers/debugging.py --seeds 0 --epochs-digits 3 --epochs-mnist1d 2 \\
        --out /tmp/debugging.json                                 # smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attribution
import common
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from mstore_lightning import GradientCapture, IndexedDataset, open_store

DEFAULT_OUT = common.RESULTS / "peers_debugging.json"
NOISE_FRACTION = 0.10
NUM_CLASSES = 10
FOLDS = 5


# ------------------------------------------------------------------------------------------ the tasks
@dataclass(frozen=True)
class Data:
    """A task's arrays after label noise; ``flipped`` marks the training samples whose label was changed."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    flipped: np.ndarray


def flip_labels(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flips :data:`NOISE_FRACTION` of ``y`` to a uniformly drawn other class (the demo's scheme).

    Returns:
        ``(noisy labels, boolean mask of the flipped positions)``.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(y), size=round(NOISE_FRACTION * len(y)), replace=False)
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + rng.integers(1, NUM_CLASSES, size=len(chosen))) % NUM_CLASSES
    mask = np.zeros(len(y), dtype=bool)
    mask[chosen] = True
    return noisy, mask


def load_digits(seed: int) -> Data:
    """The demo's digits: split, standardisation and label noise all seeded by ``seed``."""
    demo = attribution.load_demo()
    x_train, y_noisy, x_test, y_test, flipped = demo.load_noisy_digits(seed, scaling="standard")
    mask = np.zeros(len(y_noisy), dtype=bool)
    mask[flipped] = True
    return Data(x_train, y_noisy, x_test, y_test, mask)


def load_mnist1d(seed: int) -> Data:
    """MNIST-1D from its generator with default arguments (its own fixed seed), then seeded label noise.

    ``make_dataset`` builds the data in memory; ``get_dataset`` is avoided because it downloads.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    y = np.asarray(data["y"], dtype=np.int64)
    noisy, mask = flip_labels(y, seed)
    return Data(
        np.asarray(data["x"], dtype=np.float32),
        noisy,
        np.asarray(data["x_test"], dtype=np.float32),
        np.asarray(data["y_test"], dtype=np.int64),
        mask,
    )


def build_cnn() -> nn.Sequential:
    """The MNIST-1D paper's small CNN: Conv1d 1-25 (k5 s2 p1), 25-25 (k3 s2 p1) twice, Linear 125-10."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 25, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(125, NUM_CLASSES),
    )


@dataclass(frozen=True)
class TaskSpec:
    """What defines a task: its data, network and schedule (SGD with momentum, mean cross-entropy)."""

    load: Callable[[int], Data]
    build: Callable[[], nn.Module]
    model: str
    head: str  # the output layer's module name in the store
    lr: float = 0.1
    momentum: float = 0.9
    batch: int = 64


TASKS = {
    "digits": TaskSpec(load_digits, attribution.build_net, "MLP 64-128-128-10", head="net.4"),
    "mnist1d": TaskSpec(
        load_mnist1d, build_cnn, "CNN Conv1d 1-25-25-25 (stride 2) + Linear 125-10", head="net.8"
    ),
}


class Classifier(L.LightningModule):
    """Mean cross-entropy under SGD; records every sample's loss and margin at each epoch as it trains.

    Args:
        net: the network.
        spec: learning rate and momentum.
        n: training-set size (ids are ``0..n-1``).
        epochs: epochs the records cover.
    """

    def __init__(self, net: nn.Module, spec: TaskSpec, n: int, epochs: int) -> None:
        super().__init__()
        self.net, self.spec = net, spec
        self.losses = np.full((epochs, n), np.nan)
        self.margins = np.full((epochs, n), np.nan)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self.net(batch["x"])
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        with torch.no_grad():
            y = batch["y"].unsqueeze(1)
            other = logits.scatter(1, y, float("-inf")).amax(dim=1)
            ids = batch["index"].numpy()
            self.losses[self.current_epoch, ids] = losses.numpy()
            self.margins[self.current_epoch, ids] = (logits.gather(1, y).squeeze(1) - other).numpy()
        return {"loss": losses.mean(), "per_sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.spec.lr, momentum=self.spec.momentum)

    @torch.no_grad()
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax of the network on ``x`` in eval mode."""
        self.net.eval()
        return torch.softmax(self.net(torch.as_tensor(x, dtype=torch.float32)), dim=1).double().numpy()


def fit(
    spec: TaskSpec, data: Data, rows: np.ndarray, epochs: int, seed: int, callbacks: list[L.Callback]
) -> tuple[float, Classifier]:
    """Seeds, then trains a fresh network on the training ``rows`` (global ids kept); returns wall time."""
    L.seed_everything(seed, verbose=False)
    full = IndexedDataset(
        TensorDataset(torch.as_tensor(data.x_train, dtype=torch.float32), torch.as_tensor(data.y_train))
    )
    loader = DataLoader(
        Subset(full, rows.tolist()),
        batch_size=spec.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model = Classifier(spec.build(), spec, len(data.y_train), epochs)
    with warnings.catch_warnings():
        for pattern in attribution.LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        start = time.perf_counter()
        common.quiet_trainer(callbacks, max_epochs=epochs).fit(model, loader)
    return time.perf_counter() - start, model


# --------------------------------------------------------------------------------------- the detectors
def detection(score: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """ROC-AUC and precision at k = #flipped of ``score`` (high = suspicious); NaN scores are refused."""
    if not np.all(np.isfinite(score)):
        raise ValueError(f"{int((~np.isfinite(score)).sum())} scores are not finite")
    return attribution.detection(score, flipped)


def loss_baselines(model: Classifier) -> dict[str, np.ndarray]:
    """The plain run's records as suspicion scores: high loss, low area under the margin."""
    return {
        "loss_last_epoch": model.losses[-1],
        "loss_mean_over_epochs": model.losses.mean(axis=0),
        "aum": -model.margins.mean(axis=0),
    }


def run_ours(spec: TaskSpec, data: Data, epochs: int, seed: int, path: Path) -> dict[str, Any]:
    """The training run with capture at its defaults, then self-influence from a freshly opened store:
    over every layer, and over the output layer alone (``layers=[spec.head]``, same store)."""
    rows = np.arange(len(data.y_train))
    fit_s, model = fit(spec, data, rows, epochs, seed, [GradientCapture(store=str(path), mode="overwrite")])
    out: dict[str, Any] = {"fit_s": fit_s, "analysis_s": {}, "score": {}}
    for name, layers in (("all_layers", None), ("output_layer", [spec.head])):
        start = time.perf_counter()
        ids, scores = open_store(path).self_influence(layers=layers)
        out["analysis_s"][name] = time.perf_counter() - start
        if not np.array_equal(ids, rows):
            raise RuntimeError(f"the store holds ids {ids[:10]}..., not every training sample once")
        out["score"][name] = scores
    store = open_store(path)
    if spec.head not in store.layers:
        raise RuntimeError(f"{spec.head!r} is not among the captured layers {store.layers}")
    return {**out, "layers": store.layers, "store_bytes": store.nbytes_stored(), "losses": model.losses}


def run_cleanlab(spec: TaskSpec, data: Data, epochs: int, seed: int) -> dict[str, Any]:
    """5-fold cross-validated predicted probabilities, then cleanlab's label issues and quality scores."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    n = len(data.y_train)
    probs = np.full((n, NUM_CLASSES), np.nan)
    fold_s = []
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    for k, (train_rows, held_out) in enumerate(folds.split(np.zeros(n), data.y_train)):
        wall, model = fit(spec, data, train_rows, epochs, seed + 1000 * (k + 1), [])
        start = time.perf_counter()
        probs[held_out] = model.probabilities(data.x_train[held_out])
        fold_s.append(wall + time.perf_counter() - start)
    start = time.perf_counter()
    issues = find_label_issues(data.y_train, probs)
    quality = get_label_quality_scores(data.y_train, probs)
    analysis_s = time.perf_counter() - start
    flagged = int(issues.sum())
    hits = int((issues & data.flipped).sum())
    return {
        "fold_fit_s": fold_s,
        "fit_s": float(sum(fold_s)),
        "analysis_s": analysis_s,
        "score": 1.0 - quality,
        "find_label_issues": {
            "flagged": flagged,
            "precision": hits / flagged if flagged else float("nan"),
            "recall": hits / int(data.flipped.sum()),
        },
        "cv_accuracy_on_noisy_labels": float((probs.argmax(1) == data.y_train).mean()),
    }


def run_seed(name: str, spec: TaskSpec, epochs: int, seed: int, workdir: Path) -> dict[str, Any]:
    """Plain fit, capture fit and cleanlab's folds for one seed; every detector scored."""
    data = spec.load(seed)
    rows = np.arange(len(data.y_train))
    plain_s, model = fit(spec, data, rows, epochs, seed, [])
    pred = model.probabilities(data.x_test).argmax(1)
    ours = run_ours(spec, data, epochs, seed, workdir / f"{name}_{seed}.zarr")
    try:
        clean = run_cleanlab(spec, data, epochs, seed)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a result
        clean = {"failure": f"{type(exc).__name__}: {exc}"}
        print(f"  cleanlab failed: {clean['failure']}", flush=True)
    # Same seed, same batches: a capture that leaves training alone reproduces the plain run's losses.
    drift = float(np.abs(ours.pop("losses") - model.losses).max())
    ours_scores = ours.pop("score")
    scores = {
        "ours_self_influence": ours_scores["all_layers"],
        "ours_self_influence_output_layer": ours_scores["output_layer"],
        **({"cleanlab": clean.pop("score")} if "score" in clean else {}),
        **loss_baselines(model),
    }
    times = {
        **{
            f"ours_self_influence{suffix}": {
                "fits": 1,
                "to_scores_s": ours["fit_s"] + ours["analysis_s"][part],
            }
            for suffix, part in (("", "all_layers"), ("_output_layer", "output_layer"))
        },
        **(
            {"cleanlab": {"fits": FOLDS, "to_scores_s": clean["fit_s"] + clean["analysis_s"]}}
            if "fit_s" in clean
            else {}
        ),
        **{
            b: {"fits": 1, "to_scores_s": plain_s}
            for b in ("loss_last_epoch", "loss_mean_over_epochs", "aum")
        },
    }
    for detector, t in times.items():
        # The ordinary training run happens anyway: the capture run stands in for it (so does the plain run
        # that records the losses), while cleanlab's folds come on top of it.
        t["extra_s"] = t["to_scores_s"] if detector == "cleanlab" else t["to_scores_s"] - plain_s
    return {
        "seed": seed,
        "train": len(rows),
        "flipped": int(data.flipped.sum()),
        "plain_fit_s": plain_s,
        "capture_vs_plain_max_loss_diff": drift,
        "test_accuracy": float((pred == data.y_test).mean()),
        "ours": ours,
        "cleanlab": clean,
        "times": times,
        "detection": {d: detection(s, data.flipped) for d, s in scores.items()},
    }


def bench_task(name: str, epochs: int, seeds: list[int], workdir: Path) -> dict[str, Any]:
    """Warms up, then runs every seed of one task and summarises."""
    spec = TASKS[name]
    print(f"{name}: {spec.model}, {epochs} epochs, seeds {seeds}", flush=True)
    warm = spec.load(seeds[0])
    capture = GradientCapture(store=str(workdir / f"{name}_warmup.zarr"), mode="overwrite")
    fit(spec, warm, np.arange(len(warm.y_train)), 1, seeds[0], [capture])  # imports, allocator, file cache
    runs = []
    for seed in seeds:
        r = run_seed(name, spec, epochs, seed, workdir)
        runs.append(r)
        print(
            f"  seed {seed}: plain {r['plain_fit_s']:.1f} s (test acc {r['test_accuracy']:.3f}), "
            f"capture {r['ours']['fit_s']:.1f} + {r['ours']['analysis_s']['all_layers'] * 1e3:.0f} ms, "
            f"cleanlab {r['cleanlab']['fit_s']:.1f} + {r['cleanlab']['analysis_s']:.2f} s; AUC "
            + ", ".join(f"{d} {m['roc_auc']:.3f}" for d, m in r["detection"].items()),
            flush=True,
        )
    summary = {}
    for d in LABELS:
        done = [r for r in runs if d in r["detection"]]  # a peer that failed on a seed is left out of it
        if not done:
            continue
        summary[d] = {
            **{m: _mean_std([r["detection"][d][m] for r in done]) for m in ("roc_auc", "precision_at_k")},
            "seeds": [r["seed"] for r in done],
            "fits": done[0]["times"][d]["fits"],
            "to_scores_s_median": statistics.median(r["times"][d]["to_scores_s"] for r in done),
            "extra_s_median": statistics.median(r["times"][d]["extra_s"] for r in done),
        }
    return {
        "model": spec.model,
        "optimizer": f"SGD lr {spec.lr} momentum {spec.momentum}, batch {spec.batch}, mean cross-entropy",
        "epochs": epochs,
        "noise_fraction": NOISE_FRACTION,
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "test_accuracy": _mean_std([r["test_accuracy"] for r in runs]),
        "plain_fit_s_median": statistics.median(r["plain_fit_s"] for r in runs),
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


# -------------------------------------------------------------------------------------------- report
LABELS = {
    "ours_self_influence": "ours: self-influence (int8 store)",
    "ours_self_influence_output_layer": "ours: self-influence, output layer",
    "cleanlab": "cleanlab, 5-fold CV",
    "loss_last_epoch": "loss, last epoch",
    "loss_mean_over_epochs": "loss, mean over epochs",
    "aum": "area under the margin",
}


def format_table(results: dict[str, Any], machine: dict[str, Any]) -> str:
    """Per task, one line per detector: ROC-AUC and precision (mean ± std over seeds), fits and times."""
    lines = [
        (
            f"measured on {machine['cpu_model']}, {machine['cpu_count']} cores, "
            f"torch threads {machine['torch_threads']}"
        )
    ]
    for name, r in results.items():
        run0 = r["runs"][0]
        lines += [
            "",
            (
                f"{name}: {r['model']}, {r['epochs']} epochs, {run0['train']:,} training samples, "
                f"{run0['flipped']} "
                f"flipped; {len(r['seeds'])} seed(s); test accuracy {r['test_accuracy']['mean']:.3f}; "
                f"plain fit {r['plain_fit_s_median']:.1f} s"
            ),
        ]
        head = f"  {'detector':<36} {'ROC-AUC':>15} {'precision@' + str(run0['flipped']):>15} {'fits':>4} "
        head += f"{'to scores s':>11} {'extra s':>8}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for d, s in r["summary"].items():
            auc, prec = s["roc_auc"], s["precision_at_k"]
            lines.append(
                f"  {LABELS[d]:<36} {auc['mean']:>7.4f} ± {auc['std']:.4f} "
                f"{prec['mean']:>7.3f} ± {prec['std']:.3f} "
                f"{s['fits']:>4} {s['to_scores_s_median']:>11.1f} {s['extra_s_median']:>8.1f}"
            )
        flagged = [
            x["cleanlab"]["find_label_issues"] for x in r["runs"] if "find_label_issues" in x["cleanlab"]
        ]
        if flagged:
            lines.append(
                "  cleanlab find_label_issues flags "
                f"{np.mean([f['flagged'] for f in flagged]):.0f} samples: precision "
                f"{np.mean([f['precision'] for f in flagged]):.3f}, "
                f"recall {np.mean([f['recall'] for f in flagged]):.3f}"
            )
        for x in r["runs"]:
            if "failure" in x["cleanlab"]:
                lines.append(f"  cleanlab failed on seed {x['seed']}: {x['cleanlab']['failure']}")
        drift = max(x["capture_vs_plain_max_loss_diff"] for x in r["runs"])
        lines.append(f"  capture run vs plain run, largest per-sample loss difference: {drift:.1e}")
        store = statistics.median(x["ours"]["store_bytes"] for x in r["runs"])
        lines.append(f"  store of the capture run: {store / 1e6:.1f} MB")
    lines.append(
        "\nto scores: every fit a detector needs plus its analysis (medians); extra: beyond the one ordinary "
        "training run. The loss baselines are recorded by the plain run's training_step."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--epochs-digits", type=int, default=20, help="training epochs on digits")
    parser.add_argument("--epochs-mnist1d", type=int, default=10, help="training epochs on MNIST-1D")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads: 1 by default, see the module docstring"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        parser.error(f"--tasks takes a comma-separated subset of {list(TASKS)}; got {unknown or 'nothing'}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers; got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if min(args.epochs_digits, args.epochs_mnist1d, args.threads) < 1:
        parser.error("--epochs-digits, --epochs-mnist1d and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the tasks, prints the table and writes the JSON report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    header = common.report_header(
        "peers_debugging", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    )
    machine = header["machine"]
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}, "
        f"load {machine['load_average']}",
        flush=True,
    )
    epochs = {"digits": args.epochs_digits, "mnist1d": args.epochs_mnist1d}
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mstore-peers-debugging-") as tmp:
        for name in args.tasks:
            results[name] = bench_task(name, epochs[name], args.seeds, Path(tmp))
    header["machine"]["load_average_end"] = list(os.getloadavg())
    print()
    print(format_table(results, machine))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s")
    common.write_json(args.out, {**header, "total_s": total, "tasks": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
