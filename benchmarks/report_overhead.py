"""What the epoch-end analytics of the digits example add to its epoch time.

The digits demo (``example_projects/digits/train.py``: MLP 64-128-64-10, fp32 capture of every
layer, the test digits as TracIn queries, TensorBoard logging) is trained three ways, interleaved
A B C A B C ... so that machine noise hits all three alike:

- ``none``: capture only, ``analytics=None``;
- ``inline``: the demo's analytics in the training process (the default), governed by the demo's
  ``analytics_max_overhead`` (epochs are reported as often as that allows, the last always);
- ``background``: the same in a worker process (``analytics_background=True``).

Each arm's time is the wall time from the first epoch's start to the end of ``fit`` (so the
background arm includes waiting for the last epoch's report), divided by the epochs. Each timed
fit runs in a fresh process, after a one-epoch fit of the same arm there that pays for imports and
caches, and starts from a collected, frozen heap (``gc.freeze``). The overhead
of an arm is its median against the median of ``none``. Target: inline <= 1.10.

Run from the repository root::

    python benchmarks/report_overhead.py [--pairs 5] [--epochs 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from mstore_lightning import GradientCapture
from mstore_lightning.reports import report_paths

ROOT = Path(__file__).resolve().parent.parent
# Imported as a module on sys.path (not from its file) so that the report worker, which gets the
# parent's sys.path, can unpickle the example's dataset class for its image grid.
sys.path.insert(0, str(ROOT / "example_projects" / "digits"))
import train as digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_overhead import library_digest, machine_info

TARGET = 1.10
ARMS = ("none", "inline", "background")


class FitClock(L.Callback):
    """Wall time from the first epoch's start to the end of ``fit``, after every other callback."""

    def __init__(self) -> None:
        self.start = self.seconds = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def fit_once(arm: str, epochs: int, workdir: Path, data: tuple) -> dict[str, Any]:
    x_train, y_train, x_test, y_test, _ = data
    store = workdir / f"{arm}.zarr"
    L.seed_everything(digits.SEED, workers=True, verbose=False)
    loader = DataLoader(
        digits.DigitsDataset(x_train, y_train),
        batch_size=digits.BATCH_SIZE,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
    )
    capture = GradientCapture(
        store=store,
        policy={"layers": ["*"], "precision": "fp32", "loss_reduction": "mean"},
        mode="overwrite",
        query=DataLoader(
            digits.DigitsDataset(x_test[: digits.QUERIES], y_test[: digits.QUERIES]),
            batch_size=digits.QUERIES,
        ),
        analytics=None if arm == "none" else digits.ANALYTICS,
        analytics_background=arm == "background",
        analytics_max_overhead=digits.MAX_OVERHEAD,
    )
    clock = FitClock()
    # Every arm starts from a collected heap, with what earlier fits and imports left frozen out of
    # the collector's sight: otherwise a full collection over that heap (about 0.8 s here) lands in
    # one fit or another at random and decides its round.
    gc.collect()
    gc.freeze()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[capture, clock],  # the clock's on_fit_end runs after the capture's
        logger=TensorBoardLogger(save_dir=workdir, name=arm),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(digits.DigitsMLP(), loader)
    gc.unfreeze()
    out = {"epoch_s": clock.seconds / epochs}
    if arm != "none":
        paths = report_paths(store)
        summaries = [paths.read_summary(e) for e in paths.epochs()]
        out["reported_epochs"] = len(summaries)
        out["analytics_s"] = [round(s["seconds"], 4) for s in summaries]
        out["report_s"] = [round(s.get("total_seconds", s["seconds"]), 4) for s in summaries]
        out["statuses"] = sorted({r["status"] for s in summaries for r in s["analytics"]})
        out["skipped_epochs"] = [s["epoch"] for s in summaries if "skipped" in s]
    shutil.rmtree(store)
    return out


def child(arm: str, epochs: int, workdir: Path) -> dict[str, Any]:
    """One timed fit in a fresh process, after a one-epoch fit of the same arm that pays for its
    imports and caches."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = digits.load_noisy_digits(digits.SEED)
    fit_once(arm, 1, workdir, data)
    return fit_once(arm, epochs, workdir, data)


def in_fresh_process(arm: str, epochs: int, workdir: Path) -> dict[str, Any]:
    # A process per fit: no arm inherits another's heap, threads or exiting report worker.
    done = subprocess.run(
        [sys.executable, __file__, "--child", arm, "--epochs", str(epochs), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {arm} fit failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="rounds of the three arms")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per fit (20: the efficacy protocol)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report_overhead.json"))
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.epochs, Path(args.workdir))))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mstore-report-bench-") as tmp:
        for i in range(args.pairs):
            for arm in ARMS:
                runs[arm].append(in_fresh_process(arm, args.epochs, Path(tmp)))
                print(
                    f"round {i + 1}/{args.pairs} {arm:>10}: {runs[arm][-1]['epoch_s'] * 1e3:7.1f} ms/epoch",
                    flush=True,
                )
    med = {arm: statistics.median(r["epoch_s"] for r in runs[arm]) for arm in ARMS}
    ratios = {arm: med[arm] / med["none"] for arm in ARMS if arm != "none"}
    result = {
        "benchmark": "report_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "mstore_lightning_sources_sha256": library_digest(),
        "command": "python benchmarks/report_overhead.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "analytics": digits.ANALYTICS,
        "analytics_max_overhead": digits.MAX_OVERHEAD,
        "epochs": args.epochs,
        "pairs": args.pairs,
        "median_epoch_s": med,
        "ratio_vs_none": ratios,
        "target_inline_ratio": TARGET,
        "meets_target": ratios["inline"] <= TARGET,
        "runs": runs,
    }
    print()
    print(f"{'arm':>10} | {'median ms/epoch':>15} | {'vs none':>8}")
    print("-" * 40)
    for arm in ARMS:
        ratio = "" if arm == "none" else f"{ratios[arm]:.3f}x"
        print(f"{arm:>10} | {med[arm] * 1e3:>15.1f} | {ratio:>8}")
    print(f"\ntarget: inline (the default) <= {TARGET:.2f}x: {'ok' if result['meets_target'] else 'MISS'}")
    print(f"machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
