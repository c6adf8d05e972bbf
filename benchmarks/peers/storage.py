"""Storage: bytes per sample and inner-product error of our store against a JL projection and raw memmaps.

Each model is trained (two epochs by default, SGD as in ``capture_overhead.py``) with one
:class:`~mstore_lightning.GradientCapture` of every layer per precision (int8, the default policy's;
fp16; ``kbit:4``; fp32, lossless). The captures use ``timing: "checkpoint"`` and ``epochs: "last"``:
after the last epoch each passes over the training set again with the final weights, so every
stored row is the gradient of the same network, and ``torch.func`` gives the exact reference.

On an evenly spread subset of the training samples, each representation is compared with the exact
float64 per-sample gradients (``vmap(grad(...))`` of the trained network):

- **ours**: the store as written; bytes are the epoch's bytes on disk (every layer plus the per-row
  ids, steps and labels) per captured row; inner products from ``store.dot``, norms from
  ``store.norms``, both computed on the factors.
- **raw fp16 memmaps of the factors**: the arrays of the lossless store (per layer the factors, or
  the full per-sample gradient where that is smaller, as the store chooses) written to uncompressed
  ``np.memmap`` files in float16, one per array, as TRAK and LogIX keep their features; read back
  and restored to gradients. This is our representation without our codecs.
- **dense fp16 gradient memmap**: each sample's whole flattened gradient in float16.
- **TRAK-style JL projection**: ``P^T g / sqrt(k)`` with a seeded ``(params, k)`` Rademacher or
  Gaussian matrix (generated block by block, never stored), kept as a float16 memmap, with ``k`` set
  so that ``2 k`` bytes equal our store's bytes per sample, rounded up, at each of our precisions.

Errors, over all pairs ``i < j`` of the subset: ``|<g_i,g_j>^ - <g_i,g_j>| / (||g_i|| ||g_j||)`` (the
error in cosine units: median, 95th percentile, max), the Gram matrix's relative Frobenius error, the
relative error of norms, and how many of each sample's 10 largest-inner-product partners are kept.

Usage:
    python benchmarks/peers/storage.py                           # mlp and cnn, about 5 minutes
    python benchmarks/peers/storage.py --models mlp,cnn,transformer
    python benchmarks/peers/storage.py --samples 0.25 --subset 64 --epochs 1   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from mstore_lightning import GradientCapture, GradientStore, open_store
from mstore_lightning.core.families.registry import extractor_for_kind

DEFAULT_OUT = common.RESULTS / "peers_storage.json"
DEFAULT_PRECISION = "int8"  # CapturePolicy's default
LOSSLESS = "fp32"
PRECISIONS = "int8,fp16,kbit:4"
JL_KINDS = "rademacher,gaussian"
JL_SEED = 0
JL_BLOCK = 1 << 24  # projection-matrix entries generated at once (64 MB in float32)
TOPK = 10
SUBSET = {"mlp": 256, "cnn": 128, "transformer": 64}  # samples compared: pairs grow as the square
READ_BLOCK = 32  # samples whose exact gradients are computed at once


# --------------------------------------------------------------------------------------------- training
def train_and_capture(
    name: str, data: common.SyntheticData, precisions: list[str], epochs: int, workdir: Path
) -> tuple[nn.Module, dict[str, GradientStore], dict[str, Any]]:
    """Trains model ``name`` for ``epochs`` with one capture per precision (every layer, checkpoint timing).

    Returns:
        The trained network (eval mode), the stores by precision, and the fit's time and warnings.
    """
    net = common.build(name)
    paths = {p: workdir / f"{name}-{''.join(c if c.isalnum() else '_' for c in p)}.zarr" for p in precisions}
    policy = {"layers": ["*"], "loss_reduction": "mean", "timing": "checkpoint", "epochs": "last"}
    callbacks = [
        GradientCapture(store=str(path), policy=dict(policy, precision=p), mode="overwrite")
        for p, path in paths.items()
    ]
    trainer = common.quiet_trainer(callbacks, max_epochs=epochs)
    loader = common.make_loader(data, common.SPECS[name].batch_size)
    start = time.perf_counter()
    _, messages = common.co.capture_messages(lambda: trainer.fit(common.Classifier(net), loader))
    info = {"fit_s": time.perf_counter() - start, "fit_warnings": messages, "policy": policy}
    return net.eval(), {p: open_store(path) for p, path in paths.items()}, info


# ----------------------------------------------------------------------------------- representations
Grads = dict[str, Tensor]  # parameter name -> (n, numel) float64


def exact_grads(net: nn.Module, data: common.SyntheticData, ids: np.ndarray, names: list[str]) -> Grads:
    """Float64 per-sample gradients of samples ``ids`` by ``torch.func``, flattened, for ``names``."""
    net64 = _copy_double(net)
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    for lo in range(0, len(ids), READ_BLOCK):
        batch = data[ids[lo : lo + READ_BLOCK].tolist()]
        x = batch["x"].double() if batch["x"].is_floating_point() else batch["x"]
        g = common.per_sample_grads(net64, x, batch["y"])
        for n in names:
            parts[n].append(g[n].flatten(1))
    return {n: torch.cat(p) for n, p in parts.items()}


def gram_of(grads: Grads) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrix and norms of per-sample gradients split by parameter, in float64."""
    gram = sum(g.double() @ g.double().T for g in grads.values())
    return gram.numpy(), np.sqrt(np.diag(gram.numpy()))


