"""What the ``mstore`` command writes: tables as text, CSV, JSON or Parquet, and its progress bars."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

FACTOR_BLOCK = 4096  # rows of factors decoded at a time by ``export --factors``


def emit(args: argparse.Namespace, frame: Any) -> int:
    fmt = args.format or (suffix_format(args.output, ("csv", "json")) if args.output else None) or "table"
    if fmt == "table":
        text = frame.to_string(index=False, na_rep="") + "\n"
    elif fmt == "csv":
        text = frame.to_csv(index=False)
    else:
        records = [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
        text = json.dumps(records, indent=1, allow_nan=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        if not args.quiet:
            print(f"wrote {len(frame)} rows to {args.output}", file=sys.stderr)
    return 0


def write_rows(frame: Any, fmt: str, path: Path) -> None:
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def write_factors(
    args: argparse.Namespace, store: Any, epoch: int, layers: list[str], columns: dict[str, Any]
) -> None:
    """Writes the rows with one fixed-size list column per stored array of each layer (Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    ids = columns["id"]
    blocks: dict[str, list[np.ndarray]] = {}
    steps = math.ceil(len(ids) / FACTOR_BLOCK) * len(layers)
    with progress_bar(args, "factors", "block", total=steps) as bar:
        for layer in layers:
            for lo in range(0, len(ids), FACTOR_BLOCK):
                got = store.factors(epoch, layer, ids[lo : lo + FACTOR_BLOCK], split=args.split)
                for name, values in got.items():
                    rows = values.reshape(values.shape[0], -1)
                    exact = rows.dtype in (torch.float32, torch.float64, torch.int64, torch.int32)
                    blocks.setdefault(f"{layer}/{name}", []).append((rows if exact else rows.float()).numpy())
                bar.update()
    table = pa.table({k: pa.array(np.asarray(v)) for k, v in columns.items()})
    for name, parts in blocks.items():
        flat = np.concatenate(parts)
        table = table.append_column(
            name, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        )
    pq.write_table(table, args.output)


def frame(columns: Any) -> Any:
    import pandas as pd

    return pd.DataFrame(columns)


def progress_bar(args: argparse.Namespace, desc: str, unit: str, total: int | None = None) -> Any:
    from tqdm import tqdm

    quiet = args.quiet or not sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True
    )


def advance(bar: Any, done: int, total: int) -> None:
    if bar.total != total:
        bar.total = total
    bar.update(done - bar.n)


def suffix_format(path: Path | None, formats: tuple[str, ...]) -> str | None:
    suffix = path.suffix.lower().lstrip(".") if path is not None else ""
    suffix = {"pq": "parquet"}.get(suffix, suffix)
    return suffix if suffix in formats else None


def plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python numbers, NaN and missing labels as null."""
    if value is None or value is missing():
        return None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def missing() -> Any:
    import pandas as pd

    return pd.NA
