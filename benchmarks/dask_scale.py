"""Analytics on a Dask ``LocalCluster`` over stores several times larger than a worker's memory limit.

For each row count N, 2N and 4N (rows per epoch) the script captures a real store: a Lightning fit
of a small sequence model (three ``Linear`` layers applied at ``SEQ`` positions, tanh, a mean over
positions and a linear head) for two epochs on seeded synthetic data, with a lossless
(``precision="fp32"``, ``representation="factors"``) ``GradientCapture`` of every layer. Stores are
built once, checked with :func:`~mstore_lightning.store.verify.verify`, and kept under ``--scratch``
(outside the repository), so reruns reuse them.

Then ``store.topk``, ``store.tracin`` and ``store.self_influence`` run on every store, each
operator twice per repetition, side by side: on the cluster (``client=``; one task per stored chunk, ``--workers``
single-threaded worker processes, each with ``memory_limit=--memory-limit``) and on the
single-process engine (in a child process of its own, so that its memory is its own). For each run
the script records the wall time, the peak resident memory of every worker and of the single-process
child, and checks that both engines agree (same top-k ids, scores within float32 rounding).

Memory peaks are Linux's ``VmHWM`` (the high-water mark of the resident set), reset through
``/proc/<pid>/clear_refs`` before each run, so a peak is exact and belongs to that run; where the
reset is refused, a thread samples the resident set every 20 ms instead. A worker's resident set
includes torch, numpy, zarr and ``distributed`` themselves (its idle baseline is reported too).

On a machine with few cores the cluster is not faster than the single-process engine: its workers,
scheduler and client share the same cores, and tasks cost a round trip each. What the run shows is
that each worker's memory stays bounded (flat in N, far below the store) and that time grows
linearly with the rows.

Usage:
    python benchmarks/dask_scale.py                          # N = 25,000 rows per epoch, 3 repetitions
    python benchmarks/dask_scale.py --rows 2000 --reps 1     # quick smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import Self

# Worker processes are spawned and import this script's top level again: keep Lightning (and
# anything else heavy that only the store builder needs) out of it, or every worker would carry it.
from mstore_lightning import open_store
from mstore_lightning.store import layout

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dask_scale.json"
DEFAULT_SCRATCH = Path(tempfile.gettempdir()) / "mstore_dask_scale"

# The captured model and run.
SEQ = 4  # positions each Linear sees: factors T*(in+out) stay below the full in*out gradient
WIDTH = 128
CLASSES = 10
EPOCHS = 2
BATCH = 512
LR = 0.05
DATA_SEED = 0
MODEL_SEED = 0
POLICY = {"layers": ["*"], "precision": "fp32", "representation": "factors", "loss_reduction": "mean"}

# The queries.
QUERIES = 8
TOPK = 10

# Agreement of the two engines: both run the same float32 kernels on the same chunks, and add the
# per-chunk results in float64, so they differ by float32 rounding at most.
RTOL = 1e-5
ATOL_SCALE = 1e-7  # absolute tolerance, as a fraction of the largest score

SAMPLE_S = 0.02  # sampling period where VmHWM cannot be reset
MIB = 1 << 20


# ----------------------------------------------------------------------------------------- the store
def store_key(rows: int) -> str:
    """The file name of the store of ``rows`` rows per epoch under the scratch folder."""
    return f"rows{rows}_e{EPOCHS}_t{SEQ}_w{WIDTH}_b{BATCH}_s{layout.SCHEMA_VERSION}"


def ensure_store(rows: int, scratch: Path) -> dict[str, Any]:
    """The store of ``rows`` rows per epoch under ``scratch``, captured and verified unless cached.

    A store counts as cached only when its record (``<key>.json``, written after the fit and the
    verification) is there and names the same configuration.
    """
    path, record = scratch / f"{store_key(rows)}.zarr", scratch / f"{store_key(rows)}.json"
    config = {
        "rows": rows,
        "epochs": EPOCHS,
        "seq": SEQ,
        "width": WIDTH,
        "batch": BATCH,
        "lr": LR,
        "policy": POLICY,
        "schema_version": layout.SCHEMA_VERSION,
    }
    if record.exists() and path.is_dir():
        info = json.loads(record.read_text(encoding="utf-8"))
        if info.get("config") == config and _holds(path, rows):
            return {**info, "path": str(path), "cached": True}
    shutil.rmtree(path, ignore_errors=True)
    record.unlink(missing_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"capturing {rows:,} rows x {EPOCHS} epochs into {path} ...", flush=True)
    start = time.perf_counter()
    capture_store(path, rows)
    build_s = time.perf_counter() - start

    from mstore_lightning.store.verify import verify

    start = time.perf_counter()
    report = verify(path)
    verify_s = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"The captured store {path} fails verification:\n{report.summary()}")
    store = open_store(path)
    info = {
        "config": config,
        "build_s": build_s,
        "verify_s": verify_s,
        "verify_ok": True,
        "bytes_on_disk": store.nbytes_stored(),
        "bytes_decoded": decoded_bytes(store),
        "epochs": store.epochs,
        "layers": store.layers,
    }
    record.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {**info, "path": str(path), "cached": False}


def _holds(path: Path, rows: int) -> bool:
    """Whether the store at ``path`` opens and holds ``rows`` rows in each of its ``EPOCHS`` epochs."""
    try:
        store = open_store(path)
        return len(store.epochs) == EPOCHS and all(len(store.sample_ids(e)) == rows for e in store.epochs)
    except ValueError:  # StoreReadError: gone or damaged since it was built
        return False


def capture_store(path: Path, rows: int) -> None:
    """A real capture: Lightning fits the model for ``EPOCHS`` epochs with a ``GradientCapture``."""
    import lightning as L
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

    from mstore_lightning import GradientCapture

    class SequenceNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.l3 = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
            self.head = nn.Linear(WIDTH, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # tanh, not ReLU: no run of exact zeros for the compressor, so disk bytes track decoded ones
            h = torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x))))))
            return self.head(h.mean(1))

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SequenceNet()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Batches(Dataset):
        """Whole batches by a list of ids; ``index`` carries the sample ids to the capture."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(DATA_SEED)
            self.x = torch.randn(rows, SEQ, WIDTH, generator=g)
            self.y = torch.randint(0, CLASSES, (rows,), generator=g)

        def __len__(self) -> int:
            return rows

        def __getitem__(self, ids: list[int]) -> dict[str, torch.Tensor]:
            index = torch.as_tensor(ids, dtype=torch.int64)
            return {"x": self.x[index], "y": self.y[index], "index": index}

    data = Batches()
    # batch_size=None: the sampler yields whole batches, which the dataset returns collated
    loader = DataLoader(
        data, sampler=BatchSampler(SequentialSampler(data), BATCH, drop_last=False), batch_size=None
    )
    torch.manual_seed(MODEL_SEED)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        callbacks=[GradientCapture(str(path), POLICY, mode="overwrite")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer.fit(Task(), loader)


def decoded_bytes(store: Any) -> int:
    """Bytes of the factors an analytics pass decodes: every row of every layer of every epoch, in
    float32, deduplicated rows counted where they are used."""
    total = 0
    for epoch in store.epochs:
        ids = store.sample_ids(epoch)
        for layer in store.layers:
            one = store.factors(epoch, layer, ids[:1])
            total += len(ids) * sum(t.element_size() * t[0].numel() for t in one.values())
    return total


# ----------------------------------------------------------------------------------------- operators
def _topk(store: Any, queries: np.ndarray, client: Any) -> tuple[np.ndarray, np.ndarray]:
    got = store.topk(queries, TOPK, metric="cosine", client=client)
    return np.asarray(got.ids), np.asarray(got.scores)


def _tracin(store: Any, queries: np.ndarray, client: Any) -> tuple[np.ndarray, np.ndarray]:
    got = store.tracin(queries, client=client)
    return np.asarray(got.ids), np.asarray(got.scores)


def _self_influence(store: Any, queries: np.ndarray, client: Any) -> tuple[np.ndarray, np.ndarray]:
    got = store.self_influence(client=client)
    return np.asarray(got.ids), np.asarray(got.scores)


OPERATORS: dict[str, Callable[[Any, np.ndarray, Any], tuple[np.ndarray, np.ndarray]]] = {
    "topk": _topk,
    "tracin": _tracin,
    "self_influence": _self_influence,
}


def pick_queries(store: Any) -> np.ndarray:
    """``QUERIES`` training ids spread over the last epoch."""
    ids = store.sample_ids(store.epochs[-1])
    return ids[np.linspace(0, len(ids) - 1, QUERIES).astype(np.int64)]


def compare(op: str, cluster: tuple[np.ndarray, np.ndarray], single: tuple[np.ndarray, np.ndarray]) -> dict:
    """How far the cluster's result is from the single-process engine's; raises if they disagree."""
    (ids_c, s_c), (ids_s, s_s) = cluster, single
    scale = float(np.max(np.abs(s_s))) if s_s.size else 0.0
    diff = np.abs(s_c - s_s)
    floor = max(scale * 1e-6, np.finfo(np.float64).tiny)  # relative to values, not to near-zeros
    out = {
        "ids_equal": bool(np.array_equal(ids_c, ids_s)),
        "max_abs_diff": float(diff.max(initial=0.0)),
        "max_rel_diff": float((diff / np.maximum(np.abs(s_s), floor)).max(initial=0.0)),
        "max_abs_score": scale,
    }
    if not out["ids_equal"] or not np.allclose(s_c, s_s, rtol=RTOL, atol=ATOL_SCALE * scale):
        raise SystemExit(f"{op}: the cluster and the single-process engine disagree: {out}")
    return out


def worst(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The larger differences of two :func:`compare` records (repetitions of one operator)."""
    if old is None:
        return new
    return {k: max(old[k], new[k]) if k.startswith("max") else old[k] and new[k] for k in new}


# ------------------------------------------------------------------------------------------- memory
class PeakRss:
    """Peak resident memory of some processes over a ``with`` block.

    Linux keeps each process's resident high-water mark (``VmHWM``); writing ``5`` to its
    ``clear_refs`` resets it, so the peak read at the end is exact and belongs to the block. Where
    that is refused, a thread samples the resident set every ``SAMPLE_S`` seconds instead.

    Args:
        pids: the processes to watch.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self.peaks: dict[int, int] = {}
        self.start: dict[int, int] = {}
        self.method = "VmHWM"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        for pid in self.pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.method = f"sampled every {SAMPLE_S * 1000:.0f} ms"
        self.start = {pid: _rss(pid) for pid in self.pids}
        self.peaks = dict(self.start)
        if self.method != "VmHWM":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return
        self.peaks = {pid: _status(pid, "VmHWM") for pid in self.pids}

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for pid in self.pids:
                self.peaks[pid] = max(self.peaks[pid], _rss(pid))


def _status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}; peak memory needs Linux.")


def _rss(pid: int) -> int:
    return _status(pid, "VmRSS")


# ------------------------------------------------------------------------------- single-process engine
class SingleEngine:
    """The single-process engine in a child process of its own, run one operator at a time.

    The child imports what a worker imports and opens the store once, like a worker, so the two
    memory peaks compare like with like.

    Args:
        path: the store.
        queries: the query ids of the operators.
        environ: the child's environment. Dask's nanny sets ``OMP_NUM_THREADS=1`` (and the like) in
            this process's environment for its workers; the engine gets the environment from before,
            so that it runs with torch's default threads, as a user's own process would.
    """

    def __init__(self, path: str, queries: np.ndarray, environ: dict[str, str]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, path, queries), daemon=True)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environ)
        try:
            self._proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.pid, self.torch_threads = self._conn.recv()

    def run(self, op: str) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
        """Runs ``op``; returns its wall seconds (the call alone) and its result."""
        self._conn.send(op)
        seconds, result, error = self._conn.recv()
        if error:
            raise RuntimeError(f"The single-process engine failed on {op}: {error}")
        return seconds, result

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=30)


