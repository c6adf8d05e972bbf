"""Capture cost: the fit-time overhead of GradientCapture against per-sample gradient peers.

Every arm trains the same model from the same initial weights on the same batches, for one epoch,
inside the same harness: a Lightning ``Trainer.fit`` of ``capture_overhead.py``'s ``Classifier``.
The arms differ only in what they add to each training step:

- ``plain``: nothing; the baseline.
- ``ours``: a :class:`~mstore_lightning.GradientCapture` callback of every layer (int8, the default),
  which writes the per-sample gradient factors to a Zarr store.
- ``opacus``: the network wrapped in Opacus's ``GradSampleModule``; its hooks put each parameter's
  per-sample gradients in ``p.grad_sample`` during the ordinary backward; they are dropped after the
  optimizer step (no clipping or noise: per-sample gradients only).
- ``backpack``: the network ``extend``-ed by BackPACK, the backward run inside
  ``backpack(BatchGrad())``; ``p.grad_batch`` is dropped after the step.
- ``func``: ``torch.func``: ``vmap(grad(...))`` of ``functional_call`` gives the per-sample gradients,
  their mean is the batch gradient the optimizer steps on (manual optimization, no second backward);
  they are dropped after the step.

One harness for all arms, because ours is a Lightning callback and cannot run in a bare loop, while
every peer runs inside Lightning unchanged (a wrapped module, a ``backward`` override, a manual step):
the fixed cost of Lightning's loop is then the same in every arm and in the baseline. Arms are timed
in rounds ``plain, ours, opacus, backpack, func, plain, ...``; an arm's figure is the median over
rounds of its time divided by the same round's plain time. Only ``ours`` stores anything: the peers
compute per-sample gradients and discard them, as they do in use.

Before timing, each arm's per-sample gradients of one batch are checked against ``torch.func`` in
float64 on the same network (dropout off), and its coverage is counted: the parameter tensors for
which it produced per-sample gradients. A peer that cannot run a model is recorded with the reason.

Usage:
    python benchmarks/peers/capture_cost.py                        # 3 models, 5 arms, 5 rounds
    python benchmarks/peers/capture_cost.py --models mlp --rounds 9
    python benchmarks/peers/capture_cost.py --batches-scale 0.05 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from mstore_lightning import GradientCapture, open_store

DEFAULT_OUT = common.RESULTS / "peers_capture_cost.json"
POLICY = {"layers": ["*"], "precision": "int8", "loss_reduction": "mean"}
ARMS = ("plain", "ours", "opacus", "backpack", "func")
# Default batches per fit, below capture_overhead's (800, 80, 40) so that five arms, the slowest
# about 10x plain, fit in about 8 minutes on 2 cores; a plain fit still takes 1-1.5 s there.
BATCHES = {"mlp": 300, "cnn": 40, "transformer": 20}


# ------------------------------------------------------------------------------------------------ arms
class OpacusClassifier(common.Classifier):
    """``Classifier`` whose network runs inside Opacus's ``GradSampleModule``.

    The wrapping happens in ``configure_model``, inside ``fit``, so its cost is timed. A network
    Opacus rejects (``nn.MultiheadAttention``) is first passed through ``ModuleValidator.fix``, the
    remedy Opacus prescribes (it swaps in ``DPMultiheadAttention``, with the same weights).
    """

    def configure_model(self) -> None:
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        if isinstance(self.net, GradSampleModule):
            return
        net = self.net
        # What Opacus rejects in the network as built, recorded for the report.
        self.replaced = sorted({str(e) for e in ModuleValidator.validate(net, strict=False)})
        if self.replaced:
            net = ModuleValidator.fix(net)
        self.net = GradSampleModule(net, loss_reduction="mean")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Without this Opacus appends each step's per-sample gradients to a growing list.
        self.net.set_grad_sample_to_none()


class BackpackClassifier(common.Classifier):
    """``Classifier`` whose network is ``extend``-ed by BackPACK and backpropagated with ``BatchGrad``."""

    def configure_model(self) -> None:
        from backpack import extend

        extend(self.net)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        from backpack import backpack
        from backpack.extensions import BatchGrad

        with backpack(BatchGrad()):
            loss.backward(*args, **kwargs)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for p in self.parameters():
            if hasattr(p, "grad_batch"):
                del p.grad_batch


class FuncClassifier(common.Classifier):
    """``Classifier`` trained on the mean of ``torch.func`` per-sample gradients (manual optimization)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.randomness = "different" if _has_dropout(net) else "error"

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        grads = common.per_sample_grads(self.net, batch["x"], batch["y"], randomness=self.randomness)
        opt.zero_grad()
        for name, p in self.net.named_parameters():
            p.grad = grads[name].mean(0)  # the mean loss's gradient, as the other arms step on
        opt.step()