def ours(store: GradientStore, ids: np.ndarray) -> dict[str, Any]:
    """Our store's bytes per sample, and its inner products and norms on the factors for ``ids``."""
    epoch = store.epochs[-1]
    all_ids = store.sample_ids(epoch)
    rows = len(all_ids)
    pos = np.searchsorted(all_ids, ids)
    if not np.array_equal(all_ids[pos], ids):
        raise RuntimeError("the store lacks some of the compared samples")
    layer_bytes = sum(store.nbytes_stored(epoch=epoch, layer=layer) for layer in store.layers)
    return {
        "bytes_per_sample": store.nbytes_stored(epoch=epoch) / rows,
        "layer_bytes_per_sample": layer_bytes / rows,
        "rows": rows,
        "representations": {lay: store.layer_spec(lay)["representation"] for lay in store.layers},
        "gram": np.asarray(store.dot(epoch, ids, ids), dtype=np.float64),
        "norms": np.asarray(store.norms(epoch), dtype=np.float64)[pos],
    }


def factor_memmaps(store: GradientStore, ids: np.ndarray, workdir: Path) -> dict[str, Any]:
    """The lossless store's arrays of ``ids`` as raw float16 memmaps, read back and restored.

    Integer arrays (an embedding's token ids) keep their dtype; float16 cannot hold ids above 2048.
    """
    epoch = store.epochs[-1]
    grads: Grads = {}
    row_bytes = 0
    for layer in store.layers:
        spec = store.layer_spec(layer)
        arrays = store.factors(epoch, layer, ids)
        back = {}
        for key, value in arrays.items():
            arr = value.numpy()
            dtype = np.float16 if np.issubdtype(arr.dtype, np.floating) else arr.dtype
            path = workdir / f"{layer}.{key}.f16"
            mm = np.memmap(path, dtype=dtype, mode="w+", shape=arr.shape)
            mm[:] = arr
            mm.flush()
            del mm
            row_bytes += path.stat().st_size // len(ids)
            back[key] = torch.from_numpy(np.array(np.memmap(path, dtype=dtype, mode="r", shape=arr.shape)))
            path.unlink()
        if spec["representation"] == "factors":
            floats = {k: v.float() if v.is_floating_point() else v for k, v in back.items()}
            restored = extractor_for_kind(spec["kind"]).restore(spec["hyper"], spec["params"], floats)
        else:
            restored = back
        for param, g in restored.items():
            grads[_param_name(layer, param)] = g.flatten(1).double()
    gram, norms = gram_of(grads)
    return {"bytes_per_sample": row_bytes, "gram": gram, "norms": norms}


def dense_fp16(exact: Grads) -> dict[str, Any]:
    """Each whole per-sample gradient rounded to float16, as a dense memmap would hold it."""
    gram, norms = gram_of({n: g.half().double() for n, g in exact.items()})
    return {"bytes_per_sample": 2 * sum(g.shape[1] for g in exact.values()), "gram": gram, "norms": norms}


