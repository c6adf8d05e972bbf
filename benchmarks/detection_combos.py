"""Candidate combinations of the ``suspects()`` signals, scored offline on ``detection.py``'s dumps.

``detection.py --dump DIR`` saves, for every protocol and seed, each sample's signals as
``suspects()`` orients them (high = suspicious), every detector's scores, which labels were flipped,
the per-epoch losses and margins of the run, the labels trained on, and each layer's inputs as the
neighbour signal reads them. This script scores candidate combinations on those dumps with no training, beside the shipped ``suspects()`` and the single-signal baselines; cleanlab's
scores come from a committed ``detection`` results file of the same seeds (training is seeded and
deterministic, so the runs are the same). It prints one table a protocol and writes JSON.

Usage:
    python benchmarks/detection.py --no-cleanlab --dump /tmp/dump     # about 20 minutes
    python benchmarks/detection_combos.py --dump /tmp/dump --cleanlab benchmarks/results/detection_63076ef.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).resolve().parent / "results"


def robust_z(x: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)``, the standard deviation where the MAD is 0 (as the library's)."""
    med = np.nanmedian(x)
    mad = np.nanmedian(np.abs(x - med)) * 1.4826
    return (x - med) / (mad if mad > 0 else (np.nanstd(x) or 1.0))