@dataclass
class Arm:
    """One way of training, as the harness builds it.

    Attributes:
        name: the arm's key.
        module: ``net -> LightningModule``.
        stores: whether the arm writes its per-sample gradients anywhere.
        what: one line for the JSON.
        callbacks: ``store path -> callbacks`` the arm adds to the ``Trainer``.
    """

    name: str
    module: Callable[[nn.Module], L.LightningModule]
    stores: bool
    what: str
    callbacks: Callable[[Path], list] = field(default=lambda store: [])


ARM_SPECS = {
    "plain": Arm("plain", common.Classifier, False, "Lightning fit, nothing added"),
    "ours": Arm(
        "ours",
        common.Classifier,
        True,
        f"Lightning fit with GradientCapture(policy={POLICY}); writes a Zarr store",
        lambda store: [GradientCapture(store=str(store), policy=POLICY, mode="overwrite")],
    ),
    "opacus": Arm(
        "opacus",
        OpacusClassifier,
        False,
        "GradSampleModule(net); p.grad_sample computed every step, dropped after the step",
    ),
    "backpack": Arm(
        "backpack",
        BackpackClassifier,
        False,
        "extend(net), backward inside backpack(BatchGrad()); p.grad_batch dropped after the step",
    ),
    "func": Arm(
        "func",
        FuncClassifier,
        False,
        "vmap(grad(functional_call)) per-sample gradients; their mean is the step's gradient; dropped",
    ),
}


# --------------------------------------------------------------------------------------------- fitting
def fit_once(
    arm: Arm, model_name: str, data: common.SyntheticData, store: Path
) -> tuple[float, L.LightningModule]:
    """One epoch of ``arm`` on model ``model_name``, from the seeded initial weights.

    Returns:
        Wall seconds of ``trainer.fit`` (the arm's setup, wrapping, hooks and store, included), and the
        trained module.
    """
    module = arm.module(common.build(model_name))
    if arm.stores:
        # Deleting a previous store inside the timed region would bill file-system cleanup to capture.
        shutil.rmtree(store, ignore_errors=True)
    trainer = common.quiet_trainer(arm.callbacks(store), max_epochs=1)
    loader = common.make_loader(data, common.SPECS[model_name].batch_size)
    gc.collect()  # the previous run's garbage must not be collected inside this one
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start, module


