"""Queries on a store of more than 1 GB, beside plain ``zarr`` reading the same arrays.

The ``bigstore`` part of ``analytics.py``. A ViT-tiny (192 wide, 12 layers, 32x32 images, patch 4:
65 positions) is trained for one epoch on seeded random images with every layer captured, into two
stores:

- ``exact``: ``budget=None``, int8 factors of every layer, about 2.3 MB a row on disk;
- ``default``: the default policy (a 1 MiB-a-sample budget: the largest layers projected).

On each, these are timed in turn, round after round (A B C ... A B C ...), every one on a freshly
opened store and the OS file cache warm:

- ``zarr_read``: plain ``zarr`` reading every array of the epoch, opened beforehand: the floor;
- ``zarr_open_read``: the same, opening each array by its path first, as a reader must;
- ``topk``: ``open_store(...).topk([q], k=10, metric="dot")`` over every row;
- ``self_influence``: ``open_store(...).self_influence()``;
- ``norms_rescan``: the squared norms computed from the stored rows (``kept=False``), which
  self-influence would cost without the norms kept at capture.

Rows a second and stored MB a second are reported for each, with ``topk / zarr_read`` pair by pair.
Checks: top-k's scores equal ``store.dot`` on its ids; the kept norms agree with the rescan within
the int8 bound.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from harness import timed
from torch.utils.data import DataLoader, Dataset

from mstore_lightning import GradientCapture, IndexedDataset, open_store
from mstore_lightning.analytics import kernels

K = 10
BATCH = 32
TARGET_RATIO = 2.0  # top-k within 2x of plain zarr's read of the same arrays


class Images(Dataset):
    """``n`` seeded random 3x32x32 images with random labels, as ``{"x", "y"}``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class Classifier(L.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def capture(path: Path, rows: int, policy: dict[str, Any]) -> float:
    """Trains the ViT-tiny for one epoch of ``rows`` images, captured into ``path``; returns seconds."""
    from default_budget import vit_tiny  # transformers, only for this part

    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[GradientCapture(str(path), policy=policy, mode="overwrite")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("mstore_lightning").setLevel(logging.ERROR)
        trainer.fit(Classifier(vit_tiny()), DataLoader(IndexedDataset(Images(rows)), batch_size=BATCH))
    return time.perf_counter() - start


def arrays_of(path: Path) -> list[str]:
    """Every array of the store's epochs (layers and row records), by path."""
    root = zarr.open_group(str(path), mode="r")
    return [
        n for n, a in root.members(max_depth=None) if isinstance(a, zarr.Array) and n.startswith("epochs/")
    ]


def bench_store(name: str, path: Path, rounds: int) -> dict[str, Any]:
    """Times the arms on one store, round after round, and checks top-k and the kept norms."""
    store = open_store(path)
    epoch = store.epochs[-1]
    ids = store.sample_ids(epoch)
    rows, stored = len(ids), store.nbytes_stored(epoch)
    query = int(ids[len(ids) // 2])
    names = arrays_of(path)
    opened = [zarr.open_group(str(path), mode="r")[n] for n in names]
    decoded = sum(a.nbytes for a in opened)

    def zarr_open_read() -> None:
        root = zarr.open_group(str(path), mode="r")
        for n in names:
            root[n][...]

    arms: dict[str, Callable[[], Any]] = {
        "zarr_read": lambda: [a[...] for a in opened],
        "zarr_open_read": zarr_open_read,
        "topk": lambda: open_store(path).topk([query], k=K, epoch=epoch, metric="dot"),
        "self_influence": lambda: open_store(path).self_influence(),
        "norms_rescan": lambda: kernels.sqnorms(open_store(path).scan, epoch, kept=False),
    }
    for fn in arms.values():  # warm-up: imports, the OS file cache, allocator growth
        fn()
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    out: dict[str, Any] = {}
    for i in range(rounds):
        for arm, fn in arms.items():
            w, c, out[arm] = timed(fn)
            wall[arm].append(w)
            cpu[arm].append(c)
        print(
            f"  {name} round {i + 1}/{rounds}: " + ", ".join(f"{arm} {wall[arm][-1]:.2f} s" for arm in arms),
            flush=True,
        )
    med = {arm: statistics.median(v) for arm, v in wall.items()}
    ratios = [t / z for t, z in zip(wall["topk"], wall["zarr_read"])]
    ratios_open = [t / z for t, z in zip(wall["topk"], wall["zarr_open_read"])]

    top = out["topk"]
    top_ids = np.asarray(top.ids[0])
    dot = np.asarray(store.dot(epoch, [query], top_ids), dtype=np.float64)[0]
    scores = np.asarray(top.scores[0], dtype=np.float64)
    kept = kernels.sqnorms(store.scan, epoch)
    rescan = out["norms_rescan"]
    return {
        "rows": rows,
        "stored_bytes": stored,
        "stored_bytes_per_row": stored / rows,
        "decoded_bytes": decoded,
        "arrays": len(names),
        "query_id": query,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_s": med,
        "rows_per_s": {arm: rows / t for arm, t in med.items()},
        "stored_mb_per_s": {arm: stored / t / 1e6 for arm, t in med.items()},
        "topk_over_zarr_read": ratios,
        "topk_over_zarr_read_median": statistics.median(ratios),
        "topk_over_zarr_open_read": ratios_open,
        "topk_over_zarr_open_read_median": statistics.median(ratios_open),
        "self_influence_over_norms_rescan": med["self_influence"] / med["norms_rescan"],
        "target_ratio": TARGET_RATIO,
        "check": {
            "topk_vs_dot_max_rel": float(np.abs(scores - dot).max() / max(np.abs(dot).max(), 1e-30)),
            "kept_vs_rescan_norm_max_rel": float(
                np.abs(np.sqrt(kept) - np.sqrt(rescan)).max() / np.sqrt(rescan).max()
            ),
            "kept_norms_read": bool(store.catalog.captured_sqnorms(epoch, store.layers) is not None),
        },
    }


def bench(rows_exact: int, rows_default: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Captures both stores and times the queries on each."""
    out: dict[str, Any] = {
        "model": "ViT-tiny (HF ViTConfig: 192 wide, 12 layers, 3 heads, MLP 768), 3x32x32, patch 4: 65 positions",
        "batch_size": BATCH,
        "k": K,
    }
    for name, rows, policy in (
        ("exact", rows_exact, {"layers": ["*"], "budget": None}),
        ("default", rows_default, {"layers": ["*"]}),
    ):
        path = workdir / f"vit_{name}.zarr"
        print(f"bigstore: capturing {rows:,} rows of ViT-tiny, policy {policy}", flush=True)
        fit_s = capture(path, rows, policy)
        result = bench_store(name, path, rounds)
        result.update(policy=policy, fit_s=fit_s)
        print(
            f"  {name}: {result['stored_bytes'] / 1e9:.2f} GB stored; topk {result['median_s']['topk']:.2f} s "
            f"= {result['topk_over_zarr_read_median']:.2f}x zarr_read; self_influence "
            f"{result['median_s']['self_influence']:.3f} s",
            flush=True,
        )
        out[name] = result
        shutil.rmtree(path, ignore_errors=True)
    return out


def table_rows(r: dict[str, Any]) -> list[str]:
    """Lines of the analytics table for this part."""
    lines = []
    for name in ("exact", "default"):
        s = r[name]
        lines.append(
            f"  {name}: {s['rows']:,} rows, {s['stored_bytes'] / 1e9:.2f} GB stored "
            f"({s['stored_bytes_per_row'] / 1e6:.2f} MB a row)"
        )
        for arm, t in s["median_s"].items():
            lines.append(
                f"    {arm:16s} {t:8.3f} s  {s['rows_per_s'][arm]:10,.0f} rows/s  "
                f"{s['stored_mb_per_s'][arm]:10,.0f} MB/s"
            )
        lines.append(
            f"    topk / zarr_read {s['topk_over_zarr_read_median']:.2f} (open+read "
            f"{s['topk_over_zarr_open_read_median']:.2f}); target <= {s['target_ratio']:.0f}"
        )
    return lines