def by_class(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`robust_z` within each given label's samples: what is unusual for its own class."""
    out = np.empty_like(x, dtype=np.float64)
    for c in np.unique(labels):
        out[labels == c] = robust_z(x[labels == c])
    return out


def neighbour_disagreement(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The share of each sample's ``k`` nearest others (cosine of ``features``) with another label."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    nearest = np.argpartition(-cos, k, axis=1)[:, :k]
    return (labels[nearest] != labels[:, None]).mean(1)


def layers_disagreement(d: dict[str, np.ndarray], k: int) -> np.ndarray:
    """:func:`neighbour_disagreement` averaged over every layer's inputs in the dump."""
    layers = sorted((n for n in d if n.startswith("features_")), key=lambda n: int(n.split("_")[1]))
    return np.mean([neighbour_disagreement(d[n], d["labels"], k) for n in layers], 0)


def precision_at_flipped(score: np.ndarray, flipped: np.ndarray) -> float:
    k = int(flipped.sum())
    return float(flipped[np.argsort(-score, kind="stable")[:k]].mean())


def candidates(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each candidate's scores (high = suspicious) from one run's dump."""
    losses, margins = d["epoch_losses"], d["epoch_margins"]  # (epochs, samples)
    epochs = losses.shape[0]
    align = np.nan_to_num(robust_z(d["signal_alignment"]))  # NaN (no direction) votes neither way
    loss, aum = robust_z(losses.mean(0)), robust_z(-margins.mean(0))
    per_epoch_loss = robust_z(np.mean([robust_z(losses[e]) for e in range(epochs)], 0))
    per_epoch_aum = robust_z(np.mean([robust_z(-margins[e]) for e in range(epochs)], 0))
    late = epochs // 2
    out: dict[str, Callable[[], np.ndarray] | np.ndarray] = {
        "suspects() as shipped": d["detector_suspects"],
        "loss + AUM + alignment (shipped before the neighbours)": (loss + aum + align) / 3,
        "loss + AUM": (loss + aum) / 2,
        "per-epoch z: loss + AUM + alignment": (per_epoch_loss + per_epoch_aum + align) / 3,
        "late half of epochs: loss + AUM + alignment": (
            robust_z(losses[late:].mean(0)) + robust_z(-margins[late:].mean(0)) + align
        )
        / 3,
        "loss + AUM + half-weight alignment": (loss + aum + 0.5 * align) / 2.5,
        "median over epochs of z: loss + AUM + alignment": (
            robust_z(np.median([robust_z(losses[e]) for e in range(epochs)], 0))
            + robust_z(np.median([robust_z(-margins[e]) for e in range(epochs)], 0))
            + align
        )
        / 3,
        # Each sample's loss at its first visit, before any update on it: out of sample, as
        # cleanlab's folds are, but from a model still early in training.
        "first-visit loss alone": losses[0],
        "loss + AUM + alignment + first-visit loss": (loss + aum + align + robust_z(losses[0])) / 4,
        # How much a sample's own updates lowered its loss (TracIn's self term): what its loss would
        # be without them, read from the store, is the loss plus this.
        "loss + AUM + alignment + log self-influence": (
            loss + aum + align + np.nan_to_num(robust_z(np.log(d["signal_self_influence"] + 1e-12)))
        )
        / 4,
        "baseline: mean loss": d["detector_loss_mean"],
        "baseline: AUM": d["detector_aum"],
    }
    if "features" in d:  # older dumps: the logit layer's inputs alone
        for k in (5, 20):
            out[f"loss + AUM + alignment + {k} neighbours"] = (
                loss + aum + align + robust_z(neighbour_disagreement(d["features"], d["labels"], k))
            ) / 4
        out["10 neighbours alone"] = neighbour_disagreement(d["features"], d["labels"], 10)
    if "features_0" in d:  # every layer's inputs: the neighbour signal's views, recomputed
        fit = (loss + aum + align) / 3
        last = max(int(n.split("_")[1]) for n in d if n.startswith("features_"))
        logit = robust_z(neighbour_disagreement(d[f"features_{last}"], d["labels"], 10))
        for k in (5, 10, 20):
            out[f"two views: fit, and {k} neighbours over every layer"] = (
                fit + robust_z(layers_disagreement(d, k))
            ) / 2
        out["10 neighbours over every layer, alone"] = layers_disagreement(d, 10)
        every = robust_z(layers_disagreement(d, 10))
        out["three views: loss + AUM, alignment, neighbours over every layer"] = (
            (loss + aum) / 2 + align + every
        ) / 3
        out["two views: fit without alignment, and neighbours over every layer"] = (
            (loss + aum) / 2 + every
        ) / 2
        out["two views, each view re-standardised"] = (robust_z(fit) + every) / 2
        middle = np.median([loss, aum, align], 0)
        for k in (5, 10, 20):
            out[f"two views, fit view the median of its z; {k} neighbours over every layer"] = (
                middle + robust_z(layers_disagreement(d, k))
            ) / 2
        out["two views, fit view the median of its z; 10 neighbours in the last layer only"] = (
            middle + logit
        ) / 2
        out["fit view alone, the median of its z"] = middle
        out["two views: fit, and 10 neighbours in the last layer only"] = (fit + logit) / 2
        out["one mean of four z: loss, AUM, alignment, 10 neighbours over every layer"] = (
            loss + aum + align + robust_z(layers_disagreement(d, 10))
        ) / 4
        out["one mean of four z: loss, AUM, alignment, 10 neighbours in the last layer (before)"] = (
            loss + aum + align + logit
        ) / 4
    if "signal_neighbours" in d:  # what suspects() scores since the neighbour signal
        out["two views (the fit view's mean), from suspects()'s own neighbour signal"] = (
            (loss + aum + align) / 3 + robust_z(d["signal_neighbours"])
        ) / 2
    if "labels" in d:  # dumps from before the labels were saved have no class-conditional candidates
        y = d["labels"]
        c_loss, c_aum = by_class(losses.mean(0), y), by_class(-margins.mean(0), y)
        out["class-conditional z: loss + AUM + alignment"] = (c_loss + c_aum + align) / 3
        out["mean of global and class z: loss + AUM, + alignment"] = (
            (loss + c_loss) / 2 + (aum + c_aum) / 2 + align
        ) / 3
    return {k: np.nan_to_num(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", type=Path, required=True, help="detection.py's --dump folder")
    ap.add_argument(
        "--cleanlab", type=Path, default=None, help="a detection results file with cleanlab's runs"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "detection_combos.json")
    args = ap.parse_args(argv)
    cleanlab = {}
    if args.cleanlab is not None:
        for name, r in json.loads(args.cleanlab.read_text())["results"].items():
            for run in r["runs"]:
                c = run["detection"].get("cleanlab")
                if c:
                    cleanlab[(name, run["seed"])] = (c["roc_auc"], c["precision_at_k"])
    scores: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(args.dump.glob("*.npz")):
        name, seed = f.stem.rsplit("_", 1)
        d = dict(np.load(f))
        if "epoch_losses" not in d:
            continue  # a dump from before per-epoch arrays were saved
        flipped = d["flipped"].astype(bool)
        for k, s in candidates(d).items():
            scores[name][k].append((roc_auc_score(flipped, s), precision_at_flipped(s, flipped)))
        if (name, int(seed)) in cleanlab:
            scores[name]["baseline: cleanlab (5 extra fits)"].append(cleanlab[(name, int(seed))])
    summary = {}
    for name, by in scores.items():
        print(f"\n{name} ({len(by['suspects() as shipped'])} seeds): ROC-AUC ± SE / precision@#flipped")
        summary[name] = {}
        for k, v in by.items():
            a = np.asarray(v)
            se = a[:, 0].std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0.0
            summary[name][k] = {
                "auc": a[:, 0].mean(),
                "auc_se": se,
                "precision": a[:, 1].mean(),
                "seeds": len(a),
            }
            print(f"  {k:48s} {a[:, 0].mean():.4f} ± {se:.4f} / {a[:, 1].mean():.3f}")
    args.out.write_text(
        json.dumps(
            {"dump": str(args.dump), "cleanlab_from": str(args.cleanlab), "protocols": summary}, indent=2
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
