"""Fit-time overhead of :class:`~mstore_lightning.GradientCapture` on three small models.

Each model is trained for one epoch of synthetic, seeded data, once without capture (*plain*) and
once with capture of every layer (*capture*; int8 by default, ``--precision``), alternating plain and capture runs so that
drift of a noisy machine hits both alike. The script prints a table of median fit times, the
capture/plain ratios and the store's size per sample, and writes every raw timing to JSON.

Usage:
    python benchmarks/capture_overhead.py                       # all models, 5 pairs each
    python benchmarks/capture_overhead.py --models mlp --pairs 7
    python benchmarks/capture_overhead.py --batches-scale 0.1   # quick smoke run
    python benchmarks/capture_overhead.py --versus no-manifest  # what the manifests cost, side by side
    python benchmarks/capture_overhead.py --versus zstd-everywhere  # measured compressors vs zstd
    python benchmarks/capture_overhead.py --versus cheap-norms        # what keeping every layer's norms costs
    python benchmarks/capture_overhead.py --threads 1           # a core left free: target 1.15x
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

import mstore_lightning
from mstore_lightning import GradientCapture, open_store

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "capture_overhead.json"
POLICY = {"layers": ["*"], "precision": "int8", "loss_reduction": "mean"}  # --precision replaces it
ONE_THREAD_TARGET = 1.15
DATA_SEED = 0
MODEL_SEED = 1
LR = 0.01
VOCAB = 1000
NUM_CLASSES = 10

# Lightning's per-run chatter ("GPU available", "does not have many workers") is the same for
# both arms and would bury the table.
_LIGHTNING_NOISE = (
    ".*does not have many workers.*",
    ".*GPU available but not used.*",
    ".*log_every_n_steps.*",
)


# ---------------------------------------------------------------------------------------------- models
class TokenClassifier(nn.Module):
    """Embedding, a Transformer encoder and a linear head over the mean token.

    Args:
        vocab: number of token ids.
        d_model: embedding width.
        nhead: attention heads.
        layers: encoder layers.
        num_classes: output classes.
    """

    def __init__(self, vocab: int, d_model: int, nhead: int, layers: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, batch_first=True)
        # Nested tensors only apply in inference with a padding mask; disabling them silences a warning.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def build_mlp() -> nn.Module:
    """MLP 784-512-512-10 with ReLU."""
    return nn.Sequential(
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, NUM_CLASSES),
    )


def build_cnn() -> nn.Module:
    """Four 3x3 convolutions (3->32->32->64->64, two of stride 2) with ReLU, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2),
        nn.ReLU(),  # 32x32 -> 16x16
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2),
        nn.ReLU(),  # 16x16 -> 8x8
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, NUM_CLASSES),
    )


def build_transformer() -> nn.Module:
    """Token classifier over a 2-layer, 4-head, d_model=128 ``nn.TransformerEncoder``."""
    return TokenClassifier(VOCAB, d_model=128, nhead=4, layers=2, num_classes=NUM_CLASSES)


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model and its synthetic data.

    Attributes:
        name: CLI name.
        description: one line for the table's legend.
        build: returns a freshly initialised network.
        make_inputs: ``(generator, n) -> inputs`` of ``n`` samples.
        batch_size: samples per batch.
        batches: batches per fit: at least 100, so that start-up does not dominate.
        target: the largest acceptable capture/plain ratio with torch on 2 threads, or ``None`` when
            only reported; on 1 thread (a core left free) every model's is :data:`ONE_THREAD_TARGET`.
        note: what the reader should expect, printed under the table.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator, int], Tensor]
    batch_size: int
    batches: int
    target: float | None
    note: str = ""


SPECS = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mlp",
            description="MLP 784-512-512-10",
            build=build_mlp,
            make_inputs=lambda g, n: torch.randn(n, 784, generator=g),
            batch_size=128,
            batches=800,
            target=1.30,
        ),
        ModelSpec(
            name="cnn",
            description="4-conv CNN on 3x32x32 + linear",
            build=build_cnn,
            make_inputs=lambda g, n: torch.randn(n, 3, 32, 32, generator=g),
            batch_size=64,
            batches=120,
            target=1.50,
        ),
        ModelSpec(
            name="transformer",
            description="Transformer encoder d128 h4 L2, T=64",
            build=build_transformer,
            make_inputs=lambda g, n: torch.randint(0, VOCAB, (n, 64), generator=g),
            batch_size=32,
            batches=100,
            target=1.25,
            note="every parameter is captured, nn.MultiheadAttention's in-projection and out_proj included.",
        ),
    )
}


