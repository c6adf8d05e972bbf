"""Peak memory of a capture whose store is slower than training, against the writer's queue budget.

Each run trains the MLP 784-512-512-10 (batch 128, factors of every layer at ``--precision``, fp16 by
default; int8 rows wait in their buffers as float32) for one epoch in a
fresh process, with a store whose chunk writes each take ``--delay`` seconds longer, so the writer
falls behind from the first steps. Runs, one process each:

- ``plain``: no capture, the baseline peak RSS;
- ``block`` at each queue budget: training waits for the writer (``on_pressure="block"``);
- ``drop`` at each queue budget: training never waits and the rows of steps taken while the writer
  is a queue behind are dropped and counted (``on_pressure="drop"``).

The figure of merit is the peak RSS above the plain run's, against the queue budget: the queue holds
at most ``queue_bytes`` of filled chunks, and each array keeps one chunk buffer filling, so the
excess should stay near ``queue_bytes + (arrays x chunk_bytes)`` plus the writer's own working set,
whatever the store's speed.

Run from the repository root::

    python benchmarks/backpressure.py [--queues 8,32,128] [--delay 0.5] [--steps 240]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_overhead import library_digest, machine_info

MB = 1 << 20
CHUNK_BYTES = 4 * MB


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process; returns its figures."""
    import lightning as L
    import torch
    import zarr.storage
    from torch.utils.data import DataLoader, Dataset

    from mstore_lightning import GradientCapture, open_store

    real_set = zarr.storage.LocalStore.set

    async def slow_set(self, key, value):
        if "/c/" in key:
            await asyncio.sleep(args.delay)
        return await real_set(self, key, value)

    zarr.storage.LocalStore.set = slow_set

    class Data(Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"x": self.x[i], "y": self.y[i], "index": i}

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                torch.nn.Linear(512, 10),
            )  # fmt: skip

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Probe(L.Callback):
        def __init__(self, capture: GradientCapture | None) -> None:
            self.capture, self.pending, self.waited = capture, 0, 0.0

        def on_train_batch_end(self, *a: Any) -> None:
            if self.capture is not None and self.capture.recorder.writer is not None:
                w = self.capture.recorder.writer
                self.pending, self.waited = max(self.pending, w.pending_bytes), w.wait_seconds

    torch.manual_seed(0)
    n = 128 * args.steps
    loader = DataLoader(Data(n), batch_size=128)
    callbacks: list[Any] = []
    capture = None
    store = Path(args.scratch) / "s.zarr"
    if args.arm != "plain":
        capture = GradientCapture(
            store,
            policy={"precision": args.precision, "dedup": False},
            mode="overwrite",
            queue_bytes=args.queue_mb * MB,
            chunk_bytes=CHUNK_BYTES,
            on_pressure=args.arm,
        )
        callbacks.append(capture)
    probe = Probe(capture)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[*callbacks, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(Task(), loader)
    out = {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_pending_mb": probe.pending / MB,
        "waited_s": probe.waited,
        "rows": n,
    }
    if capture is not None:
        s = open_store(store)
        out["rows_stored"] = len(s.sample_ids(0))
        out["rows_dropped"] = s.dropped(0)
    return out


def run_arm(arm: str, queue_mb: int, args: argparse.Namespace) -> dict[str, Any]:
    scratch = tempfile.mkdtemp(prefix="mstore-bp-")
    try:
        cmd = [
            sys.executable, __file__, "--child", "--arm", arm, "--queue-mb", str(queue_mb),
            "--delay", str(args.delay), "--steps", str(args.steps), "--scratch", scratch,
            "--precision", args.precision,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{arm} (queue {queue_mb} MB) failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queues", default="8,32,128", help="queue budgets in MB, comma-separated")
    ap.add_argument("--delay", type=float, default=0.5, help="extra seconds per chunk write")
    ap.add_argument("--steps", type=int, default=240, help="training steps (batches of 128)")
    ap.add_argument("--precision", default="fp16", help="the capture policy's precision")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "backpressure.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--queue-mb", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    queues = [int(q) for q in args.queues.split(",")]
    plain = run_arm("plain", 0, args)
    runs = []
    header = (
        f"{'arm':<6} {'queue MB':>8} {'peak RSS MB':>11} {'over plain':>10} {'max queued MB':>13} "
        f"{'waited s':>8} {'dropped':>8} {'fit s':>6}"
    )
    print(header)
    print(f"{'plain':<6} {'-':>8} {plain['peak_rss_mb']:>11.0f} {'-':>10} {'-':>13} {'-':>8} {'-':>8} "
          f"{plain['seconds']:>6.1f}")  # fmt: skip
    for q in queues:
        for arm in ("block", "drop"):
            r = run_arm(arm, q, args)
            r.update(arm=arm, queue_mb=q, over_plain_mb=r["peak_rss_mb"] - plain["peak_rss_mb"])
            runs.append(r)
            print(
                f"{arm:<6} {q:>8} {r['peak_rss_mb']:>11.0f} {r['over_plain_mb']:>10.0f} "
                f"{r['max_pending_mb']:>13.1f} {r['waited_s']:>8.1f} {r['rows_dropped']:>8} {r['seconds']:>6.1f}",
                flush=True,
            )
    machine = machine_info()
    print(f"\n{machine['cpu_model']}, {machine['cpu_count']} cores; {args.precision}; chunk writes delayed by {args.delay} s; "
          f"chunks of {CHUNK_BYTES // MB} MB; {args.steps} steps of 128 rows.")  # fmt: skip
    result = {
        "benchmark": "backpressure",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "mstore_lightning_sources_sha256": library_digest(),
        "command": "python benchmarks/backpressure.py " + " ".join(sys.argv[1:]),
        "delay_s": args.delay,
        "precision": args.precision,
        "steps": args.steps,
        "chunk_bytes": CHUNK_BYTES,
        "plain": plain,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