def _serve(conn: Any, path: str, queries: np.ndarray) -> None:
    store = open_store(path)
    conn.send((os.getpid(), torch.get_num_threads()))
    while (op := conn.recv()) is not None:
        try:
            start = time.perf_counter()
            result = OPERATORS[op](store, queries, None)
            conn.send((time.perf_counter() - start, result, None))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
            conn.send((0.0, None, f"{type(exc).__name__}: {exc}"))


# -------------------------------------------------------------------------------------------- running
def start_cluster(workers: int, memory_limit: str) -> tuple[Any, Any]:
    """A local cluster of single-threaded worker processes, each held to ``memory_limit``."""
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return cluster, distributed.Client(cluster)


def worker_pids(client: Any) -> dict[str, int]:
    return dict(sorted(client.run(os.getpid).items()))


def bench_rows(
    info: dict[str, Any], client: Any, reps: int, limit: int, environ: dict[str, str]
) -> dict[str, Any]:
    """Every operator on one store, cluster and single-process engine alternately, ``reps`` times;
    ``environ`` is the single-process engine's environment."""
    store = open_store(info["path"])
    queries = pick_queries(store)
    pids = worker_pids(client)
    idle = {w: _rss(p) for w, p in pids.items()}
    single = SingleEngine(info["path"], queries, environ)
    single_idle = _rss(single.pid)
    runs: dict[str, dict[str, Any]] = {
        op: {"cluster_s": [], "single_s": [], "worker_peak": {w: 0 for w in pids}, "single_peak": 0}
        for op in OPERATORS
    }
    try:
        for rep in range(reps):
            for op, fn in OPERATORS.items():
                rec = runs[op]
                with PeakRss(list(pids.values())) as mem:
                    start = time.perf_counter()
                    got_cluster = fn(store, queries, client)
                    rec["cluster_s"].append(time.perf_counter() - start)
                for w, p in pids.items():
                    rec["worker_peak"][w] = max(rec["worker_peak"][w], mem.peaks[p])
                with PeakRss([single.pid]) as mem_single:
                    seconds, got_single = single.run(op)
                rec["single_s"].append(seconds)
                rec["single_peak"] = max(rec["single_peak"], mem_single.peaks[single.pid])
                rec["agreement"] = worst(rec.get("agreement"), compare(op, got_cluster, got_single))
                rec["memory_method"] = mem.method
                print(
                    f"  rows {info['config']['rows']:>7,}  rep {rep + 1}/{reps}  {op:<15}"
                    f"cluster {rec['cluster_s'][-1]:7.2f} s  single {seconds:7.2f} s  worker peak "
                    f"{max(mem.peaks.values()) / MIB:6.0f} MiB  single peak "
                    f"{mem_single.peaks[single.pid] / MIB:6.0f} MiB",
                    flush=True,
                )
    finally:
        single.close()
    if worker_pids(client) != pids:
        raise SystemExit("A worker was restarted during the run (killed for memory?); see the cluster logs.")
    for rec in runs.values():
        rec["cluster_median_s"] = statistics.median(rec["cluster_s"])
        rec["single_median_s"] = statistics.median(rec["single_s"])
        rec["ratio_median"] = statistics.median(c / s for c, s in zip(rec["cluster_s"], rec["single_s"]))
        rec["worker_peak_max"] = max(rec["worker_peak"].values())
        rec["worker_peak_over_limit"] = rec["worker_peak_max"] / limit
    return {
        "rows_per_epoch": info["config"]["rows"],
        "rows_total": info["config"]["rows"] * EPOCHS,
        "bytes_on_disk": info["bytes_on_disk"],
        "bytes_decoded": info["bytes_decoded"],
        "disk_over_limit": info["bytes_on_disk"] / limit,
        "decoded_over_limit": info["bytes_decoded"] / limit,
        "store": {k: info[k] for k in ("path", "cached", "build_s", "verify_s", "verify_ok")},
        "worker_idle_rss": idle,
        "single_idle_rss": single_idle,
        "single_torch_threads": single.torch_threads,
        "operators": runs,
    }


