"""Size and error of a :class:`~mstore_lightning.GradientCapture` store, per model, layer and precision.

Each model is trained for two epochs (by default) with several captures of every layer in one
``Trainer``: a lossless fp32 *reference* capture and one *measured* capture per precision asked for.
All captures see the same forward and backward passes, so the reference's restored gradients are the
exact per-sample gradients the measured store approximates. For each measured store the script
reports the bytes on disk per sample of every layer and epoch, the compression against fp32
per-sample gradients and against raw fp32 factors, how much smaller the later epoch is than the
first, and how far its restored gradients, norms and inner products are from the reference's. It
prints a table and the targets, and writes every figure to JSON.

Usage:
    python benchmarks/storage.py                                  # all models, fp16 and int8
    python benchmarks/storage.py --models mlp,cnn --precisions fp16,bf16,int8
    python benchmarks/storage.py --samples 0.25 --models mlp      # quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstore_lightning import CapturePolicy, GradientCapture, GradientStore, PolicyError, open_store

# The models, data helpers and report helpers are capture_overhead's; it is a script, not a package.
sys.path.insert(0, str(Path(__file__).parent))
import capture_overhead as co

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "storage.json"
REFERENCE = "fp32"
REFERENCE_POLICY = {"layers": ["*"], "precision": REFERENCE, "loss_reduction": "mean"}
DEFAULT_PRECISIONS = "fp16,int8"

# Targets, all judged at TARGET_PRECISION and only where the median cosine reaches TARGET_COSINE.
TARGET_PRECISION = "int8"
TARGET_COSINE = 0.999
TARGET_RATIO = {"mlp": 1000.0, "cnn": 30.0}  # fp32 per-sample gradient bytes / stored bytes, whole model
TARGET_LATER_EPOCH = 0.75  # bytes of the last epoch / bytes of the first, whole epoch

READ_BLOCK = 32  # samples restored at once: a VGG conv's per-sample gradients are 9 MB each in fp32


# ---------------------------------------------------------------------------------------------- models
def build_vgg() -> nn.Module:
    """VGG-style CNN on 3x32x32: 3x3 convs 64-128-256-512-512, a 2x2 max-pool after each of the first
    four, so the last conv runs with 512 channels at 2x2, then a linear classifier. No BatchNorm: in
    training mode its batch statistics couple the samples, so the layers below it would hold
    batch-coupled rows."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32x32 -> 16x16
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 8x8
        nn.Conv2d(128, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 4x4
        nn.Conv2d(256, 512, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 2x2
        nn.Conv2d(512, 512, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512 * 2 * 2, co.NUM_CLASSES),
    )


# ------------------------------------------------------------------------------------------------ data
def digits_28(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` scikit-learn digits upsampled to 28x28 and flattened, with their true labels.

    The 1797 8x8 digits (values 0-16) are divided by 16 and upsampled bilinearly to 28x28, which keeps
    them in [0, 1] and their blank background at exactly 0. Beyond the first 1797 samples the digits
    repeat: copy ``k`` of a digit is moved by one of the 24 non-zero whole-pixel offsets in [-2, 2] on
    both axes (zero-filled), a seeded permutation per digit, so no copy equals the original or another
    copy of it. That allows 25 copies, up to 44,925 samples.
    """
    from sklearn.datasets import load_digits  # scikit-learn ships the digits: no download

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]
    reps = math.ceil(n / len(labels))
    if reps > len(offsets) + 1:
        raise ValueError(
            f"the digits make at most {(len(offsets) + 1) * len(labels)} distinct samples, not {n}"
        )
    order = torch.stack([torch.randperm(len(offsets), generator=g) for _ in range(len(labels))])
    parts = [images]
    for k in range(reps - 1):
        parts.append(torch.stack([_shift(img, *offsets[int(o)]) for img, o in zip(images, order[:, k])]))
    x = torch.cat(parts)[:n].flatten(1)
    return x, labels.repeat(reps)[:n]


def _shift(img: Tensor, dy: int, dx: int) -> Tensor:
    """``img`` (C, H, W) moved by whole pixels, zero-filled where it moved away from."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (2, 2, 2, 2))
    return padded[..., 2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w]


def smooth_images(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` seeded image-like 3x32x32 inputs and labels a fixed random linear teacher assigns.

    Each image is 8x8 Gaussian noise upsampled bilinearly to 32x32 plus pixel noise of a tenth of its
    amplitude, scaled to unit variance: smooth like photographs, so neighbouring pixels and the
    activations they produce are correlated. The label is the argmax of 10 seeded random projections of
    the image, so the task is learnable and gradients shrink as training goes.
    """
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    x = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    x = x + 0.1 * x.std() * torch.randn(x.shape, generator=g)
    x = x / x.std()
    return x, teacher_labels(x, g)


def teacher_labels(x: Tensor, g: torch.Generator) -> Tensor:
    """The argmax of ``NUM_CLASSES`` seeded random projections of each flattened input."""
    w = torch.randn(x[0].numel(), co.NUM_CLASSES, generator=g)
    return (x.flatten(1) @ w).argmax(1)


def random_tokens(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences of 64 uniform token ids with uniform random labels, as in ``capture_overhead``."""
    tokens = torch.randint(0, co.VOCAB, (n, 64), generator=g)
    return tokens, torch.randint(0, co.NUM_CLASSES, (n,), generator=g)


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    """One model of this benchmark.

    Attributes:
        model: the network, its batch size and its description, as ``capture_overhead`` defines them.
        data: ``(n, generator) -> (inputs, labels)``.
        data_note: what the data is, for the JSON report.
        samples: samples per epoch at ``--samples 1``; a whole number of batches.
        cos_samples: samples per epoch whose restored gradients are compared with the reference's.
        dot_samples: samples per epoch whose ``dot`` Gram matrix is compared; ``dot`` on a factored
            conv layer costs (samples x positions)² products, so the big CNNs get fewer.
    """

    model: co.ModelSpec
    data: Any
    data_note: str
    samples: int
    cos_samples: int = 256
    dot_samples: int = 128


SPECS = {
    "mlp": StorageSpec(
        co.SPECS["mlp"], digits_28, "scikit-learn digits, bilinear 8x8 -> 28x28, [0, 1], true labels", 1792
    ),
    "cnn": StorageSpec(
        co.SPECS["cnn"], smooth_images, "smoothed Gaussian noise 3x32x32, random-teacher labels", 1024
    ),
    "transformer": StorageSpec(
        co.SPECS["transformer"], random_tokens, "uniform random tokens (T=64), random labels", 512
    ),
    "vgg": StorageSpec(
        co.ModelSpec(
            name="vgg",
            description="VGG-style conv 64-128-256-512-512, last conv 512ch at 2x2 + linear",
            build=build_vgg,
            make_inputs=lambda g, n: smooth_images(n, g)[0],
            batch_size=64,
            batches=8,
            target=None,
        ),
        smooth_images,
        "smoothed Gaussian noise 3x32x32, random-teacher labels",
        512,
        cos_samples=64,
        dot_samples=32,
    ),
}


def make_dataset(spec: StorageSpec, samples_scale: float) -> co.SyntheticData:
    """The model's seeded data: ``spec.samples * samples_scale`` rounded down to whole batches, >= 1 batch."""
    bs = spec.model.batch_size
    n = max(1, int(spec.samples * samples_scale) // bs) * bs
    inputs, labels = spec.data(n, torch.Generator().manual_seed(co.DATA_SEED))
    return co.SyntheticData(inputs, labels)


# --------------------------------------------------------------------------------------------- training
def store_name(precision: str) -> str:
    """A directory name for a precision string such as ``kbit:4``."""
    return "".join(c if c.isalnum() else "_" for c in precision) + ".zarr"


def fit_with_captures(
    spec: StorageSpec, data: co.SyntheticData, captures: list[tuple[str, Path]], epochs: int
) -> tuple[nn.Module, float, list[str]]:
    """Trains the model once with one capture of every layer per entry of ``captures``.

    Args:
        spec: the model.
        data: its data.
        captures: ``(precision, store path)`` of each capture, the reference first.
        epochs: epochs to train.

    Returns:
        The network's initial weights (a copy), the wall time of ``trainer.fit`` and the warnings the
        fit raised.
    """
    torch.manual_seed(co.MODEL_SEED)
    net = spec.model.build()
    initial = copy.deepcopy(net)
    callbacks = [
        GradientCapture(store=str(path), policy=dict(REFERENCE_POLICY, precision=precision), mode="overwrite")
        for precision, path in captures
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = co.make_loader(data, spec.model.batch_size)
    start = time.perf_counter()
    _, messages = co.capture_messages(lambda: trainer.fit(co.Classifier(net), loader))
    return initial, time.perf_counter() - start, messages


def check_reference(initial: nn.Module, data: co.SyntheticData, batch_size: int, ref: GradientStore) -> dict:
    """Checks the reference store against autograd on the first batch, at the initial weights.

    The mean of the stored per-sample gradients of a batch must equal that batch's gradient of the mean
    loss. Every error figure below is relative to the reference, so a reference spoilt by the other
    captures in the same ``Trainer`` must not pass unnoticed. Models with active dropout are skipped:
    the re-run would draw other masks.

    Returns:
        ``max_rel_error`` over the captured parameters (``||mean_i g_i - g|| / ||g||``), or ``skipped``.
    """
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in initial.modules()):
        return {"skipped": "the model has dropout"}
    batch = data[list(range(batch_size))]
    model = co.Classifier(copy.deepcopy(initial))  # the captured module names start with "net."
    F.cross_entropy(model.net(batch["x"]), batch["y"]).backward()
    modules = dict(model.named_modules())
    worst, worst_at = 0.0, ""
    for layer in ref.layers:
        restored = ref.restore(0, layer, batch["index"].numpy())
        for param, per_sample in restored.items():
            expect = getattr(modules[layer], param).grad
            err = float((per_sample.mean(0) - expect).norm() / expect.norm().clamp_min(1e-30))
            if err > worst:
                worst, worst_at = err, f"{layer}.{param}"
    return {"max_rel_error": worst, "worst_param": worst_at, "ok": worst < 1e-4}


# ------------------------------------------------------------------------------------------- measuring
def spread(ids: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` ids evenly spaced through ``ids``, so every part of the epoch is sampled."""
    if len(ids) <= k:
        return ids
    return ids[np.linspace(0, len(ids) - 1, k).round().astype(np.int64)]


def as_rows(grads: dict[str, Tensor], params: list[str]) -> list[Tensor]:
    """``{param: (n, *shape)}`` as float64 ``(n, numel)`` matrices, one per parameter.

    float64 because cosines of 0.99999 are read to six decimals from sums over millions of numbers;
    the parameters are kept apart, since concatenating them would copy the largest gradients again.
    """
    return [grads[p].reshape(grads[p].shape[0], -1).double() for p in params]


def row_dot(x: list[Tensor], y: list[Tensor]) -> np.ndarray:
    """Per-row inner product of two gradients split by parameter (see :func:`as_rows`)."""
    return sum(torch.linalg.vecdot(a, b) for a, b in zip(x, y)).numpy()


def layer_sizes(ref: GradientStore, meas: GradientStore, layer: str) -> dict[str, Any]:
    """What one layer would take uncompressed: fp32 full gradient, raw fp32 (reference) and measured arrays.

    The raw fp32 baseline is what the lossless reference keeps for the layer before compression: its
    factors (the int64 token ids of an embedding count 8 bytes) or, for a layer stored as full
    per-sample gradients, the fp32 gradient itself.
    """
    spec, mspec = ref.layer_spec(layer), meas.layer_spec(layer)
    numel = sum(math.prod(s) for s in spec["param_shapes"].values())

    def array_bytes(s: dict[str, Any]) -> int:
        # An array stored in parts (int8 codes and their scales, ...) counts every per-row part; tables
        # kept once per chunk are left out.
        parts = [
            part
            for a in s["arrays"].values()
            for part in a.get("parts", {a.get("name", ""): a}).values()
            if part.get("per", "row") == "row"
        ]
        return sum(math.prod(part["row_shape"]) * np.dtype(part["dtype"]).itemsize for part in parts)

    return {
        "params": list(spec["params"]),
        "numel": numel,
        "fp32_grad_bytes": 4 * numel,
        "raw_fp32_bytes": array_bytes(spec),
        "representation": mspec["representation"],
        "reference_representation": spec["representation"],
        "arrays": {
            n: {k: a[k] for k in ("row_shape", "dtype") if k in a} for n, a in mspec["arrays"].items()
        },
        "array_bytes": array_bytes(mspec),
    }


def code_entropy(meas: GradientStore, epoch: int, layer: str) -> dict[str, float] | None:
    """Order-0 entropy of a layer's stored int8 codes in one epoch (``None`` without int8 codes).

    No coder that codes each value on its own (zstd's Huffman stage is one) stores the codes in fewer
    bits than this; ``bytes_per_sample`` adds the float32 scales, uncompressed.
    """
    from mstore_lightning.store import layout

    group = meas.catalog.root[layout.EPOCHS][layout.epoch_key(epoch)]
    counts, values, scale_bytes, rows = np.zeros(256, np.int64), 0, 0, 0
    for rank in (g for k, g in group.groups() if k.startswith(layout.SPLITS["train"])):
        layers = rank[layout.LAYERS]
        if layer not in layers:
            continue
        arrays = dict(layers[layer].arrays())
        for name, arr in arrays.items():
            if arr.dtype == np.int8:
                for lo in range(0, arr.shape[0], arr.chunks[0]):
                    codes = np.asarray(arr[lo : lo + arr.chunks[0]]).view(np.uint8).ravel()
                    counts += np.bincount(codes, minlength=256)
                values += arr.size
            elif name.endswith("_scale"):
                scale_bytes += arr.nbytes
        rows += next(iter(arrays.values())).shape[0]
    if not values:
        return None
    p = counts[counts > 0] / counts.sum()
    bits = float(-(p * np.log2(p)).sum())
    return {
        "bits_per_value": bits,
        "values_per_sample": values / rows,
        "bytes_per_sample": (bits * values / 8 + scale_bytes) / rows,
    }


def measure_sizes(ref: GradientStore, meas: GradientStore, epochs: list[int]) -> dict[str, Any]:
    """Bytes on disk of one store per layer and for the model, per epoch, with the compression ratios."""
    rows = {e: len(meas.sample_ids(e)) for e in epochs}
    layers: dict[str, dict] = {}
    for layer in ref.layers:
        info = layer_sizes(ref, meas, layer)
        info["bytes_per_sample"] = [meas.nbytes_stored(epoch=e, layer=layer) / rows[e] for e in epochs]
        entropy = code_entropy(meas, epochs[0], layer)
        if entropy is not None:
            info["int8_code_entropy"] = entropy
        layers[layer] = info
    model: dict[str, Any] = {
        "numel": sum(v["numel"] for v in layers.values()),
        "fp32_grad_bytes": sum(v["fp32_grad_bytes"] for v in layers.values()),
        "raw_fp32_bytes": sum(v["raw_fp32_bytes"] for v in layers.values()),
        "array_bytes": sum(v["array_bytes"] for v in layers.values()),
        "rows": [rows[e] for e in epochs],
        "bytes_per_sample": [
            sum(v["bytes_per_sample"][i] for v in layers.values()) for i in range(len(epochs))
        ],
        # The whole epoch group: every layer plus the per-row records (ids, step, loss, label, lr).
        "epoch_bytes_per_sample": [meas.nbytes_stored(epoch=e) / rows[e] for e in epochs],
        "epoch_bytes": [meas.nbytes_stored(epoch=e) for e in epochs],
        "store_bytes": meas.nbytes_stored(),
    }
    if hasattr(meas, "dedup_stats"):  # what deduplication of repeated inputs saved, where the library has it
        model["dedup_stats"] = [meas.dedup_stats(e) for e in epochs]
    for d in (*layers.values(), model):
        add_ratios(d)
    model["epoch_ratio_vs_fp32_grad"] = [
        model["fp32_grad_bytes"] / b for b in model["epoch_bytes_per_sample"]
    ]
    model["later_epoch_ratio_store"] = (
        model["epoch_bytes"][-1] / model["epoch_bytes"][0] if len(epochs) > 1 else None
    )
    return {"layers": layers, "model": model}


def add_ratios(d: dict[str, Any]) -> None:
    """Adds compression ratios per epoch and the last epoch's bytes over the first's to a size record."""
    b = d["bytes_per_sample"]
    d["ratio_vs_fp32_grad"] = [d["fp32_grad_bytes"] / x if x else None for x in b]
    d["ratio_vs_raw_fp32"] = [d["raw_fp32_bytes"] / x if x else None for x in b]
    d["later_epoch_ratio"] = b[-1] / b[0] if len(b) > 1 and b[0] else None


def compare_epoch(
    ref: GradientStore, measured: dict[str, GradientStore], epoch: int, cos_n: int, dot_n: int
) -> dict[str, tuple[dict[str, dict], dict[str, Any]]]:
    """Errors of each measured store's epoch against the reference's, per layer and for the whole model.

    The reference is restored, normed and dotted once and compared with every measured store.

    Returns:
        Per precision, per layer and for the model: cosines of restored gradients (median, min, over up
        to ``cos_n`` samples whose reference gradient is not zero), relative errors of ``norms``
        (median, max, over every sample with a non-zero reference norm), and the relative Frobenius
        error of the ``dot`` Gram matrix of up to ``dot_n`` samples.
    """
    ids = ref.sample_ids(epoch)
    for p, meas in measured.items():
        if not np.array_equal(ids, meas.sample_ids(epoch)):
            raise RuntimeError(f"epoch {epoch}: the {p} store's sample ids differ from the reference's")
    cos_ids, dot_ids = spread(ids, cos_n), spread(ids, dot_n)
    per_layer: dict[str, dict[str, dict]] = {p: {} for p in measured}

    # Model-level figures are sums over layers: <x,r>, |x|², |r|² per sample, squared norms, Gram matrices.
    def totals(*keys: str) -> dict[str, np.ndarray]:
        shapes = {"xr": len(cos_ids), "xx": len(cos_ids), "rr": len(cos_ids), "norm2": len(ids)}
        return {k: np.zeros(shapes.get(k, (len(dot_ids), len(dot_ids)))) for k in keys}

    tot_r = totals("rr", "norm2", "dot")
    tot_x = {p: totals("xr", "xx", "norm2", "dot") for p in measured}
    for layer in ref.layers:
        params = ref.layer_spec(layer)["params"]
        rr = np.zeros(len(cos_ids))
        xr = {p: np.zeros(len(cos_ids)) for p in measured}
        xx = {p: np.zeros(len(cos_ids)) for p in measured}
        for lo in range(0, len(cos_ids), READ_BLOCK):
            blk = cos_ids[lo : lo + READ_BLOCK]
            sl = slice(lo, lo + len(blk))
            r = as_rows(ref.restore(epoch, layer, blk), params)
            rr[sl] = row_dot(r, r)
            for p, meas in measured.items():
                x = as_rows(meas.restore(epoch, layer, blk), params)
                xr[p][sl], xx[p][sl] = row_dot(x, r), row_dot(x, x)
            del r, x  # the next block's gradients need the memory
        norm_r = ref.norms(epoch, layers=[layer])
        dot_r = ref.dot(epoch, dot_ids, dot_ids, layers=[layer])
        tot_r["rr"] += rr
        tot_r["norm2"] += norm_r**2
        tot_r["dot"] += dot_r
        for p, meas in measured.items():
            norm_x = meas.norms(epoch, layers=[layer])
            dot_x = meas.dot(epoch, dot_ids, dot_ids, layers=[layer])
            per_layer[p][layer] = error_figures(xr[p], xx[p], rr, norm_x, norm_r, dot_x, dot_r)
            t = tot_x[p]
            t["xr"] += xr[p]
            t["xx"] += xx[p]
            t["norm2"] += norm_x**2
            t["dot"] += dot_x
    out = {}
    for p, t in tot_x.items():
        model = error_figures(
            t["xr"],
            t["xx"],
            tot_r["rr"],
            np.sqrt(t["norm2"]),
            np.sqrt(tot_r["norm2"]),
            t["dot"],
            tot_r["dot"],
        )
        model["cos_samples"], model["dot_samples"] = len(cos_ids), len(dot_ids)
        out[p] = (per_layer[p], model)
    return out


def error_figures(
    xr: np.ndarray,
    xx: np.ndarray,
    rr: np.ndarray,
    norm_x: np.ndarray,
    norm_r: np.ndarray,
    dot_x: np.ndarray,
    dot_r: np.ndarray,
) -> dict[str, Any]:
    """Cosine, norm and Gram-matrix error summaries from per-sample products (see :func:`compare_epoch`)."""
    keep = rr > 0  # a zero reference gradient has no direction to compare with
    # A measured gradient of zero where the reference is not has cosine 0, not NaN.
    cos = xr[keep] / np.maximum(np.sqrt(xx[keep] * rr[keep]), 1e-300)
    nz = norm_r > 0
    norm_err = np.abs(norm_x[nz] - norm_r[nz]) / norm_r[nz]
    dot_den = np.linalg.norm(dot_r)
    return {
        "cos_median": float(np.median(cos)) if cos.size else None,
        "cos_min": float(cos.min()) if cos.size else None,
        "cos_zero_reference_skipped": int((~keep).sum()),
        "norm_rel_err_median": float(np.median(norm_err)) if norm_err.size else None,
        "norm_rel_err_max": float(norm_err.max()) if norm_err.size else None,
        "dot_rel_fro_err": float(np.linalg.norm(dot_x - dot_r) / dot_den) if dot_den > 0 else None,
    }


def worst_errors(per_epoch: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst value of each error figure over the epochs: the lowest cosines, the largest errors."""

    def pick(key: str, fn: Any) -> Any:
        vals = [e[key] for e in per_epoch if e[key] is not None]
        return fn(vals) if vals else None

    return {
        "cos_median": pick("cos_median", min),
        "cos_min": pick("cos_min", min),
        "norm_rel_err_median": pick("norm_rel_err_median", max),
        "norm_rel_err_max": pick("norm_rel_err_max", max),
        "dot_rel_fro_err": pick("dot_rel_fro_err", max),
    }


def bench_model(
    name: str,
    precisions: list[str],
    samples_scale: float,
    epochs: int,
    cos_n: int | None,
    dot_n: int | None,
    workdir: Path,
) -> dict[str, Any]:
    """Trains one model with the reference and every measured capture, then measures each store.

    Args:
        name: key of :data:`SPECS`.
        precisions: measured precisions.
        samples_scale: multiplies the model's default sample count.
        epochs: epochs to train.
        cos_n: samples per epoch whose restored gradients are compared; ``None``: the model's default.
        dot_n: samples per epoch whose Gram matrix is compared; ``None``: the model's default.
        workdir: temporary directory for the stores.

    Returns:
        The model's description, data, timings, reference check and per-precision figures.
    """
    spec = SPECS[name]
    cos_n, dot_n = cos_n or spec.cos_samples, dot_n or spec.dot_samples
    data = make_dataset(spec, samples_scale)
    ref_path = workdir / f"{name}-reference.zarr"
    paths = {p: workdir / f"{name}-measured-{store_name(p)}" for p in precisions}
    initial, fit_s, messages = fit_with_captures(spec, data, [(REFERENCE, ref_path), *paths.items()], epochs)
    ref = open_store(ref_path)
    measured = {p: open_store(path) for p, path in paths.items()}
    for p, store in {REFERENCE: ref, **measured}.items():
        if store.epochs != list(range(epochs)):
            raise RuntimeError(f"{name}: the {p} store holds epochs {store.epochs}, expected 0..{epochs - 1}")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "description": spec.model.description,
        "data": spec.data_note,
        "samples": len(data),
        "batch_size": spec.model.batch_size,
        "epochs": ref.epochs,
        "cos_samples": min(cos_n, len(data)),
        "dot_samples": min(dot_n, len(data)),
        "fit_s": fit_s,
        "fit_warnings": messages,
        "uncovered": ref.uncovered,
        "reference_check": check_reference(initial, data, spec.model.batch_size, ref),
        "reference": measure_sizes(ref, ref, ref.epochs),
        "precisions": {p: measure_sizes(ref, store, ref.epochs) for p, store in measured.items()},
    }
    for e in ref.epochs:
        for p, (per_layer, model) in compare_epoch(ref, measured, e, cos_n, dot_n).items():
            figures = result["precisions"][p]
            for layer, errors in per_layer.items():
                figures["layers"][layer].setdefault("errors", []).append({"epoch": e, **errors})
            figures["model"].setdefault("errors", []).append({"epoch": e, **model})
    for figures in result["precisions"].values():
        for d in (*figures["layers"].values(), figures["model"]):
            d["worst"] = worst_errors(d["errors"])
    result["measure_s"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------- report
def _f(value: float | None, fmt: str) -> str:
    """``value`` formatted, or ``-`` when there is none."""
    return "-" if value is None else format(value, fmt)


def _row(precision: str, layer: str, d: dict[str, Any], rows_record: bool = False) -> str:
    """One table row of a layer or model size record; ``rows_record`` uses the whole epoch's bytes."""
    b = d["epoch_bytes_per_sample"] if rows_record else d["bytes_per_sample"]
    ratio = d["epoch_ratio_vs_fp32_grad"][0] if rows_record else d["ratio_vs_fp32_grad"][0]
    raw = d["raw_fp32_bytes"] / b[0] if b[0] else None
    later = b[-1] / b[0] if len(b) > 1 and b[0] else None
    w = {} if rows_record else d.get("worst", {})
    return (
        f"{precision:<10} {layer:<28} {d.get('representation', ''):<8} {b[0]:>11,.1f} {b[-1]:>11,.1f} "
        f"{_f(later, '.3f'):>8} {_f(ratio, ',.1f'):>10}x {_f(raw, ',.2f'):>8}x "
        f"{_f(w.get('cos_median'), '.6f'):>9} {_f(w.get('cos_min'), '.6f'):>9} "
        f"{_f(w.get('norm_rel_err_median'), '.2e'):>9} {_f(w.get('norm_rel_err_max'), '.2e'):>9} "
        f"{_f(w.get('dot_rel_fro_err'), '.2e'):>9}"
    )


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Per model, one block of rows: per layer and for the model, the reference and each precision."""
    header = (
        f"{'precision':<10} {'layer':<28} {'repr':<8} {'B/s first':>11} {'B/s last':>11} {'last/1st':>8} "
        f"{'x fp32 grad':>11} {'x raw fp32':>9} {'cos med':>9} {'cos min':>9} {'norm med':>9} "
        f"{'norm max':>9} {'dot err':>9}"
    )
    lines = []
    for name, r in results.items():
        check = r["reference_check"]
        check_text = (
            f"skipped ({check['skipped']})"
            if "skipped" in check
            else f"{'ok' if check['ok'] else 'FAILED'} (max rel err {check['max_rel_error']:.1e})"
        )
        lines += [
            "",
            (
                f"{name}: {r['description']}; {r['samples']} samples x {len(r['epochs'])} epochs, "
                f"batch {r['batch_size']}; errors over {r['cos_samples']} samples (cos) and "
                f"{r['dot_samples']} (dot); fit {r['fit_s']:.1f} s, measuring {r['measure_s']:.1f} s; "
                f"reference check {check_text}"
            ),
            header,
            "-" * len(header),
        ]
        for precision, p in [(f"{REFERENCE} ref", r["reference"]), *r["precisions"].items()]:
            for layer, d in p["layers"].items():
                lines.append(_row(precision, layer, d))
            lines.append(_row(precision, "[all layers]", p["model"]))
            lines.append(_row(precision, "[epoch incl. row records]", p["model"], rows_record=True))
    return "\n".join(lines)


def judge_targets(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The targets at :data:`TARGET_PRECISION`, as printed lines and as a JSON record.

    Compression is judged on the first epoch, which cannot profit from deduplication across epochs;
    the cosine condition on the lowest median over the epochs.
    """
    lines = [
        (
            f"targets at {TARGET_PRECISION}, each needing a median cosine >= {TARGET_COSINE} in every epoch "
            "(model level, all layers concatenated):"
        )
    ]
    record: dict[str, Any] = {}
    for name, r in results.items():
        p = r["precisions"].get(TARGET_PRECISION)
        if p is None:
            lines.append(f"  {name}: {TARGET_PRECISION} not measured")
            continue
        m = p["model"]
        cos = m["worst"]["cos_median"]
        cos_ok = cos is not None and cos >= TARGET_COSINE
        rec: dict[str, Any] = {"cos_median": cos, "cos_ok": cos_ok}
        if name in TARGET_RATIO:
            want = TARGET_RATIO[name]
            layers, with_rows = m["ratio_vs_fp32_grad"][0], m["epoch_ratio_vs_fp32_grad"][0]
            rec.update(
                ratio_target=want,
                ratio_layers=layers,
                ratio_with_rows=with_rows,
                ratio_ok=cos_ok and layers >= want,
                ratio_with_rows_ok=cos_ok and with_rows >= want,
            )
            lines.append(
                f"  {name:<12} >= {want:,.0f}x fp32 per-sample gradients (first epoch): layers {layers:,.0f}x "
                f"{'ok' if rec['ratio_ok'] else 'MISS'}; incl. row records {with_rows:,.0f}x "
                f"{'ok' if rec['ratio_with_rows_ok'] else 'MISS'}; median cos {cos:.6f}"
            )
            # The same layers with their int8 codes at their order-0 entropy: the best ratio a coder
            # of single values could give these codes.
            floor = sum(
                v["int8_code_entropy"]["bytes_per_sample"]
                if "int8_code_entropy" in v
                else v["bytes_per_sample"][0]
                for v in p["layers"].values()
            )
            rec["ratio_at_code_entropy"] = m["fp32_grad_bytes"] / floor
            lines.append(
                f"  {'':<12} with every int8 code at its order-0 entropy it would be "
                f"{rec['ratio_at_code_entropy']:,.1f}x"
            )
        later = m["later_epoch_ratio_store"]
        if later is not None:
            rec.update(later_epoch_ratio=later, later_epoch_ok=cos_ok and later <= TARGET_LATER_EPOCH)
            lines.append(
                f"  {name:<12} last epoch <= {TARGET_LATER_EPOCH} x first (whole epoch incl. rows): "
                f"{later:.3f} {'ok' if rec['later_epoch_ok'] else 'MISS'}; median cos {cos:.6f}"
            )
        record[name] = rec
    return lines, record


def git_info() -> dict[str, Any]:
    """The checkout's commit and whether the library or the benchmarks differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain", "--", "mstore_lightning", "benchmarks").strip()),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def versions() -> dict[str, str]:
    """``capture_overhead``'s versions plus scikit-learn, which supplies the MLP's digits."""
    import sklearn

    return {**co.versions(), "scikit-learn": sklearn.__version__}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line; ``--models`` and ``--precisions`` become lists."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SPECS), help=f"comma-separated subset of {list(SPECS)}")
    parser.add_argument(
        "--precisions",
        default=DEFAULT_PRECISIONS,
        help="comma-separated policy precisions to measure against the fp32 reference",
    )
    parser.add_argument(
        "--samples",
        type=float,
        default=1.0,
        help="multiply each model's default samples per epoch (e.g. 0.25 for a quick run)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs to train and capture")
    parser.add_argument(
        "--cos-samples",
        type=int,
        default=None,
        help="samples per epoch whose restored gradients are compared (default: per model)",
    )
    parser.add_argument(
        "--dot-samples",
        type=int,
        default=None,
        help="samples per epoch whose dot() Gram matrix is compared (default: per model)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SPECS]
    if unknown or not args.models:
        parser.error(f"--models takes a comma-separated subset of {list(SPECS)}; got {unknown or 'nothing'}")
    args.precisions = list(dict.fromkeys(p.strip() for p in args.precisions.split(",") if p.strip()))
    if not args.precisions:
        parser.error("--precisions needs at least one precision")
    if args.samples <= 0 or args.epochs < 1 or min(args.cos_samples or 1, args.dot_samples or 1) < 1:
        parser.error("--samples must be > 0 and --epochs, --cos-samples, --dot-samples >= 1")
    return args


def accepted(precisions: list[str]) -> tuple[list[str], dict[str, str]]:
    """Splits ``precisions`` into those the installed library accepts and, with the reason, the others."""
    ok, rejected = [], {}
    for p in precisions:
        try:
            CapturePolicy(precision=p)
            ok.append(p)
        except PolicyError as exc:
            rejected[p] = str(exc)
    return ok, rejected


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the table and the targets and writes the JSON report.

    Returns:
        The process exit status: 0 once the report is written (a missed target is reported, not an
        error), 2 when the library accepts none of the precisions asked for.
    """
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    precisions, rejected = accepted(args.precisions)
    for p, why in rejected.items():
        # Reported and skipped rather than fatal: the other precisions are still worth measuring.
        print(f"precision {p!r} is not accepted by this version of mstore_lightning, skipped: {why}")
    if not precisions:
        print("no precision left to measure")
        return 2

    machine = co.machine_info()
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items()),
        flush=True,
    )

    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mstore-storage-") as tmp:
        for name in args.models:
            print(f"{name}: {SPECS[name].model.description}", flush=True)
            results[name] = bench_model(
                name, precisions, args.samples, args.epochs, args.cos_samples, args.dot_samples, Path(tmp)
            )
    total_s = time.perf_counter() - start

    print(format_table(results))
    print(
        "\nB/s: bytes on disk per sample (layer: its arrays; [all layers]: their sum; [epoch incl. row "
        "records]: the whole epoch group). first/last: first and last epoch. Errors: the worst epoch."
    )
    target_lines, target_record = judge_targets(results)
    print()
    print("\n".join(target_lines))
    for name, r in results.items():
        check = r["reference_check"]
        if not check.get("ok", True):
            print(f"\n{name}: the reference store does not match autograd on the first batch: {check}")
        if r["fit_warnings"]:
            print(f"\nwarnings of the {name} fit:")
            for message in r["fit_warnings"]:
                print(f"  {message}")
    print(f"\ntotal {total_s:.0f} s")

    report = {
        "benchmark": "storage",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
        "git": git_info(),
        "mstore_lightning_sources_sha256": co.library_digest(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "reference_policy": REFERENCE_POLICY,
        "precisions_measured": precisions,
        "precisions_rejected": rejected,
        "targets": {
            "precision": TARGET_PRECISION,
            "cos_median_min": TARGET_COSINE,
            "ratio_vs_fp32_grad": TARGET_RATIO,
            "later_epoch_ratio_max": TARGET_LATER_EPOCH,
            "results": target_record,
        },
        "total_s": total_s,
        "models": results,
    }
    co.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
