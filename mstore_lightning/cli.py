"""The ``mstore`` command: inspect, verify, query and export a gradient store from the shell.

Every subcommand takes the store's path or fsspec URL first. Query results carry sample ids (the
global dataset indices the capture recorded), with each sample's label and loss where the store has
them. Errors are one line on stderr: exit status 2 for a wrong command line, 1 for a missing, damaged
or unreadable store or a sample, epoch or layer that is not in it; 141, silently, when the reader
of stdout goes away (``mstore inspect STORE | head -1``).

Example::

    mstore inspect runs/demo.zarr
    mstore verify runs/demo.zarr
    mstore topk runs/demo.zarr --query 3,17 --k 5 --format csv --output neighbours.csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mstore_lightning import cli_output

PROG = "mstore"
_LABEL_UNKNOWN = -1  # what the store records for a sample without a label
_WIDTH = 88  # help text width


class _UsageError(Exception):
    """A wrong command line: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors end in one line on stderr instead of usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``mstore`` command line and returns its exit status."""
    from mstore_lightning.config import PolicyError
    from mstore_lightning.store import IncompatibleStoreError, StoreReadError

    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc), 2)
    try:
        status = args.run(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below rather than at exit
        return status
    except BrokenPipeError:
        # The reader went away (`mstore inspect STORE | head -1`): stop quietly and exit 141 (128 +
        # SIGPIPE), as a shell reports for tools SIGPIPE ends. Python would otherwise print the error
        # again when it flushes stdout at exit, so stdout is pointed at devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _UsageError as exc:
        return _fail(str(exc), 2)
    except (
        StoreReadError,
        IncompatibleStoreError,
        PolicyError,
        OSError,
        ValueError,
        KeyError,
        ImportError,
    ) as exc:
        if args.debug:
            raise
        return _fail(_message(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # anything else still ends in one line unless --debug
        if args.debug:
            raise
        return _fail(
            f"unexpected {type(exc).__name__}: {_message(exc)} (run with --debug for the traceback)", 1
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``mstore`` argument parser, one subparser per subcommand."""
    parser = _Parser(
        prog=PROG,
        description="Inspect, verify, query and export a gradient store written by GradientCapture.",
        epilog=(
            "examples:\n"
            "  mstore inspect runs/demo.zarr\n"
            "  mstore verify runs/demo.zarr\n"
            "  mstore topk runs/demo.zarr --query 3,17 --k 5\n"
            "  mstore self-influence runs/demo.zarr --top 20 --format csv --output suspicious.csv\n"
            "  mstore suspects runs/demo.zarr --top 20\n"
            "  mstore export runs/demo.zarr --epoch 2 --format parquet --output epoch2.parquet\n\n"
            "Run 'mstore COMMAND --help' for the options of one command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    common = _Parser(add_help=False)
    common.add_argument("store", help="path or fsspec URL of the gradient store")
    opts = common.add_argument_group("general options")
    opts.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no status lines")
    opts.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    opts.add_argument(
        "--storage-options", type=_json_object, default=None, metavar="JSON",
        help="fsspec options for a URL store, as a JSON object, e.g. "
        "'{\"endpoint_url\": \"http://localhost:9000\"}'; for s3:// URLs, s3fs also reads the "
        "standard AWS_* environment variables and ~/.aws files",
    )  # fmt: skip
    output = _Parser(add_help=False)
    out = output.add_argument_group("output")
    out.add_argument(
        "--format", choices=("table", "csv", "json"), help="default: from --output's suffix, else table"
    )
    out.add_argument("--output", "-o", type=Path, metavar="FILE", help="write here instead of stdout")

    def add(
        name: str, run: Callable[[argparse.Namespace], int], summary: str, examples: str, *parents: Any
    ) -> Any:
        sub = commands.add_parser(
            name, help=summary, description=textwrap.fill(summary, _WIDTH), epilog=f"examples:\n{examples}",
            parents=[common, *parents], formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        sub.set_defaults(run=run)
        return sub

    add(
        "inspect", _inspect,
        "Summarise a store: epochs (committed and open), layers and their representation, rows per epoch, "
        "bytes on disk and what deduplication saved.",
        "  mstore inspect runs/demo.zarr",
    )  # fmt: skip
    add(
        "verify", _verify,
        "Decode every chunk (each carries a crc32c checksum) and check metadata, commits and deduplication "
        "references. Exits 1 and names the array and chunk when anything is damaged.",
        "  mstore verify runs/demo.zarr\n  mstore verify s3://bucket/run.zarr --storage-options '{\"anon\": true}'",
    )  # fmt: skip
    topk = add(
        "topk", _topk,
        "The K training samples whose gradients are closest to each query sample's, in one epoch. Query "
        "ids name the samples captured with GradientCapture(query=...) when the epoch has them, else "
        "training samples.",
        "  mstore topk runs/demo.zarr --query 3,17 --k 5\n"
        "  mstore topk runs/demo.zarr --query 3 --k 20 --epoch 1 --metric dot --format json",
        output,
    )  # fmt: skip
    topk.add_argument(
        "--query", type=_ids, nargs="+", required=True, metavar="IDS", help="query sample ids: 3,17 or 3 17"
    )
    topk.add_argument("--k", type=_positive, default=10, help="neighbours per query (default 10)")
    topk.add_argument("--epoch", type=int, help="epoch to search (default: the last committed)")
    topk.add_argument("--metric", choices=("cosine", "dot"), default="cosine", help="default cosine")
    topk.add_argument(
        "--include-self", action="store_true", help="keep a training query's own row among its neighbours"
    )
    topk.add_argument(
        "--layers", type=_names, nargs="+", metavar="LAYERS", help="layers to use (default: all)"
    )
    tracin = add(
        "tracin", _tracin,
        "TracIn influence of every training sample on each query: the sum over epochs of lr_e times the "
        "inner product of their gradients. One row per (query, training sample), most influential first. "
        "Query ids name the samples captured with GradientCapture(query=...) when every epoch has them, "
        "else training samples. Label and loss are those of the last summed epoch holding the sample.",
        "  mstore tracin runs/demo.zarr --query 3,17 --top 10\n"
        "  mstore tracin runs/demo.zarr --query 3 --epochs 1,2 --layers net.2 --format csv -o tracin.csv",
        output,
    )  # fmt: skip
    tracin.add_argument(
        "--query", type=_ids, nargs="+", required=True, metavar="IDS", help="query sample ids: 3,17 or 3 17"
    )
    self_influence = add(
        "self-influence", _self_influence,
        "Self-influence of every training sample: the sum over epochs of lr_e times its squared gradient "
        "norm. High scores point at mislabeled or atypical samples; highest first.",
        "  mstore self-influence runs/demo.zarr --top 20\n"
        "  mstore self-influence runs/demo.zarr --epochs 2 --format json --output self.json",
        output,
    )  # fmt: skip
    suspects = add(
        "suspects", _suspects,
        "Every training sample ranked most suspicious first (likely mislabeled, ambiguous or out of place), "
        "from its loss, margin, self-influence and gradient alignment with its class, with the flags "
        "'conflicting' (gradient opposes its class's) and 'duplicate_conflict' (an identical input "
        "carries another label). Prints the top 20 unless --top or --all is given.",
        "  mstore suspects runs/demo.zarr\n"
        "  mstore suspects runs/demo.zarr --all --format csv --output suspects.csv",
        output,
    )  # fmt: skip
    for sub in (tracin, self_influence, suspects):
        sub.add_argument(
            "--epochs", type=_ids, nargs="+", metavar="EPOCHS", help="epochs to sum (default: all committed)"
        )
        sub.add_argument(
            "--layers", type=_names, nargs="+", metavar="LAYERS", help="layers to use (default: all)"
        )
        sub.add_argument(
            "--top",
            type=_positive,
            metavar="N",
            help=f"keep the N highest scores (per query; default {DEFAULT_TOP})",
        )
        sub.add_argument("--all", action="store_true", help="every score, not the top ones")
    report = add(
        "report", _report,
        "Rewrite the run's self-contained HTML report from the store and its report folder.",
        "  mstore report runs/demo.zarr\n  mstore report runs/demo.zarr --output /tmp/demo.html",
    )  # fmt: skip
    report.add_argument(
        "--output", "-o", type=Path, metavar="PATH", help="HTML file (default: beside the store)"
    )
    report.add_argument(
        "--report-dir", type=Path, metavar="DIR", help="folder of the per-epoch report artifacts"
    )
    export = add(
        "export", _export,
        "Write one row per captured sample of an epoch (id, step, loss, label, gradient norms per layer and "
        "in total, optionally the decoded factors) to Parquet or CSV.",
        "  mstore export runs/demo.zarr --epoch 2 --output epoch2.parquet\n"
        "  mstore export runs/demo.zarr --epoch 0 --split query --format csv --output queries.csv\n"
        "  mstore export runs/demo.zarr --epoch 2 --layers net.0 --factors --output factors.parquet",
    )  # fmt: skip
    export.add_argument("--epoch", type=int, help="epoch to export (default: the last committed)")
    export.add_argument(
        "--layers", type=_names, nargs="+", metavar="LAYERS", help="layers to export (default: all)"
    )
    export.add_argument(
        "--split", choices=("train", "query"), default="train", help="training rows or query rows"
    )
    export.add_argument("--format", choices=("parquet", "csv"), help="default: from --output's suffix")
    export.add_argument("--output", "-o", type=Path, required=True, metavar="FILE", help="file to write")
    export.add_argument(
        "--factors", action="store_true", help="add the decoded factors as list columns (Parquet only)"
    )
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    return parser


# ---------------------------------------------------------------- subcommands
def _inspect(args: argparse.Namespace) -> int:
    from mstore_lightning.facade.info import StoreInfo  # metadata only: no torch to import
    from mstore_lightning.store.verify import epoch_states

    store = StoreInfo.open(args.store, args.storage_options)
    print(store.describe())
    rows = []
    for epoch, state in epoch_states(args.store, args.storage_options).items():
        row: dict[str, Any] = {"epoch": epoch, "state": state}
        if epoch in store.epochs:
            dedup = store.dedup_saved(epoch).values()
            row.update(
                rows=store.row_count(epoch),
                query_rows=store.row_count(epoch, "query"),
                lr=f"{store.lr(epoch):.4g}",
                bytes=store.nbytes_stored(epoch),
                rows_as_references=sum(d["rows_as_references"] for d in dedup),
                dedup_saved_disk_bytes=sum(max(0, d["disk_bytes"]) for d in dedup),
            )
        rows.append(row)
    if rows:  # an open epoch has only its state: its other cells read "-"
        columns = max((list(r) for r in rows), key=len)
        table = cli_output.frame([{c: r.get(c, "-") for c in columns} for r in rows])
        print("\nper epoch:\n" + table.to_string(index=False))
    layers = [
        {"layer": n, "bytes": store.nbytes_stored(layer=n) if store.epochs else 0} for n in store.layers
    ]
    if layers:
        print("\nbytes per layer:\n" + cli_output.frame(layers).to_string(index=False))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mstore_lightning.store.verify import verify

    with cli_output.progress_bar(args, "verify", "chunk") as bar:
        report = verify(
            args.store,
            args.storage_options,
            progress=lambda done, total: cli_output.advance(bar, done, total),
        )
    print(report.summary())
    if report.ok:
        return 0
    more = (
        f" (and {len(report.problems) - 1} more problems, listed above)" if len(report.problems) > 1 else ""
    )
    return _fail(f"{args.store} is damaged: {report.problems[0]}{more}", 1)


def _topk(args: argparse.Namespace) -> int:
    store = _open(args, need_epochs=True)
    epoch = store.epochs[-1] if args.epoch is None else args.epoch
    query = _flat(args.query)
    split = "query" if store.has_queries(epoch) else "train"
    # A training sample is its own nearest neighbour: left out unless asked for. Query rows are
    # other samples (their ids are the query set's), so nothing is left out for them.
    drop_self = split == "train" and not args.include_self
    found = store.topk(query, args.k + drop_self, epoch=epoch, metric=args.metric, layers=_flat(args.layers))
    ids, scores = found.ids, np.asarray(found.scores)
    if drop_self:
        keep = ids != np.asarray(query)[:, None]
        keep[keep.sum(1) > args.k, -1] = False  # the query was not among them: keep the first k
        ids = ids[keep].reshape(len(query), args.k)
        scores = scores[keep].reshape(len(query), args.k)
    k = ids.shape[1]
    columns: dict[str, Any] = {
        "query": np.repeat(query, k),
        "rank": np.tile(np.arange(1, k + 1), len(query)),
        "id": ids.reshape(-1),
        "score": scores.reshape(-1),
    }
    columns.update(_sample_fields(store, [epoch], columns["id"]))
    query_label = _sample_fields(store, [epoch], columns["query"], split, fields=("label",))
    columns.update({f"query_{name}": values for name, values in query_label.items()})
    if drop_self and not args.quiet:
        print("each query's own row is left out (--include-self keeps it)", file=sys.stderr)
    return cli_output.emit(args, cli_output.frame(columns))


def _tracin(args: argparse.Namespace) -> int:
    from mstore_lightning.analytics.ranking import best

    store = _open(args, need_epochs=True)
    epochs, layers, query = _epochs(store, args.epochs), _flat(args.layers), _flat(args.query)
    if len({store.has_queries(e) for e in epochs}) > 1:
        # Some epochs lack query rows, so TracIn takes every query from the training rows: one call
        # keeps that choice the same for all epochs.
        ids, scores = store.tracin(query, epochs=epochs, layers=layers)
    else:
        ids, scores = _sum_epochs(args, epochs, lambda e: store.tracin(query, epochs=[e], layers=layers))
    order = best(scores, _shown(args, scores.shape[-1]))
    n = order.shape[1]
    chosen = ids[order]
    columns: dict[str, Any] = {
        "query": np.repeat(query, n),
        "rank": np.tile(np.arange(1, n + 1), len(query)),
        "id": chosen.reshape(-1),
        "score": np.take_along_axis(scores, order, 1).reshape(-1),
    }
    columns.update(_sample_fields(store, epochs, columns["id"]))
    return cli_output.emit(args, cli_output.frame(columns))


def _self_influence(args: argparse.Namespace) -> int:
    from mstore_lightning.analytics.ranking import best

    store = _open(args, need_epochs=True)
    epochs, layers = _epochs(store, args.epochs), _flat(args.layers)
    ids, scores = _sum_epochs(args, epochs, lambda e: store.self_influence(epochs=[e], layers=layers))
    order = best(scores, _shown(args, len(scores)))
    columns: dict[str, Any] = {"rank": np.arange(1, len(order) + 1), "id": ids[order], "score": scores[order]}
    columns.update(_sample_fields(store, epochs, ids[order]))
    return cli_output.emit(args, cli_output.frame(columns))


DEFAULT_TOP = 20


def _shown(args: argparse.Namespace, total: int) -> int:
    """How many of ``total`` ranked rows to print: ``--top N``, every one with ``--all``, else
    :data:`DEFAULT_TOP`; says so on stderr."""
    n = total if args.all else min(total, args.top or DEFAULT_TOP)
    if not args.quiet:
        what = "every one" if n == total else f"the top {n} of {total} (--top N or --all for more)"
        print(f"{args.command}: showing {what}", file=sys.stderr)
    return n


def _suspects(args: argparse.Namespace) -> int:
    store = _open(args, need_epochs=True)
    epochs, layers = _epochs(store, args.epochs), _flat(args.layers)
    sus = store.suspects(epochs=epochs, layers=layers)
    top = sus.top(_shown(args, len(sus)))
    columns: dict[str, Any] = {"rank": np.arange(1, len(top) + 1), "id": top.ids, "score": top.scores}
    columns.update(_sample_fields(store, epochs, top.ids, fields=("label",)))
    columns.update(top.signals)
    columns.update(top.flags)
    if not args.quiet:
        for note in sus.notes:
            print(f"note: {note}", file=sys.stderr)
    return cli_output.emit(args, cli_output.frame(columns))


def _report(args: argparse.Namespace) -> int:
    from mstore_lightning.reports.html import write_report

    path = write_report(_open(args), report_dir=args.report_dir, out=args.output)
    print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    fmt = args.format or cli_output.suffix_format(args.output, ("parquet", "csv"))
    if fmt is None:
        raise _UsageError(f"cannot tell the format from {str(args.output)!r}; pass --format parquet or csv")
    if args.factors and fmt == "csv":
        raise _UsageError("--factors needs --format parquet: CSV has no list columns for the factor vectors")
    if args.output.exists() and not args.force:
        raise _UsageError(f"{str(args.output)!r} exists; pass --force to overwrite it")
    store = _open(args, need_epochs=True)
    epoch = store.epochs[-1] if args.epoch is None else args.epoch
    layers = _flat(args.layers) or store.layers
    ids = store.sample_ids(epoch, args.split)
    columns: dict[str, Any] = {"id": ids}
    for name in ("step", "loss", "label"):
        columns[name] = store.row_field(epoch, name, args.split)
    squares = np.zeros(len(ids), dtype=np.float64)
    per_layer = {}
    with cli_output.progress_bar(args, "norms", "layer", total=len(layers)) as bar:
        for layer in layers:
            norms = np.asarray(store.norms(epoch, layers=[layer], split=args.split))
            per_layer[f"norm[{layer}]"], squares = norms, squares + norms**2
            bar.update()
    columns["norm"] = np.sqrt(squares)
    columns.update(per_layer)
    if not args.factors:
        cli_output.write_rows(cli_output.frame(columns), fmt, args.output)
    else:
        cli_output.write_factors(args, store, epoch, layers, columns)
    if not args.quiet:
        print(f"wrote {len(ids)} rows of epoch {epoch} ({args.split}) to {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- helpers
def _open(args: argparse.Namespace, need_epochs: bool = False) -> Any:
    from mstore_lightning.facade import open_store
    from mstore_lightning.store import StoreReadError

    store = open_store(args.store, storage_options=args.storage_options)
    if need_epochs and not store.epochs:
        raise StoreReadError(f"{args.store} has no committed epoch yet; nothing to query.")
    return store


def _epochs(store: Any, asked: list[list[int]] | None) -> list[int]:
    return _flat(asked) or list(store.epochs)


def _sum_epochs(
    args: argparse.Namespace, epochs: list[int], one: Callable[[int], Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Sums per-epoch ``(ids, scores)`` results over the union of their ids, one epoch at a time."""
    from mstore_lightning.analytics.ranking import RunningSum

    run = RunningSum()
    with cli_output.progress_bar(args, "epochs", "epoch", total=len(epochs)) as bar:
        for epoch in epochs:
            part = one(epoch)
            run.add(part.ids, part.scores, [epoch])
            bar.update()
    return run.ids, run.scores()


def _sample_fields(
    store: Any,
    epochs: list[int],
    ids: np.ndarray,
    split: str = "train",
    fields: tuple[str, ...] = ("label", "loss"),
) -> dict[str, np.ndarray]:
    """Label and loss of samples ``ids``, from the last of ``epochs`` that holds each; a field the store
    does not know for any of them is left out."""
    ids = np.asarray(ids, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name in fields:
        values = np.full(len(ids), np.nan)
        for epoch in epochs:
            have = store.sample_ids(epoch, split)
            if not len(have):
                continue
            first = np.unique(have, return_index=True)
            pos = np.minimum(np.searchsorted(first[0], ids), len(first[0]) - 1)
            hit = first[0][pos] == ids
            values[hit] = store.row_field(epoch, name, split)[first[1][pos[hit]]]
        if name == "label":
            values[values == _LABEL_UNKNOWN] = np.nan
        if np.isnan(values).all():
            continue
        out[name] = (
            cli_output.frame({name: values}).astype({name: "Int64"})[name] if name == "label" else values
        )
    return out


def _flat(lists: list[list[Any]] | None) -> list[Any] | None:
    return None if lists is None else [x for part in lists for x in part]


def _ids(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [t for t in text.replace(",", " ").split() if t]
    if not names:
        raise argparse.ArgumentTypeError("expected layer names separated by commas")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