def jl_projection(exact: Grads, k: int, kind: str, workdir: Path, seed: int = JL_SEED) -> dict[str, Any]:
    """TRAK's feature: ``P^T g / sqrt(k)`` in float32, stored as a float16 memmap and read back.

    ``P`` has i.i.d. entries, +-1 (``rademacher``) or standard normal (``gaussian``), drawn from one
    seeded generator block by block over the parameters, so ``E[<Pg, Ph>] / k = <g, h>``.
    """
    n = next(iter(exact.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    proj = torch.zeros(n, k)
    rows_per_block = max(1, JL_BLOCK // k)
    start = time.perf_counter()
    for g in exact.values():
        g32 = g.float()
        for lo in range(0, g32.shape[1], rows_per_block):
            hi = min(lo + rows_per_block, g32.shape[1])
            block = torch.randn(hi - lo, k, generator=gen)
            if kind == "rademacher":
                block.sign_()  # the sign of a normal is +-1 with equal odds; faster than bernoulli_
            proj.addmm_(g32[:, lo:hi], block)
    proj /= math.sqrt(k)
    seconds = time.perf_counter() - start
    path = workdir / f"jl-{kind}-{k}.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, k))
    mm[:] = proj.numpy()
    mm.flush()
    del mm
    feats = torch.from_numpy(np.array(np.memmap(path, dtype=np.float16, mode="r", shape=(n, k)))).double()
    size = path.stat().st_size
    path.unlink()
    gram = (feats @ feats.T).numpy()
    return {
        "bytes_per_sample": size // n,
        "k": k,
        "projection_s": seconds,
        "overflow": bool(np.isinf(gram).any()),
        "gram": gram,
        "norms": np.sqrt(np.diag(gram)),
    }


# ----------------------------------------------------------------------------------------------- errors
def errors(
    gram: np.ndarray, norms: np.ndarray, ref_gram: np.ndarray, ref_norms: np.ndarray
) -> dict[str, Any]:
    """Error figures of an estimated Gram matrix and norms against the exact ones.

    Returns:
        ``pair_err_*``: ``|G^_ij - G_ij| / (|g_i| |g_j|)`` over pairs ``i < j`` (median, p95, max);
        ``pair_rel_err_median``: ``|G^_ij - G_ij| / |G_ij|`` (large where ``G_ij`` is near 0);
        ``gram_rel_fro``: ``||G^ - G||_F / ||G||_F``; ``norm_rel_err_*``; ``topk_overlap``: the mean
        share of each sample's ``TOPK`` largest-inner-product partners (itself excluded) kept.
    """
    iu = np.triu_indices(len(ref_norms), k=1)
    scale = np.outer(ref_norms, ref_norms)[iu]
    diff = np.abs(gram[iu] - ref_gram[iu])
    keep = scale > 0
    pair = diff[keep] / scale[keep]
    nz = np.abs(ref_gram[iu]) > 0
    norm_keep = ref_norms > 0
    norm_err = np.abs(norms[norm_keep] - ref_norms[norm_keep]) / ref_norms[norm_keep]
    return {
        "pair_err_median": float(np.median(pair)),
        "pair_err_p95": float(np.percentile(pair, 95)),
        "pair_err_max": float(pair.max()),
        "pair_rel_err_median": float(np.median(diff[nz] / np.abs(ref_gram[iu][nz]))),
        "gram_rel_fro": float(np.linalg.norm(gram - ref_gram) / np.linalg.norm(ref_gram)),
        "norm_rel_err_median": float(np.median(norm_err)),
        "norm_rel_err_max": float(norm_err.max()),
        "topk_overlap": topk_overlap(gram, ref_gram, TOPK),
        "pairs": int(keep.sum()),
    }


def topk_overlap(gram: np.ndarray, ref_gram: np.ndarray, k: int) -> float:
    """Mean over samples of ``|top-k by gram ∩ top-k by ref_gram| / k``, each sample's own entry left out."""
    n = len(gram)
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    masked, ref_masked = gram.copy(), ref_gram.copy()
    np.fill_diagonal(masked, -np.inf)
    np.fill_diagonal(ref_masked, -np.inf)
    got = np.argsort(-masked, axis=1)[:, :k]
    want = np.argsort(-ref_masked, axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want)]))


