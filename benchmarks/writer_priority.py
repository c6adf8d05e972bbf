"""Fit time with the store's writer at normal priority against at nice 19, side by side.

For each model of ``capture_overhead.py`` the script times, round after round, three one-epoch fits:
``plain`` (no capture), ``normal`` (capture with the writer and its compression at the process's
priority, compressing on zarr's shared event loop as before) and ``low`` (the library's default: the
writer and its own compression pool at nice 19). Medians of the per-round ratios to the plain fit of
the same round.

Usage:
    python benchmarks/writer_priority.py                         # mlp and cnn at int8, 5 rounds
    python benchmarks/writer_priority.py --models mlp --precision fp16 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture_overhead as co

import mstore_lightning.store.writer as writer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "writer_priority.json"
ARMS = ("plain", "normal", "low")
_LOWER, _LOOP_FREE = writer.lower_thread_priority, writer._loop_free


def use_arm(arm: str) -> None:
    """``normal``: no nice value and zarr's own event loop for every store; ``low``: the library's."""
    writer.lower_thread_priority = _LOWER if arm == "low" else (lambda: None)
    writer._loop_free = _LOOP_FREE if arm == "low" else (lambda store: False)


def bench(name: str, rounds: int, workdir: Path) -> dict[str, Any]:
    spec = co.SPECS[name]
    data = co.make_data(spec, spec.batches)
    store = workdir / f"{name}.zarr"
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arm in ARMS:  # warm-up: imports, allocator growth, lazy initialisation
            use_arm(arm)
            co.fit_once(spec, data, None if arm == "plain" else store)
        for i in range(rounds):
            for arm in ARMS:
                use_arm(arm)
                times[arm].append(co.fit_once(spec, data, None if arm == "plain" else store)[0])
            row = ", ".join(f"{arm} {times[arm][-1]:.2f} s" for arm in ARMS)
            print(f"  {name} round {i + 1}/{rounds}: {row}", flush=True)
    use_arm("low")
    ratios = {
        arm: statistics.median(t / p for t, p in zip(times[arm], times["plain"])) for arm in ("normal", "low")
    }
    return {
        "description": spec.description,
        "batches": spec.batches,
        "batch_size": spec.batch_size,
        "seconds": times,
        "ratio_median": ratios,
        "low_over_normal_median": statistics.median(lo / n for lo, n in zip(times["low"], times["normal"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated subset of {list(co.SPECS)}")
    parser.add_argument("--precision", default=co.POLICY["precision"], help="policy precision of the capture")
    parser.add_argument("--rounds", type=int, default=5, help="plain/normal/low rounds per model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    co.POLICY["precision"] = args.precision
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # per-fit chatter, the same for every arm
    machine = co.machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mstore-bench-") as tmp:
        for name in args.models.split(","):
            results[name] = bench(name, args.rounds, Path(tmp))
    print(f"\n{'model':<12} {'normal':>8} {'low':>8} {'low/normal':>11}   ({args.precision}, all layers)")
    for name, r in results.items():
        n, lo = r["ratio_median"]["normal"], r["ratio_median"]["low"]
        print(f"{name:<12} {n:>7.3f}x {lo:>7.3f}x {r['low_over_normal_median']:>10.3f}")
    co.write_report(
        args.out,
        {
            "benchmark": "writer_priority",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "versions": co.versions(),
            "mstore_lightning_sources_sha256": co.library_digest(),
            "policy": co.POLICY,
            "rounds": args.rounds,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "models": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
