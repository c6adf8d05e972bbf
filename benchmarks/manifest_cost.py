"""What manifests cost readers: ``verify`` and a full read of a store, with and without them.

One store is captured (the ``capture_overhead`` MLP by default, several epochs), then copied with its
manifests taken out, as a store written before manifests existed reads. Both copies are verified
and read in turn (A B A B ...), and the medians and per-pair ratios printed and written to JSON. The
cost to the capture itself is ``capture_overhead.py --versus no-manifest``.

Usage:
    python benchmarks/manifest_cost.py                       # mlp, 3 epochs, 7 pairs
    python benchmarks/manifest_cost.py --batches-scale 0.1 --pairs 3
    python benchmarks/manifest_cost.py --chunk-bytes 65536       # many small chunks: the worst case
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import capture_overhead as co
import lightning as L
import torch

from mstore_lightning import GradientCapture, open_store
from mstore_lightning.store import layout
from mstore_lightning.store.manifest import MANIFEST
from mstore_lightning.store.verify import verify

RESULTS = Path(__file__).resolve().parent / "results"


def capture(spec: co.ModelSpec, batches: int, epochs: int, path: Path, chunk_bytes: int | None) -> int:
    """Captures ``epochs`` epochs of ``spec`` into ``path``; returns the samples per epoch."""
    data = co.make_data(spec, batches)
    torch.manual_seed(co.MODEL_SEED)
    sizes = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
    cap = GradientCapture(store=str(path), policy=co.POLICY, mode="overwrite", **sizes)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[cap],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(co.Classifier(spec.build()), co.make_loader(data, spec.batch_size))
    return batches * spec.batch_size


def strip_manifests(path: Path) -> int:
    """Takes the manifests out of a local store, as an earlier library wrote it; returns the bytes
    of ``zarr.json`` they took."""
    removed = 0
    for meta_path in path.glob(f"{layout.EPOCHS}/*/*/zarr.json"):
        meta = json.loads(meta_path.read_text())
        if MANIFEST in meta.get("attributes", {}):
            before = meta_path.stat().st_size
            del meta["attributes"][MANIFEST]
            meta_path.write_text(json.dumps(meta))
            removed += before - meta_path.stat().st_size
    for meta_path in path.glob(f"{layout.EPOCHS}/*/zarr.json"):
        meta = json.loads(meta_path.read_text())
        attrs = {k: v for k, v in meta["attributes"].items() if k != MANIFEST}
        meta["attributes"] = layout.with_crc(attrs)
        meta_path.write_text(json.dumps(meta))
    return removed


def read_all(path: Path) -> float:
    """Opens the store and reads every row of every epoch (norms on the stored factors, and every
    layer restored for a slice of samples); returns the seconds."""
    start = time.perf_counter()
    store = open_store(path)
    for epoch in store.epochs:
        store.norms(epoch, kept=False)
        ids = store.sample_ids(epoch)[:256]
        for layer in store.layers:
            store.restore(epoch, layer, ids)
    return time.perf_counter() - start


def timed_verify(path: Path) -> float:
    start = time.perf_counter()
    report = verify(path)
    seconds = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"verify failed on {path}: {report.summary()}")
    return seconds


def chunk_files(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=sorted(co.SPECS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--batches-scale", type=float, default=0.5)
    parser.add_argument("--chunk-bytes", type=int, default=None, help="the capture's chunk size (default: its own)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    co.logging.getLogger("lightning").setLevel(co.logging.ERROR)
    co.logging.getLogger("lightning.pytorch").setLevel(co.logging.ERROR)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = args.out or RESULTS / f"manifest_cost_{commit or 'unknown'}.json"
    machine = co.machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_count']} cores", flush=True)

    spec = co.SPECS[args.model]
    batches = max(1, round(spec.batches * args.batches_scale))
    with tempfile.TemporaryDirectory(prefix="mstore-manifest-") as tmp:
        with_manifest, without = Path(tmp) / "with.zarr", Path(tmp) / "without.zarr"
        samples = capture(spec, batches, args.epochs, with_manifest, args.chunk_bytes)
        shutil.copytree(with_manifest, without)
        manifest_bytes = strip_manifests(without)
        files = chunk_files(with_manifest)
        store_bytes = co.dir_bytes(with_manifest)
        timed_verify(with_manifest), timed_verify(without)  # warm-up: imports, page cache
        read_all(with_manifest), read_all(without)
        runs: dict[str, list[float]] = {"verify_with": [], "verify_without": [], "read_with": [], "read_without": []}
        for i in range(args.pairs):
            runs["verify_with"].append(timed_verify(with_manifest))
            runs["verify_without"].append(timed_verify(without))
            runs["read_with"].append(read_all(with_manifest))
            runs["read_without"].append(read_all(without))
            print(
                f"  pair {i + 1}/{args.pairs}: verify {runs['verify_with'][-1]:.3f} / {runs['verify_without'][-1]:.3f} s, "
                f"read {runs['read_with'][-1]:.3f} / {runs['read_without'][-1]:.3f} s",
                flush=True,
            )

    def summary(kind: str) -> dict[str, Any]:
        a, b = runs[f"{kind}_with"], runs[f"{kind}_without"]
        ratios = [x / y for x, y in zip(a, b)]
        return {
            "with_s": a,
            "without_s": b,
            "with_median_s": statistics.median(a),
            "without_median_s": statistics.median(b),
            "ratios": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }

    result = {
        "benchmark": "manifest_cost",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": co.versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": spec.description,
        "epochs": args.epochs,
        "chunk_bytes": args.chunk_bytes,
        "samples_per_epoch": samples,
        "chunk_files": files,
        "store_bytes": store_bytes,
        "manifest_bytes": manifest_bytes,
        "verify": summary("verify"),
        "read": summary("read"),
    }
    header = f"{'':<8} {'with manifest':>14} {'without':>10} {'ratio med':>10} {'min':>7} {'max':>7}"
    print(f"\n{spec.description}, {args.epochs} epochs x {samples} samples, {files} chunk files, "
          f"{store_bytes / 1e6:.1f} MB; manifests {manifest_bytes / 1e3:.1f} kB")
    print(header + "\n" + "-" * len(header))
    for kind in ("verify", "read"):
        r = result[kind]
        print(
            f"{kind:<8} {r['with_median_s']:>13.3f}s {r['without_median_s']:>9.3f}s {r['ratio_median']:>9.3f}x "
            f"{r['ratio_min']:>6.3f}x {r['ratio_max']:>6.3f}x"
        )
    co.write_report(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
