"""Epoch-end analytics: each operator turns one committed epoch into scalars, histograms, figures
and tables.

Operators read the store through a per-epoch :class:`Context`, which computes each layer's
per-sample squared norms once for every operator that needs them. Influence sums over epochs
(``Σ_e lr_e …``) are kept running across epochs in a
:class:`~mstore_lightning.analytics.ranking.RunningSum`, so epoch ``e`` reads only epoch ``e``'s
rows; an epoch not yet in the sum (after a resume, say) is read once and added.

:data:`OPERATORS` is the one table of operators: each is registered by :func:`_operator`, and its
parameters and their defaults are its signature's (see :func:`parameters`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mstore_lightning.analytics.geometry import robust_z
from mstore_lightning.analytics.ranking import RunningSum, best
from mstore_lightning.reports import samples

if TYPE_CHECKING:
    from mstore_lightning.reports.figures import Figures

_TINY = np.finfo(np.float64).tiny
MAX_TRACIN_CELLS = 1 << 25  # queries x training ids kept in a running TracIn sum (256 MB of float64)


@dataclass
class Output:
    """What one operator produced for one epoch.

    Attributes:
        scalars: ``name -> value``, logged through ``log_metrics``.
        histograms: ``name -> values``, for loggers that draw histograms.
        figures: ``(name, title, PNG bytes)``.
        tables: ``(name, title, pandas.DataFrame)``.
        note: why something was left out.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)
    tables: list[tuple[str, str, Any]] = field(default_factory=list)
    note: str | None = None


class Skipped(Exception):
    """An operator has nothing to compute on this epoch; the message says why."""


# The one operator table; params are the signatures' and spec.py reads them, so figures load lazily.
OPERATORS: dict[str, Callable[..., Output]] = {}
REQUIRED = inspect.Parameter.empty  # the default of a parameter the user must give


def _operator(fn: Callable[..., Output]) -> Callable[..., Output]:
    """Adds ``fn`` to :data:`OPERATORS` under its own name."""
    OPERATORS[fn.__name__] = fn
    return fn


def parameters(name: str) -> dict[str, Any]:
    """The parameters of operator ``name``, in order, with their defaults.

    Args:
        name: a key of :data:`OPERATORS`.

    Returns:
        ``param -> default``: ``None`` means "decided from the data", :data:`REQUIRED` that no
        default could do (the user must give it).

    Example:
        >>> parameters("tracin")
        {'k': 5, 'epochs': 'all'}
        >>> parameters("similarity")["ids"] is REQUIRED
        True
    """
    _ctx, *params = inspect.signature(OPERATORS[name]).parameters.values()
    return {p.name: p.default for p in params}


def _new_figures() -> Figures:
    from mstore_lightning.reports.figures import Figures

    return Figures()


@dataclass
class Context:
    """One epoch's view for the operators.

    Attributes:
        store: the opened store.
        epoch: the committed epoch being reported.
        sums: running influence sums by name, kept across epochs by the caller.
        plots: the run's figures, kept across epochs by the caller.
        sample_input: ``id -> training sample input`` for image grids, when the dataset is at hand.
        epoch_seconds: wall time of the epoch's training, for throughput.
        left_out: earlier epochs that were not reported, to keep the reports within their share of
            training time: TracIn's running sum skips them.
    """

    store: Any
    epoch: int
    sums: dict[str, RunningSum]
    plots: Figures = field(default_factory=_new_figures)
    sample_input: Callable[[int], Any] | None = None
    epoch_seconds: float | None = None
    left_out: frozenset[int] = frozenset()
    _sq: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    def sqnorms(self, layer: str, epoch: int | None = None) -> np.ndarray:
        """Squared per-sample gradient norms of one layer, aligned with ``sample_ids(epoch)``."""
        key = (self.epoch if epoch is None else epoch, layer)
        if key not in self._sq:
            self._sq[key] = np.asarray(self.store.norms(key[0], [layer]), dtype=np.float64) ** 2
        return self._sq[key]

    def total_sqnorms(self, epoch: int | None = None, layers: list[str] | None = None) -> np.ndarray:
        layers = self.store.layers if layers is None else layers
        return np.sum([self.sqnorms(name, epoch) for name in layers], axis=0)

    def running(self, name: str, which: str) -> RunningSum:
        """The sum over ``"all"`` epochs so far, kept from one report to the next, or a fresh one for
        the ``"current"`` epoch alone."""
        return self.sums.setdefault(name, RunningSum()) if which == "all" else RunningSum()

    def epochs_upto(self, which: str) -> list[int]:
        return [self.epoch] if which == "current" else [e for e in self.store.epochs if e <= self.epoch]