# --------------------------------------------------------------------------------------------- report
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or what ``platform`` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    import dask
    import distributed
    import lightning
    import zarr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def format_table(results: list[dict[str, Any]], limit: int) -> str:
    """One line per store and operator, then the time growth with rows."""
    head = (
        f"{'rows/epoch':>10} {'disk MiB':>9} {'decoded MiB':>11} {'x limit':>7}  {'operator':<15}"
        f"{'cluster s':>9} {'single s':>9} {'ratio':>6} {'worker peak MiB':>16} {'single peak MiB':>16} "
        f"{'max rel diff':>12}"
    )
    lines = [head, "-" * len(head)]
    for res in results:
        for op, rec in res["operators"].items():
            peaks = "/".join(f"{v / MIB:.0f}" for v in rec["worker_peak"].values())
            lines.append(
                f"{res['rows_per_epoch']:>10,} {res['bytes_on_disk'] / MIB:>9.0f} "
                f"{res['bytes_decoded'] / MIB:>11.0f} {res['decoded_over_limit']:>7.1f}  {op:<15}"
                f"{rec['cluster_median_s']:>9.2f} {rec['single_median_s']:>9.2f} {rec['ratio_median']:>6.2f} "
                f"{peaks:>16} {rec['single_peak'] / MIB:>16.0f} {rec['agreement']['max_rel_diff']:>12.1e}"
            )
    lines.append("")
    lines.append(f"worker memory limit {limit / MIB:.0f} MiB; time relative to the smallest store:")
    base = results[0]
    for op in OPERATORS:
        parts = []
        for res in results[1:]:
            k = res["rows_per_epoch"] / base["rows_per_epoch"]
            c = res["operators"][op]["cluster_median_s"] / base["operators"][op]["cluster_median_s"]
            s = res["operators"][op]["single_median_s"] / base["operators"][op]["single_median_s"]
            parts.append(f"{k:g}x rows: cluster {c:.2f}x, single {s:.2f}x")
        lines.append(f"  {op:<15}" + ("; ".join(parts) or "(one store only)"))
    return "\n".join(lines)


