"""Where a captured step's time goes: each stage of the capture switched on in turn, side by side.

The three models of ``capture_overhead.py`` are trained in a plain SGD loop that drives the
library's :class:`~mstore_lightning.capture.recorder.Recorder` (the code ``GradientCapture`` runs in
each Lightning hook; Lightning's own per-step cost is left out, so ratios here run above the fits'),
with int8 capture of every layer, in six arms run in turn each round (medians over rounds):

- ``plain``: no capture;
- ``hooks``: the capture's hooks keep each layer's inputs and output gradients, nothing more;
- ``form``: + each layer's rows formed in its chosen form (factors, full gradients), scaled to the
  sample's own loss, and their squared norms;
- ``encode``: + the rows encoded in the step (int8 codes and scales) and their NaN/Inf flags;
- ``hand``: + the bytes copied into the writer's chunk buffers, and the chunks queued; the writer
  drops them;
- ``full``: + the writer splits, deduplicates, compresses where it pays, and writes to Zarr.

Each arm's share is its step time over the arm before it. The first step of every arm (kernels
warmed, each layer's form measured) is left out, and the epoch's end (the writer's backlog, the Zarr
arrays' creation, the commit) is timed apart: it is paid once an epoch, and weighs nothing in a long
one.

Usage:
    python benchmarks/capture_floor.py                 # 1 and 2 torch threads, 5 rounds
    python benchmarks/capture_floor.py --threads 1 --rounds 3 --models cnn
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mstore_lightning import CapturePolicy
from mstore_lightning.capture import batch as batch_module
from mstore_lightning.capture.batch import BatchWriter
from mstore_lightning.capture.recorder import Recorder
from mstore_lightning.capture.rows import RowSink, select_rows
from mstore_lightning.core import tensor_codes
from mstore_lightning.store.writer import BackgroundWriter

sys.path.insert(0, str(Path(__file__).parent))
import itertools

import capture_overhead as co

ARMS = ("plain", "hooks", "form", "encode", "hand", "full")
STEPS = {"mlp": 300, "cnn": 60, "transformer": 50}
LR = 0.01


# ------------------------------------------------------------------------------------------------ arms
@contextlib.contextmanager
def patched(obj: Any, **attrs: Any) -> Iterator[None]:
    saved = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def _encode_only(self: RowSink, epoch: int, plan: Any, rows: dict, keep: Any, split: str = "train") -> Any:
    masks = []
    for array, values in rows.items():
        encoded = tensor_codes.encode_rows(plan.arrays[array], select_rows(values, keep))
        if plan.arrays[array]["encoding"] != "int64":
            masks.append(encoded.nonfinite())
    if not masks or any(m is None for m in masks):
        return None
    return torch.stack(masks).any(dim=0)


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def arm(name: str) -> Iterator[None]:
    """The capture with the stages after ``name`` switched off."""
    with contextlib.ExitStack() as stack:
        if name == "hooks":
            stack.enter_context(patched(BatchWriter, write=_nothing, write_losses=_nothing))
        if name in ("form", "encode"):
            sink = {
                "append_sqnorms": lambda *a, **k: False,
                "append_row_fields": _nothing,
                "append_row_field": _nothing,
            }
            sink["append_layer"] = _encode_only if name == "encode" else _nothing
            stack.enter_context(patched(RowSink, **sink))
        if name == "form":  # the NaN/Inf flags come with the encoding
            stack.enter_context(patched(batch_module, nonfinite_samples=_nothing))
        if name == "hand":
            stack.enter_context(patched(BackgroundWriter, _write=lambda self, chunks: None))
        yield


# ---------------------------------------------------------------------------------------------- runs
def run(spec: co.ModelSpec, name: str, data: co.SyntheticData, steps: int, work: Path) -> tuple[float, float]:
    """Seconds of ``steps`` training steps (after one untimed step), and of the epoch's end (the
    writer's backlog, the arrays' creation and the commit), in arm ``name``."""
    torch.manual_seed(co.MODEL_SEED)
    net = spec.build()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    bs = spec.batch_size
    batches = [data[list(range(i * bs, (i + 1) * bs))] for i in range(steps + 1)]
    recorder = None
    store = work / f"{spec.name}-{name}.zarr"
    if name != "plain":
        shutil.rmtree(store, ignore_errors=True)
        recorder = Recorder(str(store), CapturePolicy(**co.POLICY), warn=lambda m: None)
        recorder.plan(net, max_epochs=1)
        recorder.start()
        recorder.open(recorder.run_meta(spec.name), resume=False)
        recorder.begin_epoch(0, lr_groups=[[LR]])

    def step(i: int) -> None:
        batch = batches[i]
        if recorder is not None:
            planned, _ = recorder.plan_step(batch, i)
            recorder.begin_step(planned)
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(net(batch["x"]), batch["y"], reduction="none")
        losses.mean().backward()
        if recorder is not None:
            recorder.record_backward(accumulation=1, global_step=i, lr=LR)
            recorder.end_step(losses.detach(), batch)
        opt.step()

    with arm(name):
        step(0)
        gc.collect()
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            step(i)
        t1 = time.perf_counter()
        if recorder is not None:
            recorder.finish_epoch(net, global_step=steps + 1)
        seconds, end = t1 - t0, time.perf_counter() - t1
        if recorder is not None:
            recorder.detach()
            recorder.close()
    shutil.rmtree(store, ignore_errors=True)
    return seconds, end


def bench(spec: co.ModelSpec, rounds: int, threads: int, work: Path) -> dict[str, Any]:
    torch.set_num_threads(threads)
    steps = STEPS[spec.name]
    data = co.make_data(spec, steps + 1)
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    ends: dict[str, list[float]] = {a: [] for a in ARMS}
    for r in range(rounds):
        order = ARMS if r % 2 == 0 else ARMS[::-1]  # drift hits every arm alike
        for name in order:
            seconds, end = run(spec, name, data, steps, work)
            times[name].append(seconds / steps)
            ends[name].append(end)
        print(
            f"  {spec.name} {threads}t round {r + 1}: "
            + " ".join(f"{a} {times[a][-1] * 1e3:.1f}" for a in ARMS),
            flush=True,
        )
    med = {a: statistics.median(v) for a, v in times.items()}
    added = med["full"] - med["plain"]
    shares = {}
    for before, after in itertools.pairwise(ARMS):
        delta = med[after] - med[before]
        shares[after] = {"ms_per_step": delta * 1e3, "share_of_added": delta / added if added > 0 else None}
    return {
        "threads": threads,
        "steps": steps,
        "ms_per_step": {a: [t * 1e3 for t in v] for a, v in times.items()},
        "median_ms_per_step": {a: m * 1e3 for a, m in med.items()},
        "ratio_to_plain": {a: m / med["plain"] for a, m in med.items()},
        "epoch_end_s": {a: statistics.median(v) for a, v in ends.items()},
        "stage": shares,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<12}{'thr':>4}" + "".join(f"{a:>9}" for a in ARMS) + "   (ms a step; x plain)"]
    for r in results:
        med, ratio = r["median_ms_per_step"], r["ratio_to_plain"]
        lines.append(f"{r['model']:<12}{r['threads']:>4}" + "".join(f"{med[a]:>9.2f}" for a in ARMS))
        lines.append(f"{'':<16}" + "".join(f"{ratio[a]:>8.2f}x" for a in ARMS))
        lines.append(
            f"{'':<16}share of the added step time: "
            + ", ".join(
                f"{a} {r['stage'][a]['share_of_added']:.0%}"
                for a in ARMS[1:]
                if r["stage"][a]["share_of_added"] is not None
            )
        )
        lines.append(
            f"{'':<16}epoch's end (s): " + ", ".join(f"{a} {r['epoch_end_s'][a]:.2f}" for a in ARMS[1:])
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture_floor.json")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in [int(t) for t in args.threads.split(",")]:
            for name in args.models.split(","):
                r = bench(co.SPECS[name], args.rounds, threads, Path(tmp))
                results.append({"model": name, **r})
    report = {
        "benchmark": "capture_floor",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": co.machine_info(),
        "versions": co.versions(),
        "library_digest": co.library_digest(),
        "policy": co.POLICY,
        "rounds": args.rounds,
        "results": results,
    }
    print()
    print(table(results))
    print(f"machine: {report['machine']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