# --------------------------------------------------------------------------------------------- running
def bench_model(
    name: str,
    precisions: list[str],
    jl_kinds: list[str],
    epochs: int,
    samples_scale: float,
    subset: int | None,
    jl_max_entries: float,
    workdir: Path,
) -> dict[str, Any]:
    """Trains and captures one model, then measures every representation against the exact gradients.

    Returns:
        The model's setup, the lossless store's check, and per representation its bytes per sample,
        the bytes relative to ours at the default precision, and its error figures.
    """
    bench_storage = common.load_benchmark("storage")  # the project's storage benchmark: same data
    sspec = bench_storage.SPECS[name]
    data = bench_storage.make_dataset(sspec, samples_scale)
    stored = list(dict.fromkeys([LOSSLESS, *precisions]))
    net, stores, info = train_and_capture(name, data, stored, epochs, workdir)
    lossless = stores[LOSSLESS]
    ids = bench_storage.spread(lossless.sample_ids(lossless.epochs[-1]), subset or SUBSET[name])
    covered = [
        _param_name(layer, p) for layer in lossless.layers for p in lossless.layer_spec(layer)["params"]
    ]
    all_params = dict(net.named_parameters())
    start = time.perf_counter()
    exact = exact_grads(net, data, ids, covered)
    ref_gram, ref_norms = gram_of(exact)
    result: dict[str, Any] = {
        "description": sspec.model.description,
        "data": sspec.data_note,
        "samples": len(data),
        "batch_size": sspec.model.batch_size,
        "epochs_trained": epochs,
        "compared_samples": len(ids),
        "params": sum(p.numel() for p in all_params.values()),
        "covered_params": sum(all_params[n].numel() for n in covered),
        "uncovered": lossless.uncovered,
        "exact_s": time.perf_counter() - start,
        **info,
        "representations": {},
    }
    reps = result["representations"]

    def add(key: str, label: str, rec: dict[str, Any]) -> None:
        rec["label"] = label
        rec.update(errors(rec.pop("gram"), rec.pop("norms"), ref_gram, ref_norms))
        reps[key] = rec
        print(
            f"  {name} {label}: {rec['bytes_per_sample']:,.0f} B/sample, pair err median "
            f"{rec['pair_err_median']:.2e}",
            flush=True,
        )

    for p in stored:
        tag = " (default)" if p == DEFAULT_PRECISION else " (lossless)" if p == LOSSLESS else ""
        add(f"ours:{p}", f"ours {p}{tag}", ours(stores[p], ids))
    add(
        "memmap:factors_fp16",
        "raw fp16 memmaps of the store's arrays",
        factor_memmaps(lossless, ids, workdir),
    )
    add("memmap:dense_fp16", "dense fp16 gradient memmap", dense_fp16(exact))
    dims = sum(g.shape[1] for g in exact.values())
    result["jl_skipped"] = []
    for p in precisions:
        k = math.ceil(reps[f"ours:{p}"]["bytes_per_sample"] / 2)  # never fewer bytes than ours
        for kind in jl_kinds:
            why = None
            if k >= dims:
                why = f"k={k} >= {dims} gradient dims: the dense fp16 gradient fits in these bytes"
            elif k * dims > jl_max_entries:
                why = f"the {dims:,} x {k:,} projection exceeds --jl-max-entries {jl_max_entries:.0e}"
            if why:
                result["jl_skipped"].append({"budget": p, "kind": kind, "why": why})
                continue
            rec = jl_projection(exact, k, kind, workdir)
            rec["budget_of"] = f"ours:{p}"
            add(f"jl:{kind}:{p}", f"JL {kind} k={k:,} fp16 (= ours {p} bytes)", rec)
    ref_bytes = reps[f"ours:{DEFAULT_PRECISION}"]["bytes_per_sample"] if DEFAULT_PRECISION in stored else None
    for rec in reps.values():
        rec["bytes_vs_ours_default"] = rec["bytes_per_sample"] / ref_bytes if ref_bytes else None
    lossless_err = reps[f"ours:{LOSSLESS}"]["gram_rel_fro"]
    result["reference_check"] = {
        "lossless_store_gram_rel_fro": lossless_err,
        "ok": lossless_err < 1e-4,
        "meaning": "the fp32 store must reproduce torch.func's Gram matrix; if not, nothing here is valid",
    }
    result["measure_s"] = time.perf_counter() - start
    return result


def _param_name(layer: str, param: str) -> str:
    """The network's name of a captured parameter: store layers are named inside ``Classifier.net``."""
    inner = layer.removeprefix("net.").removeprefix("net")
    return f"{inner}.{param}" if inner else param


def _copy_double(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).double().eval()


