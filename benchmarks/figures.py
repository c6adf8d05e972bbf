"""What each report figure costs to draw: new, and redrawn from its kept pixels.

Each epoch's report draws the digits demo's three figures (gradient norms by class, the
class-conflict heatmap, the grid of the most self-influential samples). :class:`Figures` keeps each
figure with its axes, ticks and labels drawn, and draws only the artists whose data change. This
script times, for each figure, a new one (a fresh ``Figures``, as in a run's first report) and a
redraw (the same ``Figures`` with new data of the same layout), alternating, and reports medians.

Run from the repository root::

    python benchmarks/figures.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

from mstore_lightning.reports.figures import Figures

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_overhead import library_digest, machine_info

ROOT = Path(__file__).resolve().parent.parent
SAMPLES, CLASSES, GRID = 1437, 10, 16  # the digits demo's training set, classes and grid size


def draws(rng: np.random.Generator) -> dict:
    """One epoch's data for each figure, in the demo's sizes."""
    labels = rng.integers(0, CLASSES, SAMPLES)
    norms = 10 ** rng.uniform(-2.5, -0.5, SAMPLES)
    images = [rng.random((8, 8)) for _ in range(GRID)]
    ids = rng.choice(SAMPLES, GRID, replace=False)
    return {
        "norms_by_class": lambda f: f.norms_by_class(norms, labels, 3),
        "conflict_heatmap": lambda f: f.conflict_heatmap(
            rng.uniform(-1, 1, (CLASSES, CLASSES)), list(range(CLASSES)), 3
        ),
        "sample_grid": lambda f: f.sample_grid(images, ids, labels[ids], "Most self-influential samples"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "figures.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    Figures().conflict_heatmap(np.eye(2), [0, 1], 0)  # imports and the font cache, paid once per process
    times: dict[str, dict[str, list[float]]] = {name: {"new": [], "redraw": []} for name in draws(rng)}
    kept = Figures()
    for draw in draws(rng).values():
        draw(kept)  # the kept figures' first drawing
    for r in range(args.rounds):
        for name, draw in draws(rng).items():
            arms = [("new", Figures()), ("redraw", kept)]
            for kind, figs in arms if r % 2 == 0 else arms[::-1]:  # A B, then B A
                t0 = time.perf_counter()
                png = draw(figs)
                times[name][kind].append(time.perf_counter() - t0)
                assert png[:4] == b"\x89PNG"
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    print(f"{'figure':>18} | {'new ms':>7} | {'redraw ms':>9} | {'ratio':>6}")
    print("-" * 50)
    for name, m in med.items():
        print(
            f"{name:>18} | {m['new'] * 1e3:7.1f} | {m['redraw'] * 1e3:9.1f} | {m['new'] / m['redraw']:5.1f}x"
        )
    total_new, total_redraw = sum(m["new"] for m in med.values()), sum(m["redraw"] for m in med.values())
    print(
        f"{'all three':>18} | {total_new * 1e3:7.1f} | {total_redraw * 1e3:9.1f} | {total_new / total_redraw:5.1f}x"
    )
    result = {
        "benchmark": "figures",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {"matplotlib": matplotlib.__version__},
        "mstore_lightning_sources_sha256": library_digest(),
        "command": "python benchmarks/figures.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds,
        "median_s": med,
        "times_s": times,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