def summary(results: list[dict[str, Any]], limit: int) -> str:
    """The largest store and the highest worker peak, against the worker limit."""
    big = results[-1]
    peak = max(rec["worker_peak_max"] for res in results for rec in res["operators"].values())
    idle = max(max(res["worker_idle_rss"].values()) for res in results)
    single = max(rec["single_peak"] for res in results for rec in res["operators"].values())
    return (
        f"largest store: {big['bytes_on_disk'] / MIB:,.0f} MiB on disk, {big['bytes_decoded'] / MIB:,.0f} MiB "
        f"decoded = {big['disk_over_limit']:.1f}x / {big['decoded_over_limit']:.1f}x a worker's limit; "
        f"highest worker peak {peak / MIB:.0f} MiB = {peak / limit:.0%} of the limit (idle worker: "
        f"{idle / MIB:.0f} MiB, mostly torch, zarr and distributed themselves); single-process engine "
        f"peak {single / MIB:.0f} MiB. Torch threads: 1 per worker, {big['single_torch_threads']} in the "
        "single-process engine."
    )


def scaling(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per operator and engine, median time of each store over the smallest store's, by row factor."""
    base = results[0]
    out: dict[str, Any] = {}
    for op in OPERATORS:
        out[op] = {
            f"{res['rows_per_epoch'] / base['rows_per_epoch']:g}x": {
                engine: res["operators"][op][f"{engine}_median_s"]
                / base["operators"][op][f"{engine}_median_s"]
                for engine in ("cluster", "single")
            }
            for res in results
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25_000, help="N: rows per epoch of the smallest store")
    parser.add_argument("--scales", default="1,2,4", help="row multiples of N, comma-separated")
    parser.add_argument("--workers", type=int, default=3, help="worker processes, one thread each")
    parser.add_argument("--memory-limit", default="512MiB", help="each worker's memory_limit")
    parser.add_argument("--reps", type=int, default=3, help="cluster/single pairs per store and operator")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help="where stores are kept")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    try:
        args.scales = sorted({int(s) for s in args.scales.split(",")})
    except ValueError:
        parser.error(f"--scales must be comma-separated integers, got {args.scales!r}")
    for name in ("rows", "workers", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.scales) < 1:
        parser.error(f"--scales must be >= 1, got {args.scales}")
    if args.rows < QUERIES:
        parser.error(f"--rows must be at least the {QUERIES} queries, got {args.rows}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dask.utils import parse_bytes

    limit = parse_bytes(args.memory_limit)
    infos = [ensure_store(args.rows * k, args.scratch) for k in args.scales]
    print(
        f"\n{args.workers} workers x 1 thread, memory_limit {limit / MIB:.0f} MiB each; "
        f"{os.cpu_count()} CPU cores on this machine.",
        flush=True,
    )
    environ = dict(os.environ)  # before the cluster's nannies change it for their workers
    cluster, client = start_cluster(args.workers, args.memory_limit)
    try:
        import dask

        memory_config = dict(dask.config.get("distributed.worker.memory"))
        worker_threads = client.run(torch.get_num_threads)
        results = [bench_rows(info, client, args.reps, limit, environ) for info in infos]
    finally:
        client.close()
        cluster.close()
    print()
    print(format_table(results, limit))
    print(summary(results, limit))
    print(
        f"\nThis machine has {os.cpu_count()} cores, shared by the workers, the scheduler and the client: "
        "the cluster is not expected to be faster than the single-process engine here. The point is "
        "that each worker's memory stays bounded whatever the store's size, and that time grows "
        "linearly with the rows."
    )
    report = {
        "benchmark": "dask_scale",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads_client": torch.get_num_threads(),
            "torch_threads_workers": worker_threads,
            "platform": platform.platform(),
        },
        "versions": versions(),
        "cluster": {
            "workers": args.workers,
            "threads_per_worker": 1,
            "processes": True,
            "memory_limit": limit,
            "memory_thresholds": memory_config,
        },
        "capture": {
            "model": f"3 x Linear({WIDTH}, {WIDTH}) at {SEQ} positions (tanh), mean, Linear({WIDTH}, {CLASSES})",
            "epochs": EPOCHS,
            "batch": BATCH,
            "lr": LR,
            "policy": POLICY,
            "loader": "unshuffled; epoch 1's first-layer inputs are stored as references to epoch 0's",
        },
        "queries": QUERIES,
        "topk_k": TOPK,
        "tolerance": {"rtol": RTOL, "atol": f"{ATOL_SCALE} x max |score|"},
        "memory_method": results[0]["operators"]["topk"]["memory_method"],
        "summary": summary(results, limit),
        "rows": results,
        "scaling": scaling(results),
        "note": (
            f"{os.cpu_count()} CPU cores: the cluster shares them with its scheduler and the client, so it "
            "is not faster than the single-process engine here; what the run shows is bounded memory "
            "per worker and linear scaling with rows."
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