# ---------------------------------------------------------------------------------------------- checks
def check_arm(arm: Arm, model_name: str, data: common.SyntheticData, workdir: Path) -> dict[str, Any]:
    """Per-sample gradients of the first batch by ``arm``, against ``torch.func`` in float64.

    Dropout is switched off (``p = 0``) so that both sides see the same network. The reference is
    computed on the very network the arm trains (for Opacus on the transformer, the fixed one).

    Returns:
        ``covered`` / ``total`` parameter tensors and elements, the names not covered, and the largest
        relative error ``max_i ||x_i - r_i|| / ||r_i||`` of sample i's gradient over the covered tensors
        (``max_rel_err``), or
        ``error`` with the reason the arm cannot run the model.
    """
    spec = common.SPECS[model_name]
    batch = data[list(range(spec.batch_size))]
    x, y = batch["x"], batch["y"]
    net = _no_dropout(common.build(model_name))
    try:
        if arm.name == "plain":
            return {"note": "baseline: no per-sample gradients"}
        if arm.name == "ours":
            got, ref_net = _ours_grads(net, x, y, batch, workdir)
        elif arm.name == "opacus":
            from opacus.validators import ModuleValidator

            if not ModuleValidator.is_valid(net):
                net = ModuleValidator.fix(net)
            ref_net = copy.deepcopy(net)  # before Opacus's hooks, which a copy would carry along
            module = OpacusClassifier(net)
            module.configure_model()
            F.cross_entropy(module.net(x), y).backward()
            got = {n: p.grad_sample for n, p in net.named_parameters() if p.grad_sample is not None}
        elif arm.name == "backpack":
            from backpack import backpack, extend
            from backpack.extensions import BatchGrad

            ref_net = copy.deepcopy(net)
            extend(net)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the missing-extension warnings are what we count
                with backpack(BatchGrad()):
                    F.cross_entropy(net(x), y).backward()
            # BatchGrad returns each sample's term of the mean loss: (1/B) of its own gradient.
            got = {n: p.grad_batch * len(y) for n, p in net.named_parameters() if hasattr(p, "grad_batch")}
        else:
            ref_net = copy.deepcopy(net)
            got = common.per_sample_grads(net, x, y)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run the model is a result
        return {"error": _reason(exc)}
    ref = common.per_sample_grads(ref_net.double(), _double(x), y)
    return _compare(got, ref)