@_operator
def norms(ctx: Context, layers: list[str] | None = None) -> Output:
    """Per-layer gradient-norm statistics, histograms, and the norm distribution per class."""
    store, out = ctx.store, Output()
    chosen = store.layers if layers is None else layers
    unknown = sorted(set(chosen) - set(store.layers))
    if unknown:
        raise ValueError(f"norms: unknown layer(s) {', '.join(unknown)}; the store has {store.layers}.")
    for layer in chosen:
        values = np.sqrt(ctx.sqnorms(layer))
        out.scalars.update(_stats(f"grad_norm/{layer}", values))
        out.histograms[f"grad_norm/{layer}"] = values[np.isfinite(values)]
    total = np.sqrt(ctx.total_sqnorms(layers=chosen))
    out.scalars.update(_stats("grad_norm/total", total))
    out.scalars["grad_norm/nonfinite_share"] = float(np.mean(~np.isfinite(total))) if len(total) else 0.0
    labels = store.row_field(ctx.epoch, "label")
    out.figures.append(
        ("by_class", "Per-sample gradient norm by class", ctx.plots.norms_by_class(total, labels, ctx.epoch))
    )
    return out


@_operator
def self_influence(
    ctx: Context,
    k: int = 20,
    epochs: str = "all",
    threshold: float = 3.5,
    image_shape: Any = None,
    input_key: str | None = None,
) -> Output:
    """``Σ_e lr_e ‖g_i(e)‖²``: the top-``k`` table, the flagged share and, for images, a grid."""
    store, out = ctx.store, Output()
    run = ctx.running("self_influence", epochs)
    wanted = ctx.epochs_upto(epochs)
    todo = [e for e in wanted if e not in run.epochs]
    store.preload(todo, ("ids", "sqnorm"))  # every epoch's records in a few trips, not a few each
    for e in todo:
        run.add(store.sample_ids(e), store.lr(e) * ctx.total_sqnorms(e), [e])
    ids, scores = run.ids, run.scores()
    z = robust_z(np.log(np.maximum(scores, _TINY)))
    out.scalars["self_influence/flagged_share"] = float(np.mean(z > threshold)) if len(z) else 0.0
    out.scalars["self_influence/max"] = float(scores.max()) if len(scores) else 0.0
    out.histograms["self_influence/log10"] = np.log10(np.maximum(scores, _TINY))
    top = best(scores, k)
    table = _frame(
        rank=np.arange(1, len(top) + 1),
        id=ids[top],
        label=_known(ctx, "label", ids[top]),
        loss=_known(ctx, "loss", ids[top]),
        score=scores[top],
        robust_z=z[top],
    )
    span = f"epochs {wanted[0]}-{wanted[-1]}" if len(wanted) > 1 else f"epoch {wanted[0]}"
    out.tables.append(
        ("topk", f"Top {len(top)} self-influence ({span}): likely mislabeled or atypical", table)
    )
    grid = samples.images(ctx.sample_input, ids[top], image_shape, input_key)
    if grid is None and ctx.sample_input is None:
        out.note = (
            "no image grid: the training dataset is not at hand (it must pickle for the report process)"
        )
    elif grid is None:
        out.note = "no image grid: the training samples are not images (set image_shape=[H, W] if they are)"
    else:
        fig = ctx.plots.sample_grid(grid, ids[top], table["label"], f"Most self-influential samples ({span})")
        out.figures.append(("grid", "Most suspicious samples, with their given labels", fig))
    return out


