"""TracIn and self-influence from the store against Captum ``TracInCP`` and dattri's ``TracInAttributor``.

The digits protocol of ``benchmarks/analytics.py`` with the demo's standardised pixels (its
``--scaling standard``): scikit-learn's digits with the demo's split and 10% of the training labels
flipped, an MLP 64-128-128-10 (SGD lr 0.1, momentum 0.9, batch 64, 20 epochs). One
``Trainer.fit`` carries every arm, so all of them see the same weights:

- a callback saving the network's weights and learning rate at the end of each checkpoint epoch (what the
  peers read; by default 10 checkpoints, every other epoch from 1 to 19);
- ``GradientCapture`` with ``timing="checkpoint"`` on those epochs, at fp32 (lossless) and at int8 (the
  default precision): one pass over the training set at each checkpoint epoch's end with that epoch's
  final weights, and the held-out queries (``query=``) after it. This is TracInCP's definition, so the
  fp32 store must give the peers' numbers to float tolerance;
- ``GradientCapture`` at int8 with the default ``timing="during"``: each row with the weights of its own
  step, TracIn's "during training" form, which only approximates TracInCP.

Every method scores every parameter of the network (all three Linear layers, weights and biases), the
same 1,437 training samples and the same ``--queries`` held-out queries (all 360 by default), with each
checkpoint weighted by its learning rate: TracIn ``Σ_c lr_c ⟨g_train(c), g_query(c)⟩`` and self-influence
``Σ_c lr_c ‖g(c)‖²``.

- **Ours**: ``open_store(path).tracin(queries)`` and ``.self_influence()``, each on a freshly opened store.
  Training is not counted (the store is a by-product of it); the capture's cost is measured apart, as
  ``Trainer.fit`` with each capture against ``Trainer.fit`` with only the checkpoint saver.
- **Captum** ``TracInCP`` with its fast path (``sample_wise_grads_per_batch=True``, a sum-reduced loss,
  ``self_influence(outer_loop_by_checkpoints=True)``), and once with its defaults (a per-example loop).
- **dattri** ``TracInAttributor`` exact (``proj_type="identity"``) and with its default 512-dimensional
  random projection.

Peers' times include loading the checkpoints and computing every per-sample gradient. All methods are
timed in rounds (ours fp32, ours int8, ours during, Captum, dattri exact, dattri projected, Captum's
defaults, then again), medians reported; the two slowest, dattri projected and Captum's defaults, run in
the first round only. Agreement is Pearson and
Spearman correlation of the scores and top-k overlap, between every pair of methods.

Torch runs on one thread by default (``--threads``): these networks are small enough that a second
intra-op thread buys little, and on a busy machine its spin-waits made every fit many times slower.

Usage (with the peers installed, see this folder's README)::

    python benchmarks/peers/attribution.py                                  # about 8 minutes on 2 cores
    python benchmarks/peers/attribution.py --epochs 4 --checkpoints 2 --queries 20 --rounds 1 \\
        --overhead-rounds 1 --no-captum-default --out /tmp/attribution.json      # smoke run, ~1 minute
"""

from __future__ import annotations

import os

# dattri and Captum report progress through tqdm; a benchmark's output is its table.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import gc
import importlib.util
import itertools
import logging
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from mstore_lightning import GradientCapture, open_store

DEMO = common.REPO / "example_projects" / "digits" / "train.py"
DEFAULT_OUT = common.RESULTS / "peers_attribution.json"

SEED = 0
LR = 0.1
MOMENTUM = 0.9
BATCH = 64
TOP_K = 10  # proponents compared per query
# fp32 store vs a peer's exact scores: float32 sums over ~26,000 parameters agree to ~1e-6 (measured
# 1e-7 to 4e-7); a wrong gradient, learning rate or checkpoint is off by far more.
EXACT_TOLERANCE = 1e-4
LIGHTNING_NOISE = (".*does not have many workers.*", ".*LeafSpec.*", ".*GPU available but not used.*")
# dattri's default projector, spelled out: its constructor updates one module-level dict in place, so
# kwargs left out would be inherited from the previous attributor.
DATTRI_PROJECTED = {
    "proj_dim": 512,
    "proj_max_batch_size": 32,
    "proj_seed": 0,
    "device": "cpu",
    "proj_type": "normal",
}
DATTRI_EXACT = {**DATTRI_PROJECTED, "proj_type": "identity"}