def _ours_grads(
    net: nn.Module, x: Tensor, y: Tensor, batch: dict[str, Tensor], workdir: Path
) -> tuple[dict[str, Tensor], nn.Module]:
    """One captured step with the timed policy, read back with ``store.restore``: the first batch's
    rows are captured before the step, at the initial weights."""
    initial = copy.deepcopy(net)
    store = workdir / "check.zarr"
    shutil.rmtree(store, ignore_errors=True)
    trainer = common.quiet_trainer(
        [GradientCapture(store=str(store), policy=POLICY, mode="overwrite")], max_steps=1
    )
    one_batch = common.SyntheticData(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(common.Classifier(net), common.make_loader(one_batch, len(y)))
    reader = open_store(store)
    ids = batch["index"].numpy()
    got = {}
    for layer in reader.layers:
        name = layer.removeprefix("net.")
        for param, g in reader.restore(reader.epochs[-1], layer, ids).items():
            got[f"{name}.{param}" if name else param] = g
    return got, initial


def _compare(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, Any]:
    """Coverage and worst relative error of ``got`` against ``ref`` (both ``{name: (n, *shape)}``)."""
    unknown = sorted(set(got) - set(ref))
    if unknown:
        return {"error": f"per-sample gradients for parameters the network does not have: {unknown}"}
    # Over the covered tensors together: a tensor whose gradient is zero in exact arithmetic (the key
    # bias of attention) has no relative error of its own, only rounding noise.
    err2 = sum((got[n].double() - ref[n]).flatten(1).square().sum(1) for n in got)
    ref2 = sum(ref[n].flatten(1).square().sum(1) for n in got)
    worst = float((err2.sqrt() / ref2.sqrt().clamp_min(1e-300)).max())
    return {
        "covered_tensors": len(got),
        "total_tensors": len(ref),
        "covered_elements": sum(ref[n][0].numel() for n in got),
        "total_elements": sum(r[0].numel() for r in ref.values()),
        "not_covered": sorted(set(ref) - set(got)),
        "max_rel_err": worst,
    }


# -------------------------------------------------------------------------------------------- running
def bench_model(
    model_name: str, arms: list[str], rounds: int, batches_scale: float, workdir: Path
) -> dict[str, Any]:
    """Checks every arm on one batch, warms each up once, then times ``rounds`` interleaved rounds.

    Returns:
        Per arm: what it does, whether it stores, its check, its warm-up warnings, raw times, the
        per-round ratios to plain and their median; arms that cannot run carry ``error`` instead.
    """
    spec = common.SPECS[model_name]
    batches = max(1, round(BATCHES[model_name] * batches_scale))
    data = common.make_data(spec, batches)
    store = workdir / f"{model_name}.zarr"
    result: dict[str, Any] = {
        "description": spec.description,
        "batch_size": spec.batch_size,
        "batches": batches,
        "samples": batches * spec.batch_size,
        "params": sum(p.numel() for p in spec.build().parameters()),
        "arms": {},
    }
    # Warm-ups first: torch warns of some slow paths once per process, and the arm that takes the
    # path, not a check's reference computation, should be the one recorded with the warning.
    live, plain_warnings = [], set()
    for name in ["plain", *[a for a in arms if a != "plain"]]:
        arm = ARM_SPECS[name]
        rec: dict[str, Any] = {"what": arm.what, "stores": arm.stores}
        try:
            (rec["warmup_s"], module), found = _with_warnings(
                lambda arm=arm: fit_once(arm, model_name, data, store)
            )
            if getattr(module, "replaced", None):
                rec["model_changed"] = module.replaced
            if name == "plain":
                plain_warnings = set(found)
            rec["warnings"] = [w for w in found if w not in plain_warnings]  # the arm's own
            live.append(name)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run the model is a result
            rec["error"] = _reason(exc)
        result["arms"][name] = rec
        status = rec["error"] if "error" in rec else f"warm-up {rec['warmup_s']:.2f} s"
        print(f"  {model_name} {name}: {status}", flush=True)
    for name, rec in result["arms"].items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec["check"] = check_arm(ARM_SPECS[name], model_name, data, workdir)

    times: dict[str, list[float]] = {a: [] for a in live}
    store_bytes: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded at warm-up
        for r in range(rounds):
            for name in live:
                times[name].append(fit_once(ARM_SPECS[name], model_name, data, store)[0])
                if ARM_SPECS[name].stores:
                    store_bytes.append(_dir_bytes(store))
            print(
                f"  {model_name} round {r + 1}/{rounds}: "
                + ", ".join(f"{a} {times[a][-1]:.2f} s" for a in live),
                flush=True,
            )
    plain = times["plain"]
    for name in live:
        rec = result["arms"][name]
        ratios = [t / p for t, p in zip(times[name], plain)]
        rec.update(
            times_s=times[name],
            median_s=statistics.median(times[name]),
            ratios=ratios,
            ratio_median=statistics.median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
        )
    if "ours" in live:
        ours = result["arms"]["ours"]
        ours["store_bytes"] = store_bytes
        ours["store_bytes_per_sample"] = statistics.median(store_bytes) / result["samples"]
        ours["store_check"] = common.co.check_store(store, result["samples"])
    shutil.rmtree(store, ignore_errors=True)
    return result


def _with_warnings(run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``run()`` and the distinct warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pattern in common.co._LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        # Every hook-based arm triggers it identically: the inputs do not require grad.
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        out = run()
    return out, list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))


def _no_dropout(net: nn.Module) -> nn.Module:
    """``net`` with every dropout probability set to 0 (the attention's included)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return net


def _has_dropout(net: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())


def _double(x: Tensor) -> Tensor:
    return x.double() if x.is_floating_point() else x


def _reason(exc: BaseException) -> str:
    """``Type: message`` of an exception, with where it was raised, in one line."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------- report