@_operator
def suspects(ctx: Context, k: int = 20, image_shape: Any = None, input_key: str | None = None) -> Output:
    """``store.suspects()`` over the epochs so far: the top-``k`` table with each one's signals and
    flags, the share of each class among them, flagged shares and, for images, a grid."""
    out = Output()
    epochs = ctx.epochs_upto("all")
    sus = ctx.store.suspects(epochs=epochs)
    n = max(len(sus), 1)
    out.scalars["suspects/conflicting_share"] = float(sus.flags["conflicting"].sum() / n)
    out.scalars["suspects/duplicate_conflict_share"] = float(sus.flags["duplicate_conflict"].sum() / n)
    out.histograms["suspects/score"] = sus.scores
    top = sus.top(k)
    labels = _known(ctx, "label", top.ids)
    table = _frame(
        rank=np.arange(1, len(top) + 1),
        id=top.ids,
        label=labels,
        score=top.scores,
        **top.signals,
        **top.flags,
    )
    span = f"epochs {epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"
    out.tables.append(
        ("top", f"Top {len(top)} suspects ({span}), most suspicious first, with their signals", table)
    )
    if (labels >= 0).any():
        classes, counts = np.unique(labels[labels >= 0], return_counts=True)
        everyone = _known(ctx, "label", sus.ids)
        base = np.array([(everyone == c).mean() for c in classes])
        out.tables.append(
            (
                "classes",
                f"Share of each class among the top {len(top)} suspects, and among all samples",
                _frame(label=classes, share_of_suspects=counts / counts.sum(), share_of_all=base),
            )
        )
    if sus.groups:
        out.tables.append(
            (
                "duplicates",
                "Near-identical inputs that carry different labels",
                _frame(
                    group=np.arange(1, len(sus.groups) + 1), ids=[" ".join(map(str, g)) for g in sus.groups]
                ),
            )
        )
    if sus.notes:
        out.note = "; ".join(sus.notes)
    grid = samples.images(ctx.sample_input, top.ids, image_shape, input_key)
    if grid is not None:
        fig = ctx.plots.sample_grid(grid, top.ids, table["label"], f"Top suspects ({span})")
        out.figures.append(("grid", "Top suspects, with their given labels", fig))
    return out


@_operator
def tracin(ctx: Context, k: int = 5, epochs: str = "all") -> Output:
    """TracIn of every query sample: its ``k`` strongest training proponents."""
    store, out = ctx.store, Output()
    if not store.has_queries(ctx.epoch):
        raise Skipped("no query rows in this epoch: pass GradientCapture(query=loader) to capture them")
    queries = store.sample_ids(ctx.epoch, "query")
    cells = len(queries) * len(store.sample_ids(ctx.epoch))
    if epochs == "all" and cells > MAX_TRACIN_CELLS:
        epochs, out.note = "current", f"{cells:,} query x training scores: summed over this epoch only"
    run = ctx.running("tracin", epochs)
    todo = [
        e
        for e in ctx.epochs_upto(epochs)
        if e not in run.epochs
        and e not in ctx.left_out
        # an epoch captured with other (or no) queries cannot join the sum
        and store.has_queries(e)
        and np.array_equal(store.sample_ids(e, "query"), queries)
    ]
    if todo:
        summed = store.tracin(queries, epochs=todo)  # every one of them has these query rows
        run.add(summed.ids, summed.scores, todo)
    left = sorted(e for e in ctx.left_out if e <= ctx.epoch) if epochs == "all" else []
    if left:
        out.note = (
            f"summed over the {len(run.epochs)} reported epochs; the {len(left)} epochs skipped to keep "
            "the reports within analytics_max_overhead are left out (store.tracin sums every epoch)"
        )
    ids, scores = run.ids, run.scores()
    k = min(k, len(ids))
    top = best(scores, k)
    q_labels = _known(ctx, "label", queries, split="query")
    top_labels = _known(ctx, "label", ids[top].reshape(-1)).reshape(top.shape)
    known = q_labels >= 0
    if known.any():
        out.scalars["tracin/top1_same_label"] = float(np.mean(top_labels[known, 0] == q_labels[known]))
    out.scalars["tracin/epochs_summed"] = float(len(run.epochs))
    # Summed over fewer epochs than store.tracin, the value gets its own name, so that nobody
    # compares it with the CLI's as if it were the same number.
    summed = ", ".join(map(str, sorted(run.epochs)))
    column = "tracin_over_reported_epochs" if left else "score"
    table = _frame(
        query=np.repeat(queries, k),
        query_label=np.repeat(q_labels, k),
        rank=np.tile(np.arange(1, k + 1), len(queries)),
        id=ids[top].reshape(-1),
        label=top_labels.reshape(-1),
        **{column: np.take_along_axis(scores, top, 1).reshape(-1)},
    )
    title = f"Top {k} TracIn proponents of each query"
    if left:
        title += f": TracIn over reported epochs {summed} (store.tracin and mstore tracin sum every epoch)"
    out.tables.append(("proponents", title, table))
    return out


