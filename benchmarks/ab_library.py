"""Two versions of the library side by side: each benchmark run alternately on a base commit and on
this working tree (A B A B ..., each run a fresh process), and the medians of their timings compared.

A run of version X imports X's package and runs X's own copy of the benchmark script, so a script
that changed along with the library measures the same work. The base is checked out with
``git worktree`` into a scratch folder.

    python benchmarks/ab_library.py --base 4605d46 --rounds 3

Prints a table and writes ``benchmarks/results/ab_library_<base>_<head>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import capture_overhead as co
from harness import git

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (name, script, arguments, {metric: path into the script's JSON}); sizes cut so a round takes minutes.
BENCHMARKS: list[tuple[str, str, list[str], dict[str, tuple[str, ...]]]] = [
    (
        "analytics",
        "benchmarks/analytics.py",
        ["--rows", "30000", "--subset", "500", "--pairs", "2", "--epochs", "8", "--reps", "3"],
        {
            "topk fresh (s)": ("parts", "topk", "median_s", "topk"),
            "topk cached (s)": ("parts", "topk", "median_s", "topk_cached"),
            "dot streamed (s)": ("parts", "topk", "median_s", "streamed"),
            "self_influence int8 first (s)": (
                "parts",
                "digits",
                "medians_s",
                "self_influence",
                "int8",
                "first",
            ),
            "self_influence int8 second (s)": (
                "parts",
                "digits",
                "medians_s",
                "self_influence",
                "int8",
                "second",
            ),
            "tracin int8 first (s)": ("parts", "digits", "medians_s", "tracin", "int8", "first"),
            "tracin fp32 second (s)": ("parts", "digits", "medians_s", "tracin", "fp32", "second"),
        },
    ),
    (
        "capture_overhead",
        "benchmarks/capture_overhead.py",
        ["--pairs", "1"],
        {f"{m} capture fit (s)": ("models", m, "capture_median_s") for m in ("mlp", "cnn", "transformer")}
        | {f"{m} plain fit (s)": ("models", m, "plain_median_s") for m in ("mlp", "cnn", "transformer")},
    ),
]


def run_once(tree: Path, script: str, args: list[str], out: Path) -> dict[str, Any]:
    """One run of ``tree``'s copy of ``script`` with ``tree``'s package first on the path."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'benchmarks'}"}
    cmd = [sys.executable, str(tree / script), *args, "--out", str(out)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def dig(data: dict[str, Any], path: tuple[str, ...]) -> float:
    for key in path:
        data = data[key]
    return float(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare this working tree with")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds per benchmark")
    parser.add_argument("--only", default="", help="comma-separated subset of the benchmarks")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    base, head = git("rev-parse", "--short", args.base), git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only.split(",")]
    machine = co.machine_info()
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores; base {base} against {head}"
        f"{' (with uncommitted changes)' if dirty else ''}",
        flush=True,
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mstore-ab-") as tmp:
        old = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(old), base)
        try:
            for name, script, bench_args, metrics in chosen:
                runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
                for r in range(args.rounds):
                    for arm, tree in (
                        (("base", old), ("head", ROOT)) if r % 2 == 0 else (("head", ROOT), ("base", old))
                    ):
                        t0 = time.perf_counter()
                        data = run_once(tree, script, bench_args, Path(tmp) / f"{name}_{arm}_{r}.json")
                        runs[arm].append({m: dig(data, p) for m, p in metrics.items()})
                        print(f"  {name} round {r + 1} {arm}: {time.perf_counter() - t0:.0f} s", flush=True)
                rows = {}
                for m in metrics:
                    b = statistics.median(x[m] for x in runs["base"])
                    h = statistics.median(x[m] for x in runs["head"])
                    ratios = [hh[m] / bb[m] for hh, bb in zip(runs["head"], runs["base"])]
                    rows[m] = {"base": b, "head": h, "ratio": h / b, "round_ratios": ratios}
                results[name] = {"command": [script, *bench_args], "runs": runs, "metrics": rows}
        finally:
            git("worktree", "remove", "--force", str(old))
    print(f"\n{'metric':<44} {'base':>10} {'head':>10} {'head/base':>10}  per round")
    for name, r in results.items():
        for m, row in r["metrics"].items():
            rounds = " ".join(f"{x:.2f}" for x in row["round_ratios"])
            print(
                f"{name + ': ' + m:<44} {row['base']:>10.4f} {row['head']:>10.4f} {row['ratio']:>10.3f}  {rounds}"
            )
    out = args.out or RESULTS / f"ab_library_{base}_{head}.json"
    report = {
        "benchmark": "ab_library",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "base": base,
        "head": head,
        "head_dirty": dirty,
        "rounds": args.rounds,
        "results": results,
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
