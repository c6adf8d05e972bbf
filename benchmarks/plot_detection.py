"""Draw a ``detection.py`` results file: each detector's ROC-AUC and precision, protocol by protocol.

Two panels share the protocols on their x axis; each detector is a marker at its mean over seeds,
with a bar of one standard error. Run from the repository root::

    python benchmarks/plot_detection.py benchmarks/results/detection_3d77025.json --out docs/detection.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# The detectors drawn, with the README's names; loss_sum equals loss_mean in ranking and is left out.
SHOWN = {
    "suspects": "suspects()",
    "cleanlab": "cleanlab (5 folds)",
    "loss_mean": "mean loss",
    "aum": "area under the margin",
    "exact_tracin": "exact TracIn",
    "self_influence": "self-influence",
}
LABELS = {
    "digits_standard": "digits std",
    "digits_unit": "digits /16",
    "mnist1d": "MNIST-1D",
    "text": "text",
}


def label(protocol: str) -> str:
    data, flips = protocol.rsplit("_", 1)
    return f"{LABELS.get(data, data)}\n{flips}"


def draw(results: dict, out: Path, source: str) -> None:
    protocols = list(results)
    x = np.arange(len(protocols))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), constrained_layout=True)
    offsets = np.linspace(-0.3, 0.3, len(SHOWN))
    for ax, metric, title in (
        (axes[0], "roc_auc", "ROC-AUC (mean ± SE over seeds)"),
        (axes[1], "precision_at_k", "precision among the top #flipped"),
    ):
        for (name, shown), dx in zip(SHOWN.items(), offsets):
            stats = [results[p]["summary"].get(name, {}).get(metric) for p in protocols]
            mean = np.array([s["mean"] if s else np.nan for s in stats])
            se = np.array([s["se"] if s else np.nan for s in stats])
            ax.errorbar(
                x + dx,
                mean,
                yerr=se,
                fmt="o" if name != "suspects" else "D",
                ms=7 if name == "suspects" else 4,
                capsize=2,
                label=shown,
                zorder=3 if name == "suspects" else 2,
            )
        ax.set_xticks(x, [label(p) for p in protocols], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0.8, 1.005)
    axes[1].set_ylim(0.2, 1.0)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Finding 10% flipped labels, 5 seeds a protocol ({source})", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a detection.py results file")
    ap.add_argument("--out", type=Path, default=Path("docs/detection.png"))
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())["results"]
    draw(results, args.out, args.results.name)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