@_operator
def class_conflicts(ctx: Context) -> Output:
    """Cosines between class gradients, and the share of samples opposing their class."""
    out = Output()
    _need_labels(ctx)
    cc = ctx.store.class_conflicts(ctx.epoch)
    known = np.isfinite(cc.alignment)
    out.scalars["class_conflicts/opposing_share"] = (
        float(np.mean(cc.alignment[known] < 0)) if known.any() else 0.0
    )
    off = ~np.eye(len(cc.classes), dtype=bool)
    if off.any():
        out.scalars["class_conflicts/mean_offdiag_cosine"] = float(np.nanmean(cc.cosine[off]))
        out.scalars["class_conflicts/min_cosine"] = float(np.nanmin(cc.cosine[off]))
    out.figures.append(
        (
            "heatmap",
            "Cosine between class gradients",
            ctx.plots.conflict_heatmap(cc.cosine, cc.classes, ctx.epoch),
        )
    )
    out.tables.append(
        (
            "classes",
            "Share of each class's samples whose gradient opposes their class's",
            _frame(label=cc.classes, opposing_share=cc.opposing_share),
        )
    )
    return out


@_operator
def outliers(ctx: Context, threshold: float = 3.5) -> Output:
    """Samples whose gradient norm is far above the epoch's typical norm."""
    out = Output()
    ids = ctx.store.sample_ids(ctx.epoch)
    z = robust_z(np.log(np.maximum(np.sqrt(ctx.total_sqnorms()), _TINY)))
    flagged = best(z, len(z))
    flagged = flagged[z[flagged] > threshold]
    out.scalars["outliers/flagged_share"] = float(len(flagged) / max(len(ids), 1))
    out.tables.append(
        (
            "flagged",
            f"Samples with a robust z-score of the log gradient norm above {threshold}",
            _frame(id=ids[flagged], label=_known(ctx, "label", ids[flagged]), robust_z=z[flagged]),
        )
    )
    return out


@_operator
def cluster(ctx: Context, k: int = 10, dim: int = 16, seed: int = 0) -> Output:
    """k-means in gradient space, with the sketch's measured error and each cluster's labels."""
    out = Output()
    c = ctx.store.cluster(ctx.epoch, k, dim=dim, seed=seed)
    out.scalars["cluster/inertia"] = float(c.inertia)
    out.scalars["cluster/sketch_error"] = float(c.measured_error)
    labels = _known(ctx, "label", c.ids)
    rows = {"cluster": np.arange(len(c.sizes)), "size": c.sizes}
    if (labels >= 0).any():
        majority, purity = [], []
        for j in range(len(c.sizes)):
            lab = labels[(c.labels == j) & (labels >= 0)]
            counts = np.bincount(lab) if len(lab) else np.zeros(1, dtype=int)
            majority.append(int(counts.argmax()) if len(lab) else -1)
            purity.append(float(counts.max() / len(lab)) if len(lab) else float("nan"))
        rows.update(majority_label=np.array(majority), purity=np.array(purity))
        out.figures.append(
            (
                "labels",
                "Given labels within gradient clusters",
                ctx.plots.cluster_labels(c.labels, labels, ctx.epoch),
            )
        )
    out.tables.append(
        ("sizes", f"{len(c.sizes)} gradient clusters (sketch dim {c.sketch_dim})", _frame(**rows))
    )
    return out


@_operator
def storage(ctx: Context) -> Output:
    """Bytes on disk, what deduplication saved, the ratio to full fp32 gradients, and throughput."""
    return Output(scalars=storage_scalars(ctx.store, ctx.epoch, ctx.epoch_seconds))