# ----------------------------------------------------------------------------------------- the task
def load_demo() -> Any:
    """The digits demo as a module: its split, label noise and dataset, so the protocols cannot drift."""
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_net() -> nn.Sequential:
    """MLP 64-128-128-10 with ReLU: the network every method scores (a fresh copy for each peer)."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class DigitsNet(L.LightningModule):
    """:func:`build_net` under mean cross-entropy and SGD with momentum; returns per-sample losses too."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")
        return {"loss": losses.mean(), "per_sample_loss": losses.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class EpochCheckpoints(L.Callback):
    """Saves ``pl_module.net``'s weights and the learning rate at the end of the chosen epochs.

    The files hold ``{"state_dict": ..., "learning_rate": lr}``: what Captum's and dattri's loaders read.

    Args:
        folder: where ``epoch_XXX.pt`` files go.
        epochs: 0-based epochs to save.
    """

    def __init__(self, folder: Path, epochs: list[int]) -> None:
        self.folder = folder
        self.epochs = set(epochs)
        self.saved: list[tuple[int, Path, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        path = self.folder / f"epoch_{epoch:03d}.pt"
        torch.save({"state_dict": pl_module.net.state_dict(), "learning_rate": lr}, path)
        self.saved.append((epoch, path, lr))


def load_checkpoint(model: nn.Module, path: str | Path) -> float:
    """Captum's ``checkpoints_load_func``: loads the weights into ``model`` and returns the learning rate."""
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    return float(ckpt["learning_rate"])


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """``count`` evenly spaced 0-based epochs ending with the last one (20, 5 -> 3, 7, 11, 15, 19)."""
    step = epochs / count
    return sorted({round(epochs - 1 - i * step) for i in range(count)})


def capture(
    path: Path, precision: str, timing: str, epochs: list[int], queries: DataLoader
) -> GradientCapture:
    """A capture of every layer of the chosen epochs, with the queries captured at each epoch's end."""
    policy = {
        "layers": ["*"],
        "precision": precision,
        "loss_reduction": "mean",
        "timing": timing,
        "epochs": epochs,
    }
    return GradientCapture(store=str(path), policy=policy, mode="overwrite", query=queries)


STORES = {  # arm name -> (precision, timing)
    "ours_fp32": ("fp32", "checkpoint"),
    "ours_int8": ("int8", "checkpoint"),
    "ours_int8_during": ("int8", "during"),
}


class Task:
    """The noisy digits, their loaders, and what every arm needs to build its own training run.

    Args:
        epochs: training epochs.
        checkpoints: checkpoint epochs (0-based).
        queries: held-out samples used as TracIn queries (the first ones of the test split).
    """

    def __init__(self, epochs: int, checkpoints: list[int], queries: int) -> None:
        demo = load_demo()
        # Standardised, as the committed peers results were measured (analytics.py now divides by 16).
        x_train, y_train, x_test, y_test, flipped = demo.load_noisy_digits(SEED, scaling="standard")
        self.epochs, self.checkpoints = epochs, checkpoints
        self.train_set = demo.DigitsDataset(x_train, y_train)
        self.query_set = demo.DigitsDataset(x_test[:queries], y_test[:queries])
        self.flipped = np.zeros(len(y_train), dtype=bool)
        self.flipped[flipped] = True
        self.n_train, self.n_queries = len(y_train), len(self.query_set)

    def loader(self) -> DataLoader:
        """The shuffled training loader, seeded: every run sees the same batches."""
        return DataLoader(
            self.train_set, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED)
        )

    def query_loader(self) -> DataLoader:
        return DataLoader(self.query_set, batch_size=BATCH)

    def fit(self, callbacks: list[L.Callback]) -> tuple[float, list[str]]:
        """Seeds, builds the model and runs ``Trainer.fit``; returns its wall time and the warnings raised."""
        L.seed_everything(SEED, verbose=False)
        model, loader = DigitsNet(), self.loader()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for pattern in LIGHTNING_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            start = time.perf_counter()
            common.quiet_trainer(callbacks, max_epochs=self.epochs).fit(model, loader)
            wall = time.perf_counter() - start
        return wall, list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))