class Classifier(L.LightningModule):
    """Cross-entropy training of ``net`` on ``batch["x"]``; ``batch["index"]`` is left to the capture.

    Args:
        net: the network.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Mean over the batch, as the policy's loss_reduction says.
        return F.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


# ------------------------------------------------------------------------------------------------ data
class SyntheticData(Dataset):
    """In-memory samples fetched a whole batch at a time.

    Indexed by a list of ids (from a :class:`BatchSampler`), so a batch is one gather instead of
    ``batch_size`` item lookups and a collate: loader cost stays small next to the model's, and the
    measured ratio is not diluted by it.

    Args:
        inputs: all inputs, samples along dim 0.
        labels: int64 class of each sample.
    """

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, ids: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(ids, dtype=torch.int64)
        return {"x": self.inputs[index], "y": self.labels[index], "index": index}


def make_data(spec: ModelSpec, batches: int) -> SyntheticData:
    """Seeded random inputs and labels for ``batches`` full batches."""
    g = torch.Generator().manual_seed(DATA_SEED)
    n = batches * spec.batch_size
    return SyntheticData(spec.make_inputs(g, n), torch.randint(0, NUM_CLASSES, (n,), generator=g))


def make_loader(data: SyntheticData, batch_size: int) -> DataLoader:
    """An unshuffled, single-process loader of whole batches; the last partial batch is dropped."""
    sampler = BatchSampler(SequentialSampler(data), batch_size, drop_last=True)
    # batch_size=None: the sampler yields whole batches and the dataset returns them already collated.
    return DataLoader(data, sampler=sampler, batch_size=None, num_workers=0)


# --------------------------------------------------------------------------------------------- running
class TimedCapture(GradientCapture):
    """:class:`GradientCapture` that adds up the wall time of its per-step callback hooks: the share
    of the capture's work the training thread waits for (its forward and gradient hooks, which run
    inside torch's forward and backward, are not counted)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_seconds = 0.0
        self.wait_seconds = 0.0  # of hook_seconds: waiting for room in the writer's queue
        self.steps = 0

    def _timed(self, hook: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(*args)
        finally:
            self.hook_seconds += time.perf_counter() - start

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1
        self._timed(super().on_train_batch_start, *args)

    def on_before_backward(self, *args: Any) -> None:
        self._timed(super().on_before_backward, *args)

    def on_after_backward(self, *args: Any) -> None:
        self._timed(super().on_after_backward, *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._timed(super().on_train_batch_end, *args)
        if self.recorder.writer is not None:
            self.wait_seconds = self.recorder.writer.wait_seconds


def fit_once(spec: ModelSpec, data: SyntheticData, store: Path | None) -> tuple[float, float, float, float]:
    """Trains one epoch from the same initial weights and times ``Trainer.fit``.

    Args:
        spec: the model.
        data: its synthetic data.
        store: where the capture writes, or ``None`` for a plain fit.

    Returns:
        Wall and process CPU seconds (all threads, so the store's writer threads count) spent in
        ``trainer.fit``, which includes the capture's setup and final flush; the milliseconds per
        step spent in the capture's per-step callback hooks on the training thread (0 without one);
        and the part of them spent waiting for room in the writer's queue.
    """
    torch.manual_seed(MODEL_SEED)
    model = Classifier(spec.build())
    callbacks = []
    if store is not None:
        # A leftover store from the previous run would make "overwrite" delete it inside the timed
        # region; deleting it here keeps file-system cleanup out of the measurement.
        shutil.rmtree(store, ignore_errors=True)
        callbacks.append(TimedCapture(store=str(store), policy=POLICY, mode="overwrite"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = make_loader(data, spec.batch_size)
    gc.collect()  # a collection of the previous run's garbage must not land inside this one
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    steps = max(1, callbacks[0].steps) if callbacks else 1
    hook_ms = 1e3 * callbacks[0].hook_seconds / steps if callbacks else 0.0
    wait_ms = 1e3 * callbacks[0].wait_seconds / steps if callbacks else 0.0
    return wall, cpu, hook_ms, wait_ms


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _Recorder(logging.Handler):
    """Keeps the messages of warning-level (and worse) log records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


def capture_messages(run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Runs ``run`` and returns its result with the warnings and warning logs it raised."""
    recorder = _Recorder()
    lib_logger = logging.getLogger("mstore_lightning")
    lib_logger.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for pattern in _LIGHTNING_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            result = run()
    finally:
        lib_logger.removeHandler(recorder)
    found = [f"{w.category.__name__}: {w.message}" for w in caught] + recorder.messages
    return result, list(dict.fromkeys(found))  # dedupe, keep order


def bench_model(
    spec: ModelSpec, pairs: int, batches_scale: float, workdir: Path, versus: str | None = None
) -> dict[str, Any]:
    """Warms up, then runs ``pairs`` interleaved plain/capture fits of one model.

    Args:
        spec: the model.
        pairs: plain/capture pairs to time.
        batches_scale: multiplies ``spec.batches`` (for quick runs).
        workdir: temporary directory for the store.
        versus: a switchable part of the store's work (see :data:`VERSUS`); each pair then gets a
            third fit, a capture without it, so that its cost is timed side by side.

    Returns:
        Raw timings, their summary and the store's size.
    """
    batches = max(1, round(spec.batches * batches_scale))
    data = make_data(spec, batches)
    samples = batches * spec.batch_size
    store = workdir / f"{spec.name}.zarr"
    params = sum(p.numel() for p in spec.build().parameters())

    # Warm-up: first runs pay for imports, allocator growth and lazy initialisation. Only warnings
    # the capture run raises beyond the plain run's are the capture's own.
    plain_warm, plain_msgs = capture_messages(lambda: fit_once(spec, data, None))
    capture_warm, capture_msgs = capture_messages(lambda: fit_once(spec, data, store))
    capture_warnings = [m for m in capture_msgs if m not in set(plain_msgs)]

    plain, capture, plain_cpu, capture_cpu, ratios, store_bytes, hook_ms, wait_ms = ([] for _ in range(8))
    without, without_ratios, without_bytes = [], [], []
    other = workdir / f"{spec.name}-without.zarr"
    if versus is not None:
        with VERSUS[versus]():
            fit_once(spec, data, other)  # its own warm-up
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already recorded at warm-up
        for i in range(pairs):
            a, a_cpu, _, _ = fit_once(spec, data, None)
            # The two captures swap places every pair: a fit runs slower or faster for following
            # another, and that must not land on one arm.
            if versus is not None and i % 2 == 0:
                with VERSUS[versus]():
                    c = fit_once(spec, data, other)[0]
            b, b_cpu, b_hook_ms, b_wait_ms = fit_once(spec, data, store)
            if versus is not None and i % 2 == 1:
                with VERSUS[versus]():
                    c = fit_once(spec, data, other)[0]
            if versus is not None:
                without.append(c)
                without_ratios.append(b / c)
                without_bytes.append(dir_bytes(other))
            hook_ms.append(b_hook_ms)
            wait_ms.append(b_wait_ms)
            store_bytes.append(dir_bytes(store))
            plain.append(a)
            capture.append(b)
            plain_cpu.append(a_cpu)
            capture_cpu.append(b_cpu)
            ratios.append(b / a)
            print(
                f"  {spec.name} pair {i + 1}/{pairs}: plain {a:.3f} s, capture {b:.3f} s, ratio {b / a:.3f}",
                flush=True,
            )
    check = check_store(store, samples)
    raw = compression_cost(store)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(other, ignore_errors=True)
    compared = {}
    if versus is not None:
        compared = {
            "versus": {
                "without": versus,
                "without_s": without,
                "without_median_s": statistics.median(without),
                # capture / capture-without, fit by fit: what the switched-off part costs
                "ratios": without_ratios,
                "ratio_median": statistics.median(without_ratios),
                "ratio_min": min(without_ratios),
                "ratio_max": max(without_ratios),
                "store_bytes_per_sample": statistics.median(without_bytes) / samples,
            }
        }

    plain_med, capture_med = statistics.median(plain), statistics.median(capture)
    if raw:
        raw["share_of_plain_fit"] = raw["zstd_crc32c_cpu_s"] / plain_med
    return {
        "description": spec.description,
        "batch_size": spec.batch_size,
        "batches": batches,
        "samples": samples,
        "params": params,
        "target_ratio": spec.target,
        "warmup_s": {"plain": plain_warm[0], "capture": capture_warm[0]},
        "plain_s": plain,
        "capture_s": capture,
        "plain_cpu_s": plain_cpu,
        "capture_cpu_s": capture_cpu,
        "ratios": ratios,
        "plain_median_s": plain_med,
        "capture_median_s": capture_med,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_of_medians": capture_med / plain_med,
        # Process CPU over all threads: includes the store's compression and writer threads.
        "cpu_ratio_median": statistics.median(c / p for c, p in zip(capture_cpu, plain_cpu)),
        "train_thread_hook_ms_per_step": hook_ms,
        "train_thread_hook_ms_per_step_median": statistics.median(hook_ms),
        # Of the hooks' time: waiting for room in the writer's queue (training waits for the writer).
        "queue_wait_ms_per_step": wait_ms,
        "queue_wait_ms_per_step_median": statistics.median(wait_ms),
        "plain_ms_per_step": 1e3 * plain_med / batches,
        "store_bytes": store_bytes,
        "store_bytes_per_sample": statistics.median(store_bytes) / samples,
        # A dense fp16 copy of every parameter's gradient: what storing the full gradient would cost.
        "dense_fp16_grad_bytes_per_sample": 2 * params,
        "store_check": check,
        **({"raw_file_compression": raw} if raw else {}),
        "capture_warnings": capture_warnings,
        "note": spec.note,
        **compared,
    }


def check_store(store: Path, samples: int) -> dict[str, Any]:
    """Reads the last capture's store back, so that a fast but empty capture cannot pass unnoticed.

    Returns:
        The epochs, captured and uncovered layers, the sample rows found and whether they are the
        dataset indices ``0..samples-1`` in order; ``error`` instead if the store cannot be read.
    """
    try:
        reader = open_store(store)
        ids = np.asarray(reader.sample_ids(reader.epochs[-1]))
        return {
            "epochs": list(reader.epochs),
            "layers": len(reader.layers),
            "uncovered": len(reader.uncovered),
            "rows": int(ids.size),
            "ids_ok": bool(np.array_equal(ids, np.arange(samples))),
        }
    except Exception as exc:  # noqa: BLE001 - reported, the timings are still worth keeping
        return {"error": f"{type(exc).__name__}: {exc}"}


def compression_cost(store: Path, piece: int = 4 << 20) -> dict[str, float]:
    """One core's CPU seconds for zstd (the store's level) and crc32c on the rows a ``raw-file``
    capture appended (empty for other runs): what the store's codecs would add to that floor."""
    import crc32c
    from numcodecs import Zstd

    from mstore_lightning.store.codecs import ZSTD_LEVEL

    files = sorted(store.glob("raw-*"))
    if not files:
        return {}
    zstd, raw, packed, cpu = Zstd(level=ZSTD_LEVEL), 0, 0, 0.0
    for path in files:
        data = path.read_bytes()
        for at in range(0, len(data), piece):
            block = data[at : at + piece]
            start = time.process_time()
            out = zstd.encode(block)
            crc32c.crc32c(out)
            cpu += time.process_time() - start
            raw, packed = raw + len(block), packed + len(out)
    return {"bytes": raw, "zstd_ratio": raw / max(1, packed), "zstd_crc32c_cpu_s": cpu}


# ---------------------------------------------------------------------------------------------- report
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the timings depend on besides the code: CPU, cores, torch threads, OS, Python."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries on the measured path."""
    return {"torch": torch.__version__, "lightning": L.__version__, "zarr": zarr.__version__}


def library_digest() -> str:
    """SHA-256 over the library's Python sources: names the exact code measured, committed or not."""
    root = Path(mstore_lightning.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def verdict(result: dict[str, Any]) -> str:
    """The target column: the median ratio against the model's target, if it has one."""
    target = result["target_ratio"]
    if target is None:
        return "report only"
    return f"<={target:.2f} " + ("ok" if result["ratio_median"] <= target else "MISS")


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model of :func:`bench_model` results, as fixed-width text."""
    header = (
        f"{'model':<12} {'steps x batch':>13} {'plain med':>10} {'capture med':>12} {'ratio med':>10} "
        f"{'ratio min':>10} {'cpu ratio':>10} {'hook ms/step':>13} {'of it waiting':>13} {'store B/sample':>15} "
        f"{'dense fp16 B':>13}  target"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        steps = f"{r['batches']} x {r['batch_size']}"
        lines.append(
            f"{name:<12} {steps:>13} {r['plain_median_s']:>9.3f}s "
            f"{r['capture_median_s']:>11.3f}s {r['ratio_median']:>9.3f}x {r['ratio_min']:>9.3f}x "
            f"{r['cpu_ratio_median']:>9.3f}x "
            f"{r['train_thread_hook_ms_per_step_median']:>5.2f} of {r['plain_ms_per_step']:>5.2f} "
            f"{r['queue_wait_ms_per_step_median']:>13.2f} "
            f"{r['store_bytes_per_sample']:>15,.0f} {r['dense_fp16_grad_bytes_per_sample']:>13,}  "
            f"{verdict(r)}"
        )
    return "\n".join(lines)


ABLATIONS = ("none", "no-compression", "no-write", "raw-file")


def apply_ablation(name: str) -> None:
    """Switches off part of the store's work, for measurement only.

    ``no-compression`` stores chunks with their crc32c but without zstd; ``no-write`` keeps the hooks,
    the row copies and the queue but drops every chunk instead of writing it (its store reads back
    empty, and the read-back check says so). ``raw-file`` appends each chunk's rows, as the training
    thread buffered them, to one flat file per array: no coding, no deduplication, no zarr, no
    compression, no checksum. It is the least any capture that keeps its rows on disk can do, so its
    ratio is a floor for the store (at ``--precision fp16`` the buffered rows are the fp16 values; at
    int8 they are the float32 values the writer would code, so use it with fp16).
    """
    if name == "no-compression":
        from zarr.codecs import Crc32cCodec

        from mstore_lightning.store import layout

        layout.compressors = lambda: [Crc32cCodec()]
    elif name == "no-write":
        from mstore_lightning.store.writer import BackgroundWriter

        BackgroundWriter._write = lambda self, chunk: None
    elif name == "raw-file":
        from mstore_lightning.store.writer import BackgroundWriter

        def write_raw(self: BackgroundWriter, chunks: list[Any]) -> None:
            for chunk in chunks:
                root = Path(chunk.array.group.store_path.store.root)
                with open(root / f"raw-{chunk.array.name.replace('/', '_')}", "ab") as f:
                    f.write(chunk.buffer[: chunk.rows].data)
                self.bytes_written += chunk.nbytes

        BackgroundWriter._write = write_raw


@contextlib.contextmanager
def without_manifest() -> Iterator[None]:
    """Captures without manifests: the writer records no digests and writes no manifest (the
    store reads back as damaged, so only the capture's time is measured)."""
    from mstore_lightning.store.manifest import ManifestStore
    from mstore_lightning.store.session import RunWriter

    async def plain_set(self: ManifestStore, key: str, value: Any) -> None:
        await self._store.set(key, value)

    saved = ManifestStore.set, RunWriter._seal
    ManifestStore.set, RunWriter._seal = plain_set, lambda self, group: None
    try:
        yield
    finally:
        ManifestStore.set, RunWriter._seal = saved


@contextlib.contextmanager
def zstd_everywhere() -> Iterator[None]:
    """Captures with every array compressed by zstd, as before compressors were chosen by
    measurement: what choosing them saves in time, and costs in bytes."""
    from mstore_lightning.store import codecs

    saved = codecs.choose
    codecs.choose = lambda block: codecs.Choice(codecs.DEFAULT)
    try:
        yield
    finally:
        codecs.choose = saved


@contextlib.contextmanager
def cheap_norms() -> Iterator[None]:
    """Captures with ``policy.norms="cheap"``: norms kept only where they cost next to nothing, as
    before every layer's were kept. What keeping sequence and convolution norms costs."""
    saved = POLICY.get("norms")
    POLICY["norms"] = "cheap"
    try:
        yield
    finally:
        if saved is None:
            POLICY.pop("norms")
        else:
            POLICY["norms"] = saved


# Parts of the store's work a third arm switches off, side by side with the full capture.
VERSUS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "no-manifest": without_manifest,
    "cheap-norms": cheap_norms,
    "zstd-everywhere": zstd_everywhere,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line; ``--models`` becomes a list of names."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved plain/capture pairs per model")
    parser.add_argument("--precision", default=POLICY["precision"], help="policy precision of the capture")
    parser.add_argument("--models", default=",".join(SPECS), help=f"comma-separated subset of {list(SPECS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--batches-scale",
        type=float,
        default=1.0,
        help="multiply each model's batches per fit (e.g. 0.1 for a smoke run)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--ablation",
        choices=ABLATIONS,
        default="none",
        help="switch off part of the store's work to see where the capture's time goes",
    )
    parser.add_argument(
        "--versus",
        choices=sorted(VERSUS),
        default=None,
        help="time a third arm per pair, a capture with this part switched off, side by side",
    )
    args = parser.parse_args(argv)
    if args.ablation != "none" and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.with_name(f"capture_overhead_{args.ablation}.json")
    if args.versus is not None and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.with_name(f"capture_overhead_versus_{args.versus}.json")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SPECS]
    if unknown or not args.models:
        parser.error(f"--models takes a comma-separated subset of {list(SPECS)}; got {unknown or 'nothing'}")
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    if args.batches_scale <= 0:
        parser.error("--batches-scale must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes the JSON report.

    Returns:
        The process exit status: 0 once the report is written. A missed target is reported, not an
        error, since one noisy run of a shared machine should not fail a build.
    """
    args = parse_args(argv)
    POLICY["precision"] = args.precision
    apply_ablation(args.ablation)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() == 1:
        for name, spec in SPECS.items():
            SPECS[name] = dataclasses.replace(spec, target=ONE_THREAD_TARGET)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    machine = machine_info()
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items()),
        flush=True,
    )

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mstore-bench-") as tmp:
        for name in args.models:
            print(f"{name}: {SPECS[name].description}", flush=True)
            results[name] = bench_model(SPECS[name], args.pairs, args.batches_scale, Path(tmp), args.versus)

    print()
    print(format_table(results))
    for name, r in results.items():
        check = r["store_check"]
        if "error" in check or not check["ids_ok"]:
            print(f"\n{name}: the store read back does not hold the {r['samples']} samples in order: {check}")
    for name, r in results.items():
        if "raw_file_compression" in r:
            c = r["raw_file_compression"]
            print(
                f"\n{name}: the raw files hold {c['bytes'] / 1e6:,.0f} MB; zstd and crc32c on them take "
                f"{c['zstd_crc32c_cpu_s']:.2f} CPU-s on one core ({c['zstd_ratio']:.2f}x smaller), "
                f"{c['share_of_plain_fit']:.2f} of the plain fit's time"
            )
    for name, r in results.items():
        if "versus" in r:
            v = r["versus"]
            print(
                f"\n{name}: capture / capture with {v['without']}: median {v['ratio_median']:.3f}x "
                f"(min {v['ratio_min']:.3f}x, max {v['ratio_max']:.3f}x over {len(v['ratios'])} pairs; "
                f"capture {r['capture_median_s']:.3f} s, without {v['without_median_s']:.3f} s; "
                f"store {r['store_bytes_per_sample']:,.0f} B/sample, without "
                f"{v['store_bytes_per_sample']:,.0f} B/sample)"
            )
    for name, r in results.items():
        if r["note"]:
            print(f"\n{name}: {r['note']}")
    for name, r in results.items():
        if r["capture_warnings"]:
            print(f"\nwarnings of the {name} capture run:")
            for message in r["capture_warnings"]:
                print(f"  {message}")

    report = {
        "benchmark": "capture_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
        "mstore_lightning_sources_sha256": library_digest(),
        "policy": POLICY,
        "pairs": args.pairs,
        "batches_scale": args.batches_scale,
        "ablation": args.ablation,
        "versus": args.versus,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "models": results,
    }
    write_report(args.out, report)
    return 0


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Writes a benchmark's JSON report, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