# ---------------------------------------------------------------------------------------------- report
def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model and representation."""
    header = (
        f"{'model':<12} {'representation':<48} {'B/sample':>10} {'x ours':>7} {'pair err med':>13} "
        f"{'p95':>9} {'gram fro':>9} {'norm err med':>13} {'max':>9} {'top-10':>7}"
    )
    lines = [header, "-" * len(header)]
    for model, res in results.items():
        for rec in res["representations"].values():
            x = rec["bytes_vs_ours_default"]
            lines.append(
                f"{model:<12} {rec['label']:<48} {rec['bytes_per_sample']:>10,.0f} "
                f"{'-' if x is None else format(x, '.2f'):>7} {rec['pair_err_median']:>13.2e} "
                f"{rec['pair_err_p95']:>9.2e} {rec['gram_rel_fro']:>9.2e} {rec['norm_rel_err_median']:>13.2e} "
                f"{rec['norm_rel_err_max']:>9.2e} {rec['topk_overlap']:>7.3f}"
            )
    return "\n".join(lines)


def notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """The checks and skips a reader must see beside the table."""
    out = []
    for model, res in results.items():
        chk = res["reference_check"]
        out.append(
            f"{model}: {res['compared_samples']} samples compared ({res['compared_samples'] * (res['compared_samples'] - 1) // 2:,} pairs) "
            f"of {res['samples']}; lossless store vs torch.func Gram error {chk['lossless_store_gram_rel_fro']:.1e} "
            + ("ok" if chk["ok"] else "FAILED: the comparison is not valid")
        )
        if res["covered_params"] < res["params"]:
            out.append(
                f"{model}: every representation covers only the {res['covered_params']:,} of {res['params']:,} "
                f"parameters that the store captures ({len(res['uncovered'])} modules' parameters are not)"
            )
        for skip in res["jl_skipped"]:
            out.append(f"{model}: JL {skip['kind']} at ours {skip['budget']} bytes skipped: {skip['why']}")
        for rec in res["representations"].values():
            if rec.get("overflow"):
                out.append(f"{model}: {rec['label']} overflowed float16")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line; the comma-separated options become lists."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated subset of {list(SUBSET)}")
    parser.add_argument("--precisions", default=PRECISIONS, help="our precisions measured (fp32 always runs)")
    parser.add_argument("--jl", default=JL_KINDS, help="projection kinds: rademacher, gaussian, or both")
    parser.add_argument("--epochs", type=int, default=2, help="epochs trained; the last one is captured")
    parser.add_argument("--samples", type=float, default=1.0, help="multiply each model's training samples")
    parser.add_argument("--subset", type=int, default=None, help=f"samples compared (default {SUBSET})")
    parser.add_argument(
        "--jl-max-entries", type=float, default=4e9, help="largest projection (params x k) to compute"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.jl = [j.strip() for j in args.jl.split(",") if j.strip()]
    if not args.models or set(args.models) - set(SUBSET):
        parser.error(f"--models takes a comma-separated subset of {list(SUBSET)}; got {args.models}")
    if set(args.jl) - {"rademacher", "gaussian"}:
        parser.error(f"--jl takes rademacher and/or gaussian; got {args.jl}")
    if args.epochs < 1 or args.samples <= 0 or (args.subset is not None and args.subset < 2):
        parser.error("--epochs must be >= 1, --samples > 0 and --subset >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes the JSON report; 0 once it is written."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report = common.report_header("peers_storage", {k: v for k, v in vars(args).items() if k != "out"})
    m = report["machine"]
    print(
        f"{m['cpu_model']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, load {m['load_average']}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="mstore-peers-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        for model in args.models:
            print(f"{model}: {common.SPECS[model].description}", flush=True)
            results[model] = bench_model(
                model,
                args.precisions,
                args.jl,
                args.epochs,
                args.samples,
                args.subset,
                args.jl_max_entries,
                Path(tmp),
            )
    print()
    print(format_table(results))
    for line in notes(results):
        print(f"  {line}")
    report.update(
        reference="float64 per-sample gradients of the trained network by torch.func (vmap(grad(functional_call)))",
        bytes=(
            "ours: the captured epoch's bytes on disk (layers + per-row records) / rows; memmaps and JL: "
            "file bytes / rows, uncompressed"
        ),
        jl=f"P^T g / sqrt(k), seed {JL_SEED}, float32 product, float16 memmap; k = ceil(ours' bytes per sample / 2)",
        machine_end=common.machine_info(),
        models=results,
    )
    common.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