# --------------------------------------------------------------------------------------- the methods
def ours(path: Path, queries: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """TracIn and self-influence from a store, each on a freshly opened store (so opening is timed)."""

    def tracin() -> np.ndarray:
        ids, scores = open_store(path).tracin(queries)
        return _by_id(ids, scores)

    def self_influence() -> np.ndarray:
        ids, scores = open_store(path).self_influence()
        return _by_id(ids, scores)

    return {"tracin": tracin, "self_influence": self_influence}


def _by_id(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Scores in the order of ids ``0..n-1``; the store returns them keyed by ascending id."""
    if not np.array_equal(ids, np.arange(len(ids))):
        raise RuntimeError(f"the store's training ids are not 0..{len(ids) - 1}: {ids[:10]}...")
    return np.asarray(scores, dtype=np.float64)


def tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """A digits dataset's ``(x, y)`` as two tensors, in dataset order."""
    return dataset.x, dataset.y


def captum(task: Task, paths: list[Path], batch: int, fast: bool) -> dict[str, Callable[[], np.ndarray]]:
    """Captum ``TracInCP`` on the saved checkpoints, over all parameters.

    Args:
        fast: ``sample_wise_grads_per_batch=True`` with a sum-reduced loss (its per-batch per-sample
            gradients) and checkpoints as the outer loop of self-influence; otherwise its defaults, a
            per-example loss and gradient loop.
    """
    from captum.influence import TracInCP

    x, y = tensors(task.train_set)
    xq, yq = tensors(task.query_set)

    def make() -> Any:
        return TracInCP(
            build_net(),
            TensorDataset(x, y),
            [str(p) for p in paths],
            checkpoints_load_func=load_checkpoint,
            loss_fn=nn.CrossEntropyLoss(reduction="sum" if fast else "none"),
            batch_size=batch,
            sample_wise_grads_per_batch=fast,
        )

    def tracin() -> np.ndarray:
        return make().influence((xq, yq)).double().numpy()

    def self_influence() -> np.ndarray:
        return make().self_influence(outer_loop_by_checkpoints=fast).double().numpy()

    return {"tracin": tracin, "self_influence": self_influence}


def dattri(
    task: Task, paths: list[Path], lrs: list[float], batch: int, projector: dict[str, Any]
) -> dict[str, Callable[[], np.ndarray]]:
    """dattri's ``TracInAttributor`` on the saved checkpoints, over all parameters.

    Args:
        projector: its ``projector_kwargs``; ``proj_type="identity"`` for exact gradients.
    """
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    train = DataLoader(TensorDataset(*tensors(task.train_set)), batch_size=batch, shuffle=False)
    test = DataLoader(TensorDataset(*tensors(task.query_set)), batch_size=task.n_queries, shuffle=False)

    def make() -> Any:
        net = build_net()

        def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            xi, yi = data
            return F.cross_entropy(
                torch.func.functional_call(net, params, (xi.unsqueeze(0),)), yi.unsqueeze(0)
            )

        def load(model: nn.Module, path: str) -> nn.Module:
            load_checkpoint(model, path)
            return model.eval()

        task_ = AttributionTask(
            loss_func=loss, model=net, checkpoints=[str(p) for p in paths], checkpoints_load_func=load
        )
        return TracInAttributor(
            task_, weight_list=torch.tensor(lrs), normalized_grad=False, projector_kwargs=dict(projector)
        )

    def tracin() -> np.ndarray:
        return make().attribute(train, test).T.double().numpy()  # (train, test) -> (test, train)

    def self_influence() -> np.ndarray:
        return make().self_attribute(train).double().numpy()

    return {"tracin": tracin, "self_influence": self_influence}


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and process-CPU seconds of ``fn()`` and its result; garbage is collected first."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


# ------------------------------------------------------------------------------------------ agreement
def rankdata_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as Spearman needs."""
    return np.apply_along_axis(stats.rankdata, -1, a)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean over rows of ``|top_k(a) ∩ top_k(b)| / k`` (largest scores)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(ta, tb)]))


def agreement(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, float]:
    """How well scores ``a`` reproduce reference scores ``b`` (same shape: (n,) or (queries, n)).

    Returns:
        ``pearson`` over all entries; ``spearman``, the mean over rows of the rank correlation across
        training samples; ``top_k_overlap`` (mean over rows); ``max_rel_err``, ``max|a-b| / max|b|``.
    """
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    ra, rb = rankdata_rows(a2), rankdata_rows(b2)
    spearman = [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(ra, rb)]
    return {
        "pearson": float(np.corrcoef(a2.ravel(), b2.ravel())[0, 1]),
        "spearman": float(np.mean(spearman)),
        "top_k": k,
        "top_k_overlap": top_overlap(a2, b2, k),
        "max_rel_err": float(np.abs(a2 - b2).max() / np.abs(b2).max()),
    }


def detection(score: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """ROC-AUC of ``score`` as a flipped-label detector and precision among its top ``#flipped``."""
    k = int(flipped.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return {"roc_auc": float(roc_auc_score(flipped, score)), "precision_at_k": float(flipped[top].mean())}


# ------------------------------------------------------------------------------------------- the runs
def capture_runs(task: Task, workdir: Path) -> dict[str, Any]:
    """One fit with the checkpoint saver and every store: all arms get the same weights."""
    saver = EpochCheckpoints(workdir, task.checkpoints)
    paths = {name: workdir / f"{name}.zarr" for name in STORES}
    callbacks = [saver] + [
        capture(paths[name], precision, timing, task.checkpoints, task.query_loader())
        for name, (precision, timing) in STORES.items()
    ]
    fit_s, messages = task.fit(callbacks)
    return {"stores": paths, "checkpoints": saver.saved, "fit_s": fit_s, "fit_warnings": messages}


def overhead(task: Task, rounds: int, workdir: Path) -> dict[str, Any]:
    """``Trainer.fit`` with each capture alone against the fit that only saves checkpoints, in rounds.

    The plain arm keeps the checkpoint saver: that is the training the peers need. Each round runs every
    arm once (plain, then each capture), after one warm-up round.
    """
    fits = itertools.count()

    def fresh(name: str) -> Path:
        # A new store each time, as a new run makes: overwriting the last one would time its deletion too.
        return workdir / f"overhead_{name}_{next(fits)}.zarr"

    arms: dict[str, Callable[[], list[L.Callback]]] = {
        "plain_with_checkpoints": lambda: [EpochCheckpoints(workdir / "plain", task.checkpoints)],
        **{
            name: (
                lambda name=name, p=p, t=t: [
                    capture(fresh(name), p, t, task.checkpoints, task.query_loader())
                ]
            )
            for name, (p, t) in STORES.items()
        },
    }
    (workdir / "plain").mkdir(exist_ok=True)
    for make in arms.values():  # warm-up: imports, allocator, file cache
        task.fit(make())
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(rounds):
        for name, make in arms.items():
            times[name].append(task.fit(make())[0])
        print(
            f"  overhead round {i + 1}/{rounds}: "
            + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
            flush=True,
        )
    plain = times["plain_with_checkpoints"]
    return {
        "fit_s": times,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "ratio_median": {
            n: statistics.median([a / b for a, b in zip(t, plain)])
            for n, t in times.items()
            if n != "plain_with_checkpoints"
        },
    }


def run_methods(
    methods: dict[str, dict[str, Callable[[], np.ndarray]]], rounds: int, once: set[str]
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Runs every method's TracIn and self-influence in rounds; a method that fails is dropped with why.

    Args:
        methods: name -> {"tracin": fn, "self_influence": fn}.
        rounds: timed rounds.
        once: methods run in the first round only (too slow to repeat).

    Returns:
        ``(timings, scores, failures)``: per method and operation the wall and CPU seconds of each round,
        the scores of the last run, and the error of each method that could not run.
    """
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    failures: dict[str, str] = {}
    for r in range(rounds):
        for name, ops in methods.items():
            if name in failures or (r > 0 and name in once):
                continue
            for op, fn in ops.items():
                try:
                    wall, cpu, out = timed(fn)
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a result
                    failures[name] = f"{op}: {type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    break
                t = times.setdefault(name, {}).setdefault(op, {"wall": [], "cpu": []})
                t["wall"].append(wall)
                t["cpu"].append(cpu)
                scores.setdefault(name, {})[op] = out
            if name in times and name not in failures:
                done = times[name]
                print(
                    f"  round {r + 1}/{rounds} {name}: "
                    + ", ".join(f"{op} {d['wall'][-1]:.3f} s" for op, d in done.items()),
                    flush=True,
                )
    return times, scores, failures


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Captures, times every method, and compares their scores."""
    checkpoints = checkpoint_epochs(args.epochs, args.checkpoints)
    task = Task(args.epochs, checkpoints, args.queries)
    print(
        f"digits: {task.n_train} training samples ({int(task.flipped.sum())} flipped), "
        f"{task.n_queries} queries, "
        f"{args.epochs} epochs, checkpoints at epochs {checkpoints}",
        flush=True,
    )
    run = capture_runs(task, workdir)
    paths = [p for _, p, _ in run["checkpoints"]]
    lrs = [lr for _, _, lr in run["checkpoints"]]
    print(f"  capture fit {run['fit_s']:.1f} s (every store at once)", flush=True)
    for name, path in run["stores"].items():
        store = open_store(path)
        if store.epochs != checkpoints or not all(
            np.isclose(store.lr(e), lr) for e, lr in zip(checkpoints, lrs)
        ):
            raise RuntimeError(
                f"{name}: epochs {store.epochs} / lrs differ from the checkpoints {checkpoints} {lrs}"
            )

    queries = np.arange(task.n_queries)
    methods = {name: ours(path, queries) for name, path in run["stores"].items()}
    methods["captum"] = captum(task, paths, args.peer_batch, fast=True)
    methods["dattri_exact"] = dattri(task, paths, lrs, args.peer_batch, DATTRI_EXACT)
    methods["dattri_projected"] = dattri(task, paths, lrs, args.peer_batch, DATTRI_PROJECTED)
    once = {"dattri_projected"} if args.dattri_projected_once else set()
    if args.captum_default:
        methods["captum_default"] = captum(task, paths, args.peer_batch, fast=False)
        once.add("captum_default")
    times, scores, failures = run_methods(methods, args.rounds, once)

    print("  capture overhead (fit with capture / fit saving checkpoints):", flush=True)
    cost = overhead(task, args.overhead_rounds, workdir)

    names = [n for n in methods if n in scores and len(scores[n]) == 2]
    k_self = int(task.flipped.sum())
    agree = {
        op: {
            a: {
                b: agreement(scores[a][op], scores[b][op], TOP_K if op == "tracin" else k_self) for b in names
            }
            for a in names
        }
        for op in ("tracin", "self_influence")
    }
    return {
        "protocol": {
            "data": "scikit-learn digits, the demo's split (80/20 stratified, seed 0), 10% of training "
            "labels "
            "flipped uniformly to another class",
            "model": "MLP 64-128-128-10, ReLU, mean cross-entropy, SGD lr 0.1 momentum 0.9, batch 64, "
            "shuffled, seed 0",
            "epochs": args.epochs,
            "checkpoint_epochs": checkpoints,
            "learning_rates": lrs,
            "train": task.n_train,
            "queries": task.n_queries,
            "flipped": int(task.flipped.sum()),
            "layers": "all parameters of all three Linear layers (weights and biases), for every method",
            "peer_batch": args.peer_batch,
            "tracin": "sum over checkpoints c of lr_c <g_train(c), g_query(c)>, g the gradient of the "
            "sample's "
            "own cross-entropy at checkpoint c's weights",
            "self_influence": "sum over checkpoints c of lr_c ||g(c)||^2",
            "stores": {n: {"precision": p, "timing": t} for n, (p, t) in STORES.items()},
            "dattri_projector": {"dattri_exact": DATTRI_EXACT, "dattri_projected": DATTRI_PROJECTED},
        },
        "capture_fit": {"fit_s": run["fit_s"], "fit_warnings": run["fit_warnings"]},
        "store_bytes": {n: open_store(p).nbytes_stored() for n, p in run["stores"].items()},
        "capture_overhead": cost,
        "timings_s": times,
        "median_s": {
            n: {op: statistics.median(d["wall"]) for op, d in ops.items()} for n, ops in times.items()
        },
        "ratio_to_ours_fp32": ratios_to(times, "ours_fp32"),
        "once": sorted(once),
        "failures": failures,
        "agreement": agree,
        "detection_self_influence": {n: detection(scores[n]["self_influence"], task.flipped) for n in names},
        "checks": exactness_checks(agree),
    }


def ratios_to(times: dict[str, Any], base: str) -> dict[str, dict[str, float]]:
    """Per method and operation, the median over rounds of its time over ``base``'s time in the same
    round; a method run once is set against ``base``'s first round."""
    if base not in times:
        return {}
    return {
        name: {
            op: statistics.median(a / b for a, b in zip(d["wall"], times[base][op]["wall"]))
            for op, d in ops.items()
        }
        for name, ops in times.items()
    }


def exactness_checks(agree: dict[str, Any]) -> dict[str, Any]:
    """The fp32 store against each exact peer, which computes its own per-sample gradients: both scores
    must agree to :data:`EXACT_TOLERANCE` (largest error over the largest score). A peer that did not run
    is left out."""
    out = {}
    for peer in ("captum", "dattri_exact", "captum_default"):
        if peer not in agree["tracin"].get("ours_fp32", {}):
            continue
        for op in ("tracin", "self_influence"):
            err = agree[op]["ours_fp32"][peer]["max_rel_err"]
            out[f"ours_fp32_vs_{peer}_{op}"] = {"max_rel_err": err, "ok": bool(err < EXACT_TOLERANCE)}
    return out


# -------------------------------------------------------------------------------------------- report
LABELS = {
    "ours_fp32": "ours, fp32 store (TracInCP)",
    "ours_int8": "ours, int8 store (TracInCP)",
    "ours_int8_during": "ours, int8, timing=during",
    "captum": "Captum TracInCP (per-batch grads)",
    "captum_default": "Captum TracInCP (defaults, loop)",
    "dattri_exact": "dattri TracIn, no projection",
    "dattri_projected": "dattri TracIn, 512-d projection",
}


def format_table(r: dict[str, Any], machine: dict[str, Any]) -> str:
    """The headline numbers: per method its times and its agreement with Captum and with ours at fp32."""
    p = r["protocol"]
    lines = [
        (
            f"measured on {machine['cpu_model']}, {machine['cpu_count']} cores, "
            f"torch threads {machine['torch_threads']}"
        ),
        (
            f"TracIn of {p['train']:,} training samples on {p['queries']} queries and self-influence, "
            f"{len(p['checkpoint_epochs'])} checkpoints (epochs {p['checkpoint_epochs']}), all layers"
        ),
        "",
    ]
    ref = "captum" if "captum" in r["agreement"]["tracin"] else "ours_fp32"
    ratio = r["ratio_to_ours_fp32"]
    head = f"{'method':<34} {'TracIn s':>9} {'x ours':>7} {'self-inf s':>10} {'x ours':>7} |"
    head += f" {'TracIn ρ':>8} {'top10':>5} {'self ρ':>7} {'top' + str(p['flipped']):>6} | {'AUC':>5}"
    lines += [f"{'':<71}| agreement with {ref:<17}|", head, "-" * len(head)]
    for name, label in LABELS.items():
        if name in r["failures"]:
            lines.append(f"{label:<34} failed: {r['failures'][name][:100]}")
            continue
        if name not in r["median_s"]:
            continue
        med, x = (
            r["median_s"][name],
            ratio.get(name, {"tracin": float("nan"), "self_influence": float("nan")}),
        )
        tr, si = r["agreement"]["tracin"][name][ref], r["agreement"]["self_influence"][name][ref]
        row = (
            f"{label:<34} {med['tracin']:>9.3f} {x['tracin']:>7.2f} {med['self_influence']:>10.3f} "
            f"{x['self_influence']:>7.2f} | {tr['spearman']:>8.5f} {tr['top_k_overlap']:>5.3f} "
            f"{si['spearman']:>7.5f} {si['top_k_overlap']:>6.3f} | "
            f"{r['detection_self_influence'][name]['roc_auc']:>5.3f}"
        )
        lines.append(row + ("  (1 run)" if name in r["once"] else ""))
    lines.append(
        "x ours: time over ours at fp32, median of per-round ratios; ρ: Spearman (TracIn: mean over "
        f"queries); top10 / top{p['flipped']}: overlap of the 10 strongest proponents per query / of the "
        f"{p['flipped']} most self-influential samples; AUC: self-influence as a flipped-label detector; "
        "every pair of methods is in the JSON"
    )
    for name, c in r["checks"].items():
        verdict = "ok" if c["ok"] else "FAILED"
        lines.append(
            f"check {name}: max relative error {c['max_rel_err']:.1e} < {EXACT_TOLERANCE:.0e} {verdict}"
        )
    cost = r["capture_overhead"]
    lines.append("")
    lines.append(
        f"capture cost: Trainer.fit, {p['epochs']} epochs, "
        f"median of {len(cost['fit_s']['plain_with_checkpoints'])} "
        f"rounds: plain + checkpoints {cost['median_s']['plain_with_checkpoints']:.2f} s"
    )
    for name, ratio in cost["ratio_median"].items():
        lines.append(
            f"  with {LABELS[name]:<30} {cost['median_s'][name]:>6.2f} s  {ratio:.2f}x  "
            f"store {r['store_bytes'][name] / 1e6:.1f} MB"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument(
        "--checkpoints", type=int, default=10, help="checkpoint epochs, evenly spaced, ending last"
    )
    parser.add_argument(
        "--queries", type=int, default=360, help="held-out TracIn queries (first of the test split)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every method")
    parser.add_argument(
        "--overhead-rounds", type=int, default=5, help="timed rounds of the capture-cost fits"
    )
    parser.add_argument(
        "--peer-batch", type=int, default=256, help="training batch size of the peers' loaders"
    )
    parser.add_argument(
        "--captum-default",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run Captum TracInCP with its defaults (per-example loop), once",
    )
    parser.add_argument(
        "--dattri-projected-once",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run dattri's projected TracIn in the first round only (it is slow)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads: 1 by default, see the module docstring"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    counts = (args.epochs, args.checkpoints, args.queries, args.rounds, args.overhead_rounds, args.peer_batch)
    if min(*counts, args.threads) < 1:
        parser.error(
            "--epochs, --checkpoints, --queries, --rounds, --overhead-rounds, --peer-batch and --threads "
            "must be >= 1"
        )
    if args.checkpoints > args.epochs:
        parser.error(f"--checkpoints ({args.checkpoints}) cannot exceed --epochs ({args.epochs})")
    if args.queries > 360:
        parser.error(f"--queries can be at most 360 (the held-out digits); got {args.queries}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes the JSON report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # Captum warns on every call that its inputs need no gradient; nothing to act on.
    warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")
    header = common.report_header(
        "peers_attribution", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    )
    machine = header["machine"]
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}, "
        f"load {machine['load_average']}",
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mstore-peers-attribution-") as tmp:
        result = bench(args, Path(tmp))
    header["machine"]["load_average_end"] = list(os.getloadavg())
    print()
    print(format_table(result, machine))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s")
    common.write_json(args.out, {**header, "total_s": total, **result})
    failed = [name for name, c in result["checks"].items() if not c["ok"]]
    if failed or not result["checks"]:
        print(f"FAILED exactness checks: {failed or 'no exact peer ran'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
