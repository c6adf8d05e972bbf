"""Start-up time of the ``mstore`` command, before and after a change, side by side.

Each command runs as a fresh process on a small captured store (the digits-sized MLP of
``capture_overhead``, one epoch), once with the package of ``--before`` (a commit, unpacked with
``git archive``) and once with this tree's, alternating (A B A B ...). The store is small, so a
command's wall time is mostly its start-up: the imports it needs and opening the store. The
script prints the medians and per-pair ratios, and writes every time, and which of torch,
Lightning, matplotlib and pandas each command imported, to JSON.

Usage:
    python benchmarks/cli_startup.py                     # before = 762d107, 7 pairs
    python benchmarks/cli_startup.py --before HEAD~3 --pairs 11
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from harness import git, run_python, unpack

from mstore_lightning import GradientCapture

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HEAVY = ("torch", "lightning", "matplotlib", "pandas")
# Runs the command line, then reports which heavy libraries it imported, on stderr's last line.
RUNNER = (
    "import sys, json\n"
    "from mstore_lightning.cli import main\n"
    "try:\n"
    "    status = main(sys.argv[1:])\n"
    "except SystemExit as exc:\n"  # --help exits from argparse
    "    status = exc.code or 0\n"
    "sys.stdout.flush()\n"
    f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)\n"
    "sys.exit(status)\n"
)


def capture(path: Path) -> None:
    """One epoch of the MLP of ``capture_overhead`` on 8 batches, captured into ``path``."""
    spec = co.SPECS["mlp"]
    data = co.make_data(spec, 8)
    torch.manual_seed(co.MODEL_SEED)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[GradientCapture(store=str(path), policy=co.POLICY, mode="overwrite")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(co.Classifier(spec.build()), co.make_loader(data, spec.batch_size))


def run(package_root: Path, argv: list[str]) -> tuple[float, list[str], int]:
    """Wall seconds of one ``mstore`` process, the heavy libraries it imported, and its status."""
    start = time.perf_counter()
    done = run_python(package_root, ["-c", RUNNER, *argv])
    seconds = time.perf_counter() - start
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "[]"
    try:
        imported = json.loads(last)
    except json.JSONDecodeError:
        imported = [f"unreadable: {last[:200]}"]
    return seconds, imported, done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="762d107", help="commit whose package is the 'before' arm")
    parser.add_argument("--pairs", type=int, default=7, help="before/after pairs per command")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="git checkout that holds --before (when this tree is a copy)"
    )
    args = parser.parse_args(argv)
    after_commit = git("rev-parse", "--short", "HEAD", cwd=args.repo, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "mstore_lightning"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    machine = co.machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_count']} cores; python {machine['python']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        store = tmp_path / "store.zarr"
        capture(store)
        before_root = tmp_path / "before"
        before_root.mkdir()
        before = unpack(args.repo, args.before, before_root)
        commands = {
            "--help": ["--help"],
            "inspect": ["inspect", str(store)],
            "verify": ["verify", str(store)],
            "self-influence": ["self-influence", str(store)],  # reads rows: torch stays
        }
        results: dict[str, Any] = {}
        for name, cmd in commands.items():
            times: dict[str, list[float]] = {"before": [], "after": []}
            imported: dict[str, list[str]] = {}
            status: dict[str, int] = {}
            for root in (before_root, ROOT):  # warm-up: the OS file cache
                run(root, cmd)
            for i in range(args.pairs):
                order = (("before", before_root), ("after", ROOT))
                for arm, root in order if i % 2 == 0 else order[::-1]:
                    seconds, imported[arm], status[arm] = run(root, cmd)
                    times[arm].append(seconds)
            med = {arm: statistics.median(v) for arm, v in times.items()}
            ratios = [a / b for a, b in zip(times["after"], times["before"])]
            results[name] = {
                "argv": cmd,
                "seconds": times,
                "median_s": med,
                "after_over_before": ratios,
                "ratio_median": statistics.median(ratios),
                "imported": imported,
                "status": status,
            }
            print(
                f"  {name:15s} before {med['before']:.2f} s  after {med['after']:.2f} s  "
                f"(x{statistics.median(ratios):.2f}); after imports {imported['after'] or 'none of ' + str(HEAVY)}",
                flush=True,
            )
    out = args.out or RESULTS / f"cli_startup_{after_commit or 'unknown'}.json"
    report = {
        "benchmark": "cli_startup",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "before_commit": before,
        "after_commit": after_commit + ("+uncommitted" if dirty else ""),
        "pairs": args.pairs,
        "store": "capture_overhead MLP 784-512-512-10, 8 batches of 64, one epoch, int8",
        "commands": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
