"""One ranking of the training samples to look at first, with the signals behind each place.

Every signal is read from the store; none needs the model, more training or another pass:

- ``loss``: the sample's mean loss over the epochs (high is suspicious). A mislabeled sample is one
  the model cannot fit without memorising it, so its loss stays high while the rest fall.
- ``margin``: the area under the margin, the mean over epochs of ``z_y − max_{j≠y} z_j`` (low is
  suspicious; Pleiss et al., 2020): where another class keeps winning, the label is likely wrong.
- ``self_influence``: ``Σ_e lr_e ‖g_i(e)‖²`` (high is suspicious; TracIn's self-influence): how hard
  the sample pulls on the weights.
- ``alignment``: the cosine of the sample's gradient with its own class's direction at the last
  epoch, the sum of the class's *unit* gradients (low is suspicious): a sample whose gradient opposes
  what most of its class asks for pulls the class elsewhere. Unit gradients give each sample one
  vote; late in training the few mislabeled samples hold most of a class's gradient, and a plain sum
  would make their direction the class's.
- ``neighbours``: the share of the sample's ``NEIGHBOURS`` (10) nearest training samples that carry
  another label, averaged over the layers (high is suspicious; deep k-NN, Papernot & McDaniel,
  2018, and Bahri et al., 2020). In each layer that stores its input, nearness is the cosine of the
  inputs at the last epoch, each pooled by its family (``Extractor.input_features``): a sequence's
  token features averaged, a feature map kept in place, an embedding's ids counted. It asks the
  other samples rather than the model's fit of this one: a sample the model memorised still stands
  out among neighbours of its true class, and the early layers, which stay near the data, still
  group the samples where the model fits badly.

Losses and margins come from the rows the capture stored (see ``capture.signals``); a store without
them ranks on the gradient signals alone.

**How they are combined.** Each signal is standardised to a robust z-score,
``0.6745 · (x − median) / MAD`` over the samples (the standard deviation where the MAD is 0),
oriented so that high is suspicious. The score weighs two views of the label equally: how the
training fits it (``loss``, ``margin`` and ``alignment``) and how the samples around it are labelled
(``neighbours``); a view's value is the median of its z-scores. The fit view asks the model, and is
as good as the run's fit; the neighbour view asks the data as the layers see it, and holds where a
run fits badly or memorises its noise. The median takes the middle of the fit view's three
opinions, so one that fails on a run (a loss driven down by memorising, a gradient direction blurred
by a poor fit) does not carry the view. Standardising puts signals of different units on one scale
without a fitted weight, so nothing in the combination is tuned to a data set; the median and MAD
keep the mislabeled tail itself from setting the scale; and, unlike ranks, z-scores keep the
strength of the evidence, which is what separates a 10% tail. ``k = 10`` is a usual size for deep
k-NN, not a fitted value. ``self_influence`` is reported beside them but left out of the score: a
gradient's norm is its loss times its features' norm, so it repeats the loss and adds atypical
inputs that are correctly labelled. A signal unknown for a sample (NaN) leaves it out of that
sample's view, and a view with no known signal leaves the view out. Ids break ties, so the ranking
is deterministic. ``benchmarks/detection.py`` measures the combination against each signal alone
and against cleanlab on four data sets, uniform and pair flips, five seeds each;
``benchmarks/detection_combos.py`` scores the alternatives (one mean of all signals, the mean
within a view, other ``k``) on the same runs.

**Cost.** The neighbour signal compares every pair of rows in every layer. It is left out past
``MAX_DUPLICATE_ROWS`` rows; inputs wider than ``NEIGHBOUR_WIDTH`` are count-sketched to it; and where
all layers would take more than ``NEIGHBOUR_WORK`` multiply-adds, it reads evenly spaced layers (the
last always), with a note.

**Flags.** ``conflicting``: the sample's gradient opposes its class's (``alignment < 0``).
``duplicate_conflict``: its input is (near) identical to another sample's that carries another label,
found on the stored input rows of the first layer fed by data (``‖a_i − a_j‖ <= 1%`` of the larger
norm: within int8 rounding, far inside the spread of any real class); ``groups`` lists each such
group of ids.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mstore_lightning.analytics.classes import class_conflicts
from mstore_lightning.analytics.frames import frame
from mstore_lightning.analytics.geometry import robust_z
from mstore_lightning.analytics.influence import self_influence
from mstore_lightning.analytics.kernels import as_scan
from mstore_lightning.store.layout import MARGINS, SQNORMS

# Signal name -> +1 when high is suspicious, -1 when low is.
DIRECTION = {"loss": 1.0, "margin": -1.0, "self_influence": 1.0, "alignment": -1.0, "neighbours": 1.0}
NEIGHBOURS = 10  # k of the neighbour signal
NEIGHBOUR_WIDTH = 4096  # a layer's input wider than this is count-sketched to it
NEIGHBOUR_WORK = 2e11  # multiply-adds of the neighbour signal's pairwise cosines, over its layers
DUPLICATE_DISTANCE = 0.01  # relative: ||a_i - a_j|| <= this x max(||a_i||, ||a_j||)
MAX_DUPLICATE_ROWS = 50_000  # the pairwise searches are quadratic; past this they are skipped, with a note


@dataclass
class Suspects:
    """Training ids ranked most suspicious first.

    Attributes:
        ids: the training ids, most suspicious first.
        scores: the combined score of each (mean robust z-score; higher is worse).
        signals: each signal's value per id, aligned with ``ids`` (NaN where it is unknown).
        flags: ``conflicting`` and ``duplicate_conflict`` per id, aligned with ``ids``.
        groups: ids of (near) identical inputs that carry different labels, one list per group.
        notes: what was left out, and why.
    """

    ids: np.ndarray
    scores: np.ndarray
    signals: dict[str, np.ndarray]
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def top(self, k: int) -> Suspects:
        """The first ``k`` suspects."""
        keep = slice(0, k)
        return Suspects(
            self.ids[keep],
            self.scores[keep],
            {n: v[keep] for n, v in self.signals.items()},
            {n: v[keep] for n, v in self.flags.items()},
            self.groups,
            self.notes,
        )

    def to_pandas(self) -> Any:
        """One row per id, most suspicious first: rank, id, score, each signal and each flag."""
        return frame(
            {
                "rank": np.arange(1, len(self.ids) + 1),
                "id": self.ids,
                "score": self.scores,
                **self.signals,
                **self.flags,
            }
        )


def suspects(
    store: Any, epochs: Sequence[int] | None = None, k: int | None = None, layers: Sequence[str] | None = None
) -> Suspects:
    """Every training id ranked from most to least suspicious (see the module's docstring).

    Args:
        store: a store or its scan.
        epochs: the epochs whose rows are read (all committed by default).
        k: keep only the ``k`` most suspicious.
        layers: the layers the gradient signals read (all by default).
    """
    scan = as_scan(store)
    cat = scan.catalog
    epochs = list(cat.epochs if epochs is None else epochs)
    if not epochs:
        raise ValueError("The store has no committed epoch to rank samples from.")
    cat.preload(epochs, ("ids", SQNORMS, "loss", MARGINS))  # every record in a few round trips
    influence = self_influence(scan, epochs, layers)
    ids = influence.ids
    signals: dict[str, np.ndarray] = {"self_influence": np.asarray(influence.scores, dtype=np.float64)}
    notes: list[str] = []
    for name, record in (("loss", "loss"), ("margin", MARGINS)):
        values = _mean_by_id(cat, epochs, record, ids)
        if values is None or np.isnan(values).all():
            notes.append(f"no {name} was recorded; the ranking goes without it")
        else:
            signals[name] = values
    last = epochs[-1]
    labels = cat.row_field(last, "label")
    alignment = np.full(len(ids), np.nan)
    groups: list[list[int]] = []
    if (labels >= 0).any():
        # The class pass reads the last epoch, the duplicate check the first (the same inputs every
        # epoch; the first holds them in place): their chunks are read in one batch where they fit.
        first = epochs[0]
        for run in scan.stage(sorted({first, last}), layers, ["train"]):
            if last in run:
                conflicts = class_conflicts(scan, last, layers, unit=True)
                near, note = neighbour_disagreement(scan, last, layers)
                if note:
                    notes.append(note)
            if first in run:
                groups, note = duplicate_groups(scan, first)
                if note:
                    notes.append(note)
        at = np.searchsorted(ids, conflicts.ids)
        alignment[at] = conflicts.alignment
        signals["alignment"] = alignment
        if near is not None:
            signals["neighbours"] = np.full(len(ids), np.nan)
            signals["neighbours"][np.searchsorted(ids, cat.row_field(last, "ids"))] = near
    else:
        notes.append("no labels were recorded: no class alignment, and no duplicate check")
    scores = combine(signals)
    order = np.lexsort((ids, -scores))  # highest score first; ids break ties
    flags = {"conflicting": np.nan_to_num(alignment, nan=1.0) < 0}
    in_group = np.zeros(len(ids), dtype=bool)
    members = np.array(sorted({i for g in groups for i in g}), dtype=np.int64)
    in_group[np.searchsorted(ids, members)] = True
    flags["duplicate_conflict"] = in_group
    out = Suspects(
        ids[order],
        scores[order],
        {n: v[order] for n, v in signals.items()},
        {n: v[order] for n, v in flags.items()},
        groups,
        notes,
    )
    return out.top(k) if k is not None else out


# The score's two views of a label, weighted equally: how the training fits it, and how the samples
# around it are labelled. The other signals are reported beside them.
VIEWS = (("loss", "margin", "alignment"), ("neighbours",))
SCORED = tuple(name for view in VIEWS for name in view)


def combine(signals: dict[str, np.ndarray]) -> np.ndarray:
    """Each sample's score: the mean over the :data:`VIEWS` of the median of the view's robust
    z-scores (oriented: high is suspicious), over the signals present in ``signals``; a NaN value
    leaves that signal out of the sample's view, and a view with none known leaves the view out."""
    n = len(next(iter(signals.values())))
    views = []
    for view in VIEWS:
        zs = []
        for name in view:
            values = signals.get(name)
            if values is None or np.isnan(values).all():
                continue
            z = np.full(n, np.nan)
            known = ~np.isnan(values)
            z[known] = robust_z(DIRECTION[name] * values[known])
            zs.append(z)
        if zs:
            stack = np.array(zs)
            seen = ~np.isnan(stack).all(0)
            middle = np.full(n, np.nan)
            middle[seen] = np.nanmedian(stack[:, seen], axis=0)
            views.append(middle)
    if not views:
        return np.zeros(n)
    stack = np.array(views)
    count = (~np.isnan(stack)).sum(0)
    return np.divide(np.nansum(stack, 0), count, out=np.zeros(n), where=count > 0)


def _mean_by_id(cat: Any, epochs: Sequence[int], record: str, ids: np.ndarray) -> np.ndarray | None:
    """The mean over ``epochs`` of row record ``record`` for each of ``ids`` (NaN where never seen)."""
    total, count = np.zeros(len(ids)), np.zeros(len(ids))
    found = False
    for e in epochs:
        parts = cat.optional_records(e, record)
        if parts is None:
            continue
        found = True
        values = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
        at = np.searchsorted(ids, cat.row_field(e, "ids"))
        ok = ~np.isnan(values)
        np.add.at(total, at[ok], values[ok])
        np.add.at(count, at[ok], 1)
    if not found:
        return None
    return np.divide(total, count, out=np.full(len(ids), np.nan), where=count > 0)


def neighbour_disagreement(
    scan: Any, epoch: int, layers: Sequence[str] | None = None
) -> tuple[np.ndarray | None, str | None]:
    """For each training row of ``epoch``, the share of its :data:`NEIGHBOURS` nearest labelled rows
    that carry another label, averaged over the layers that store their inputs (cosine of
    ``Representation.input_features``); NaN for a row without a label. ``None`` and a note where it
    cannot be computed, and a note where the work bound left layers out."""
    labels = scan.catalog.row_field(epoch, "label")
    known = labels >= 0
    reps = [r for r in scan.catalog.select(layers) if r.input_width is not None]
    if not reps:
        return None, "no stored layer keeps its input: no neighbour signal"
    n = int(known.sum())
    if n > MAX_DUPLICATE_ROWS:
        return None, f"the neighbour signal is left out past {MAX_DUPLICATE_ROWS:,} rows"
    k = min(NEIGHBOURS, n - 1)
    if k < 1:
        return None, "too few labelled samples for the neighbour signal"
    chosen = within_work(reps, len(labels), NEIGHBOUR_WORK)
    note = None
    if len(chosen) < len(reps):
        note = (
            f"the neighbour signal read {len(chosen)} of {len(reps)} layers, evenly spaced, to stay "
            f"within {NEIGHBOUR_WORK:.0e} multiply-adds"
        )
    lab = torch.as_tensor(np.array(labels))  # the catalog's own array is read-only
    total = np.zeros(len(labels))
    for rep in chosen:
        total += _disagreement(torch.nn.functional.normalize(points(scan, epoch, rep), dim=1), lab, known, k)
    out = total / len(chosen)
    out[~known] = np.nan
    return out, note


def points(scan: Any, epoch: int, rep: Any) -> torch.Tensor:
    """``(rows, width)``: each training row's stored input to layer ``rep`` in ``epoch`` as the
    neighbour signal compares it (the family's pooling, count-sketched past
    :data:`NEIGHBOUR_WIDTH`), in the epoch's row order."""
    return torch.cat(
        [
            _fold(rep.input_features(b.load()), NEIGHBOUR_WIDTH, rep.name)
            for b in scan.source(epoch, rep).blocks()
        ]
    )


def within_work(reps: Sequence[Any], rows: int, work: float) -> list[Any]:
    """``reps`` whole where comparing every pair of ``rows`` in each costs at most ``work``
    multiply-adds, else the most that fit, evenly spaced, the last always among them (one where
    even it alone costs more)."""
    widths = np.array([min(r.input_width, NEIGHBOUR_WIDTH) for r in reps], dtype=np.float64)
    for m in range(len(reps), 0, -1):
        at = np.unique(np.round(np.linspace(len(reps) - 1, 0, m)).astype(int))
        if rows * rows * widths[at].sum() <= work or len(at) == 1:
            return [reps[i] for i in sorted(at)]
    return []  # no layers


def _fold(x: torch.Tensor, width: int, layer: str) -> torch.Tensor:
    """``x`` with its columns past ``width`` summed into ``width`` buckets with random signs (a
    count sketch, seeded by the layer's name): inner products are kept in expectation."""
    if x.shape[1] <= width:
        return x
    g = torch.Generator().manual_seed(zlib.crc32(layer.encode()))
    bucket = torch.randint(width, (x.shape[1],), generator=g)
    sign = (torch.randint(2, (x.shape[1],), generator=g) * 2 - 1).to(x.dtype)
    return x.new_zeros(len(x), width).index_add_(1, bucket, x * sign)


def _disagreement(unit: torch.Tensor, labels: torch.Tensor, known: np.ndarray, k: int) -> np.ndarray:
    """The share of each row's ``k`` nearest labelled rows (cosine of the unit rows) with another
    label; every row but its own is a candidate."""
    others = torch.from_numpy(~known) if not known.all() else None
    out = np.zeros(len(unit))
    step = 2048
    for lo in range(0, len(unit), step):
        sim = unit[lo : lo + step] @ unit.T
        if others is not None:
            sim[:, others] = -torch.inf
        here = torch.arange(lo, lo + len(sim))
        sim[torch.arange(len(sim)), here] = -torch.inf  # not its own neighbour
        nearest = sim.topk(k, dim=1).indices
        out[lo : lo + len(sim)] = (labels[nearest] != labels[here, None]).double().mean(1).numpy()
    return out


def duplicate_groups(scan: Any, epoch: int) -> tuple[list[list[int]], str | None]:
    """Groups of ids whose inputs are (near) identical but whose labels differ, and a note when the
    search was left out."""
    source = next((s for s in scan.sources(epoch, None) if s.rep.arrays.get("a", {}).get("dedup")), None)
    if source is None:
        return [], "no layer stores its input as the data gives it: no duplicate check"
    ids, labels = scan.catalog.row_field(epoch, "ids"), scan.catalog.row_field(epoch, "label")
    if len(ids) > MAX_DUPLICATE_ROWS:
        return [], f"the duplicate check is left out past {MAX_DUPLICATE_ROWS:,} rows"
    a = torch.cat([b.load()["a"].reshape(b.rows, -1).float() for b in source.blocks()])
    # A near pair's cosine is at least sqrt(1 − DUPLICATE_DISTANCE²) (its smaller norm at its best),
    # so one product of unit rows finds the few candidates; they are then measured exactly. The
    # slack absorbs float32 rounding of the cosine.
    norms = a.norm(dim=1)
    unit = a / norms.clamp_min(1e-30)[:, None]
    unit[norms == 0, 0] = 1.0  # zero inputs: one direction, so that they meet each other
    least = (1 - DUPLICATE_DISTANCE**2) ** 0.5 - 1e-4
    pairs = []
    step = 2048
    for lo in range(0, len(ids), step):
        rows, cols = torch.nonzero(unit[lo : lo + step] @ unit.T >= least, as_tuple=True)
        rows += lo
        keep = rows < cols  # each pair once, no sample with itself
        rows, cols = rows[keep], cols[keep]
        dist = (a[rows].double() - a[cols].double()).norm(dim=1)
        near = dist <= DUPLICATE_DISTANCE * torch.maximum(norms[rows], norms[cols]).double()
        pairs += list(zip(rows[near].tolist(), cols[near].tolist()))
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    groups = [
        sorted(int(ids[i]) for i in rows)
        for rows in members.values()
        if len({int(labels[i]) for i in rows}) > 1
    ]
    return sorted(groups), None