def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model and arm: median time, ratio to plain, coverage, check, whether it stores."""
    header = (
        f"{'model':<12} {'arm':<9} {'median':>8} {'vs plain':>9} {'min-max':>13} {'stores':>7} "
        f"{'per-sample grads of':>22} {'max rel err':>12}"
    )
    lines = [header, "-" * len(header)]
    for model, res in results.items():
        for name, rec in res["arms"].items():
            head = f"{model:<12} {name:<9}"
            if "error" in rec:
                lines.append(f"{head} cannot run: {rec['error']}")
                continue
            chk = rec.get("check", {})
            cover = (
                f"{chk['covered_tensors']}/{chk['total_tensors']} tensors"
                + (f" ({chk['covered_elements'] / chk['total_elements']:.0%})" if chk["not_covered"] else "")
                if "covered_tensors" in chk
                else "-"
            )
            err = f"{chk['max_rel_err']:.1e}" if "max_rel_err" in chk else "-"
            spread = f"{rec['ratio_min']:.2f}-{rec['ratio_max']:.2f}x"
            lines.append(
                f"{head} {rec['median_s']:>7.2f}s {rec['ratio_median']:>8.2f}x {spread:>13} "
                f"{'yes' if rec['stores'] else 'no':>7} {cover:>22} {err:>12}"
            )
    return "\n".join(lines)


def notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """What a reader must know beside the table: uncovered parameters, stores, changes, warnings."""
    out = []
    for model, res in results.items():
        for name, rec in res["arms"].items():
            chk = rec.get("check", {})
            if "error" in chk and "error" not in rec:
                out.append(f"{model} {name}: the per-sample gradient check failed: {chk['error']}")
            if chk.get("not_covered"):
                out.append(f"{model} {name}: no per-sample gradients for {_compact(chk['not_covered'])}")
            for change in rec.get("model_changed", []):
                out.append(f"{model} {name}: trains a changed network; Opacus says: {change[:160]}")
            if name == "ours" and "store_bytes_per_sample" in rec:
                store = rec["store_check"]
                ok = "error" not in store and store.get("ids_ok")
                out.append(
                    f"{model} ours: store {rec['store_bytes_per_sample']:,.0f} B/sample, "
                    f"read back {'ok' if ok else 'FAILED: ' + str(store)}"
                )
            for message in rec.get("warnings", []):
                out.append(f"{model} {name} warned: {message[:150]}")
    return out


def _compact(names: list[str]) -> str:
    """Parameter names with layer numbers folded: ``encoder.layers.*.norm1.weight``."""
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line; ``--models`` and ``--arms`` become lists."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default=",".join(BATCHES), help=f"comma-separated subset of {list(BATCHES)}"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model")
    parser.add_argument(
        "--batches-scale", type=float, default=1.0, help="multiply each model's batches per fit"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.models or set(args.models) - set(BATCHES):
        parser.error(f"--models takes a comma-separated subset of {list(BATCHES)}; got {args.models}")
    if not args.arms or set(args.arms) - set(ARMS):
        parser.error(f"--arms takes a comma-separated subset of {list(ARMS)}; got {args.arms}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    if args.batches_scale <= 0:
        parser.error(f"--batches-scale must be > 0; got {args.batches_scale}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes the JSON report; 0 once it is written."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report = common.report_header("peers_capture_cost", {k: v for k, v in vars(args).items() if k != "out"})
    m = report["machine"]
    print(
        f"{m['cpu_model']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, load {m['load_average']}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="mstore-peers-") as tmp:
        for model in args.models:
            print(f"{model}: {common.SPECS[model].description}", flush=True)
            results[model] = bench_model(model, args.arms, args.rounds, args.batches_scale, Path(tmp))
    print()
    print(format_table(results))
    for line in notes(results):
        print(f"  {line}")
    report.update(
        harness=(
            "every arm is a Lightning Trainer.fit of capture_overhead.Classifier (SGD lr 0.01, one epoch, "
            "unshuffled whole-batch loader, no logger or checkpointing); peers run inside it as a wrapped "
            "module (opacus), a backward override (backpack) or a manual optimization step (func), so "
            "Lightning's fixed cost is the same in every arm and in the baseline"
        ),
        order="rounds of " + ", ".join(["plain", *[a for a in args.arms if a != "plain"]]),
        ratio="median over rounds of (arm time / the same round's plain time)",
        stores={a: ARM_SPECS[a].stores for a in args.arms},
        policy=POLICY,
        machine_end=common.machine_info(),
        models=results,
    )
    common.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