def storage_scalars(store: Any, epoch: int, epoch_seconds: float | None = None) -> dict[str, float]:
    """The storage operator's scalars: file sizes and row counts, cheap for any epoch."""
    stored = store.nbytes_stored(epoch)
    rows = store.row_count(epoch)
    full = rows * sum(4 * _param_numel(store.layer_spec(name)) for name in store.layers)
    saved = store.dedup_saved(epoch).values()
    out = {
        "storage/epoch_bytes": float(stored),
        "storage/total_bytes": float(store.nbytes_stored()),
        "storage/dedup_saved_disk_bytes": float(sum(max(0, s["disk_bytes"]) for s in saved)),
        "storage/dedup_rows_as_references": float(sum(s["rows_as_references"] for s in saved)),
        "storage/ratio_vs_fp32": float(full / stored) if stored else 0.0,
        "storage/rows": float(rows),
        "capture/dropped_rows": float(store.dropped(epoch)),
    }
    if epoch_seconds:
        out["capture/rows_per_s"] = rows / epoch_seconds
    return out


def cheap_scalars(store: Any, epoch: int, epoch_seconds: float | None = None) -> dict[str, float]:
    """What an epoch the reports skip still logs: storage, and the gradient-norm statistics and
    flagged share of the layers whose norms the capture kept (no row is read)."""
    out = storage_scalars(store, epoch, epoch_seconds)
    kept = {n: store.catalog.captured_sqnorms(epoch, [n]) for n in store.layers}
    kept = {n: v for n, v in kept.items() if v is not None}
    for layer, sq in kept.items():
        out.update(_stats(f"grad_norm/{layer}", np.sqrt(sq)))
    if kept and len(kept) == len(store.layers):
        total = np.sqrt(np.sum(list(kept.values()), axis=0))
        out.update(_stats("grad_norm/total", total))
        z = robust_z(np.log(np.maximum(total, _TINY)))
        out["outliers/flagged_share"] = float(np.mean(z > 3.5)) if len(z) else 0.0
    return out


@_operator
def topk(ctx: Context, ids: list[int] | None = None, k: int = 5, metric: str = "cosine") -> Output:
    """Each query's ``k`` nearest training samples in this epoch's gradient space."""
    store, out = ctx.store, Output()
    split = "query" if store.has_queries(ctx.epoch) else "train"
    queries = _present(ctx, ids, split, "topk", out)
    nb = store.topk(queries, k, epoch=ctx.epoch, metric=metric)
    k = nb.ids.shape[1]
    q_labels = _known(ctx, "label", queries, split=split)
    labels = _known(ctx, "label", nb.ids.reshape(-1)).reshape(nb.ids.shape)
    known = (q_labels >= 0) & (labels[:, 0] >= 0) if k else np.zeros(len(queries), dtype=bool)
    if known.any():
        out.scalars["topk/top1_same_label"] = float(np.mean(labels[known, 0] == q_labels[known]))
    table = _frame(
        query=np.repeat(queries, k),
        query_label=np.repeat(q_labels, k),
        rank=np.tile(np.arange(1, k + 1), len(queries)),
        id=nb.ids.reshape(-1),
        label=labels.reshape(-1),
        score=nb.scores.reshape(-1),
    )
    rows = "query rows" if split == "query" else "training rows"
    out.tables.append(("neighbours", f"Top {k} training samples by gradient {metric} ({rows})", table))
    return out


@_operator
def similarity(ctx: Context, ids: list[int], metric: str = "cosine") -> Output:
    """Gradient cosines (or inner products) between chosen training samples, as a heatmap."""
    store, out = ctx.store, Output()
    chosen = _present(ctx, ids, "train", "similarity", out)
    matrix = np.asarray(
        store.cosine(ctx.epoch, chosen, chosen)
        if metric == "cosine"
        else store.dot(ctx.epoch, chosen, chosen),
        dtype=np.float64,
    )
    off = ~np.eye(len(chosen), dtype=bool)
    if off.any():
        out.scalars[f"similarity/mean_offdiag_{metric}"] = float(np.nanmean(matrix[off]))
    out.figures.append(
        (
            "heatmap",
            f"Gradient {metric} between samples",
            ctx.plots.sample_heatmap(matrix, chosen, metric, ctx.epoch),
        )
    )
    out.tables.append(
        (
            "pairs",
            f"Gradient {metric} between samples",
            _frame(
                id=np.repeat(chosen, len(chosen)),
                other=np.tile(chosen, len(chosen)),
                score=matrix.reshape(-1),
            ),
        )
    )
    return out


