"""How long ``store.suspects()`` takes on the digits demo's store, before and after a change.

The demo (``example_projects/digits/train.py``, 5 epochs) writes its store once; then each arm, the
package of ``--before`` (a commit, unpacked with ``git archive``) and this tree's, runs in a process
of its own that times ``open_store(path).suspects()`` ``--calls`` times, each on a freshly opened
store, after one warm-up call. Arms alternate over ``--rounds`` (A B B A ...). The script prints the
medians and writes every time to JSON.

Usage:
    python benchmarks/suspects_speed.py                      # before = 12b81e4, 3 rounds of 7 calls
    python benchmarks/suspects_speed.py --store runs/digits.zarr --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import capture_overhead as co
from harness import git, run_python, unpack

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_S = 0.1
# Times `calls` fresh-open suspects() calls after a warm-up; prints them as JSON.
RUNNER = (
    "import json, sys, time\n"
    "from mstore_lightning import open_store\n"
    "path, calls = sys.argv[1], int(sys.argv[2])\n"
    "open_store(path).suspects()\n"
    "out = []\n"
    "for _ in range(calls):\n"
    "    start = time.perf_counter()\n"
    "    open_store(path).suspects()\n"
    "    out.append(time.perf_counter() - start)\n"
    "print(json.dumps(out))\n"
)


def arm(package_root: Path, store: Path, calls: int) -> list[float]:
    """One process of ``calls`` timed calls with the package under ``package_root``."""
    done = run_python(package_root, ["-c", RUNNER, str(store), str(calls)], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", type=Path, default=None, help="an existing demo store (default: train one)"
    )
    parser.add_argument("--before", default="12b81e4", help="commit whose package is the 'before' arm")
    parser.add_argument("--rounds", type=int, default=3, help="before/after rounds")
    parser.add_argument("--calls", type=int, default=7, help="timed calls per arm and round")
    parser.add_argument("--repo", type=Path, default=ROOT, help="git checkout that holds --before")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    after_commit = git("rev-parse", "--short", "HEAD", cwd=args.repo, check=False)
    machine = co.machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_count']} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        store = args.store
        if store is None:
            store = tmp_path / "digits.zarr"
            print("training the digits demo (5 epochs) into a temporary store", flush=True)
            subprocess.run(
                [sys.executable, str(ROOT / "example_projects/digits/train.py"), "--store", str(store)],
                cwd=tmp_path,
                check=True,
                capture_output=True,
            )
        before_root = tmp_path / "before"
        before_root.mkdir()
        before = unpack(args.repo, args.before, before_root)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.rounds):
            order = [("before", before_root), ("after", ROOT)]
            for name, root in order if i % 2 == 0 else order[::-1]:
                times[name] += arm(root, store, args.calls)
            print(
                f"  round {i + 1}/{args.rounds}: before {statistics.median(times['before']) * 1e3:.1f} ms, "
                f"after {statistics.median(times['after']) * 1e3:.1f} ms (medians so far)",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"suspects() on the demo's store: before ({before}) {med['before'] * 1e3:.1f} ms, after "
        f"{med['after'] * 1e3:.1f} ms; target <= {TARGET_S * 1e3:.0f} ms "
        f"{'met' if med['after'] <= TARGET_S else 'MISSED'}"
    )
    out = args.out or RESULTS / f"suspects_speed_{after_commit or 'unknown'}.json"
    report = {
        "benchmark": "suspects_speed",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "before_commit": before,
        "after_commit": after_commit,
        "store": "digits demo, 5 epochs" if args.store is None else str(args.store),
        "rounds": args.rounds,
        "calls": args.calls,
        "seconds": times,
        "median_s": med,
        "target_s": TARGET_S,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