@_operator
def class_gradients(ctx: Context) -> Output:
    """Each class's summed gradient: its sample count and norm."""
    out = Output()
    _need_labels(ctx)
    frame = ctx.store.class_gradients(ctx.epoch).to_pandas()
    for c, norm in zip(frame["class"], frame["norm"]):
        out.scalars[f"class_gradients/norm/{int(c)}"] = float(norm)
    out.tables.append(("classes", "Norm of each class's summed gradient", frame))
    return out


@_operator
def restore(ctx: Context, ids: list[int], layers: list[str] | None = None) -> Output:
    """The restored gradients of watched samples: each parameter's norm, logged epoch after epoch."""
    store, out = ctx.store, Output()
    chosen = _present(ctx, ids, "train", "restore", out)
    names = store.layers if layers is None else layers
    unknown = sorted(set(names) - set(store.layers))
    if unknown:
        raise ValueError(f"restore: unknown layer(s) {', '.join(unknown)}; the store has {store.layers}.")
    rows: dict[str, list[Any]] = {"id": [], "layer": [], "param": [], "norm": []}
    for layer in names:
        for param, grads in store.restore(ctx.epoch, layer, chosen).items():
            norms = grads.double().reshape(len(chosen), -1).norm(dim=1).numpy()
            for sid, norm in zip(chosen, norms):
                out.scalars[f"restore/{int(sid)}/{layer}.{param}"] = float(norm)
                rows["id"].append(int(sid))
                rows["layer"].append(layer)
                rows["param"].append(param)
                rows["norm"].append(float(norm))
    out.tables.append(("norms", "Norms of the watched samples' restored gradients", _frame(**rows)))
    return out


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {}
    q50, q95 = np.percentile(v, [50, 95])
    return {
        f"{prefix}/mean": float(v.mean()),
        f"{prefix}/median": float(q50),
        f"{prefix}/p95": float(q95),
        f"{prefix}/max": float(v.max()),
    }


def _present(ctx: Context, ids: list[int] | None, split: str, name: str, out: Output) -> np.ndarray:
    """``ids`` that this epoch holds in ``split`` (the epoch's query rows when ``ids`` is ``None``);
    those it lacks are named in ``out.note``."""
    own = ctx.store.sample_ids(ctx.epoch, split)
    if ids is None:
        if split != "query":
            raise Skipped(f"no query rows in this epoch: give {name} the sample ids, {{'ids': [...]}}")
        return np.asarray(own, dtype=np.int64)
    wanted = np.asarray(ids, dtype=np.int64)
    here = np.isin(wanted, own)
    lacking = wanted[~here].tolist()
    if lacking:
        shown = ", ".join(map(str, lacking[:10])) + (", ..." if len(lacking) > 10 else "")
        out.note = f"{len(lacking)} of the ids are not in this epoch's {split} rows: {shown}"
    if not here.any():
        raise Skipped(out.note)
    return wanted[here]


def _known(ctx: Context, name: str, ids: np.ndarray, split: str = "train") -> np.ndarray:
    """A row field for ``ids`` of this epoch; ids this epoch did not capture get -1 (or NaN)."""
    own = ctx.store.sample_ids(ctx.epoch, split)
    values = ctx.store.row_field(ctx.epoch, name, split)
    order = np.argsort(own, kind="stable")
    pos = np.minimum(np.searchsorted(own, ids, sorter=order), max(len(own) - 1, 0))
    hit = (len(own) > 0) & (own[order[pos]] == ids) if len(own) else np.zeros(len(ids), dtype=bool)
    missing = np.nan if values.dtype.kind == "f" else -1
    result = np.full(len(ids), missing, dtype=values.dtype)
    result[hit] = values[order[pos[hit]]]
    return result


def _param_numel(spec: dict[str, Any]) -> int:
    return sum(int(np.prod(shape)) for shape in spec.get("param_shapes", {}).values())


def _frame(**columns: Any) -> Any:
    """A table of ``columns``, less any float column with no value at all (e.g. losses not recorded)."""
    import pandas as pd

    frame = pd.DataFrame(columns)
    empty = [c for c in frame.columns if frame[c].dtype.kind == "f" and len(frame) and frame[c].isna().all()]
    return frame.drop(columns=empty)


def _need_labels(ctx: Context) -> None:
    if not (ctx.store.row_field(ctx.epoch, "label") >= 0).any():
        raise Skipped("no labels recorded: pass GradientCapture(labels=...) to record them")
