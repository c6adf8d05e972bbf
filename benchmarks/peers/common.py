"""What the peer benchmarks share: the models, the machine and versions, exact per-sample gradients.

The models, their synthetic data and the Lightning module are those of ``benchmarks/capture_overhead.py``,
so a number here and a number there are measured on the same work. The scripts of this folder run as
``python benchmarks/peers/<script>.py`` and import this module by name.

Example::

    import common

    spec = common.SPECS["mlp"]
    net = common.build("mlp")
    grads = common.per_sample_grads(net, x, y)   # {param name: (n, *shape)}
    print(common.machine_info(), common.versions())
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

BENCHMARKS = Path(__file__).resolve().parent.parent
RESULTS = BENCHMARKS / "results"
REPO = BENCHMARKS.parent

# capture_overhead is a script beside this folder, not a package. Appended, not prepended: this
# folder's storage.py must keep its name over benchmarks/storage.py.
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))
import capture_overhead as co

SPECS = co.SPECS  # name -> ModelSpec: build, make_inputs, batch_size, batches
Classifier = co.Classifier  # cross-entropy on batch["x"], batch["y"]; SGD lr 0.01
SyntheticData = co.SyntheticData
make_data = co.make_data
make_loader = co.make_loader
MODEL_SEED = co.MODEL_SEED
DATA_SEED = co.DATA_SEED

# Every distribution whose version a peer result depends on; absent ones are reported as such.
PACKAGES = (
    "torch",
    "lightning",
    "numpy",
    "zarr",
    "numcodecs",
    "mstore-lightning",
    "opacus",
    "backpack-for-pytorch",
    "unfoldNd",
    "einops",
    "captum",
    "dattri",
    "cleanlab",
    "mnist1d",
    "scikit-learn",
    "scipy",
)


def build(name: str) -> nn.Module:
    """A freshly initialised network of model ``name`` (``mlp``, ``cnn``, ``transformer``), seeded with
    ``MODEL_SEED`` so every arm starts from the same weights."""
    if name not in SPECS:
        raise KeyError(f"unknown model {name!r}; choose one of {list(SPECS)}")
    torch.manual_seed(MODEL_SEED)
    return SPECS[name].build()


def quiet_trainer(callbacks: list[L.Callback], **limits: Any) -> L.Trainer:
    """A CPU trainer without logger, Lightning checkpoints, progress bar or summary.

    ``limits`` are further ``Trainer`` arguments, such as ``max_epochs=3`` or ``max_steps=1``.
    """
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **limits,
    )


def load_benchmark(name: str) -> ModuleType:
    """Imports ``benchmarks/<name>.py`` under the module name ``bench_<name>``.

    ``benchmarks/peers/storage.py`` shadows ``benchmarks/storage.py`` on ``sys.path``; loading by path
    reaches the project's own script without the clash.
    """
    return _load_file(f"bench_{name}", BENCHMARKS / f"{name}.py")


def load_peer_script(name: str) -> ModuleType:
    """Imports ``benchmarks/peers/<name>.py`` as ``peers_<name>``, which cannot clash with
    ``benchmarks/<name>.py``."""
    return _load_file(f"peers_{name}", BENCHMARKS / "peers" / f"{name}.py")


def _load_file(module_name: str, path: Path) -> ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- exact gradients
def per_sample_grads(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    randomness: str = "error",
) -> dict[str, Tensor]:
    """Per-sample gradients of each sample's own cross-entropy loss, by ``torch.func``.

    ``vmap(grad(...))`` of ``functional_call``: the reference every other method is checked against.
    Gradients come in the parameters' dtype, so a ``net.double()`` gives float64 ones.

    Args:
        net: the network; its parameters are read, not changed.
        x: inputs, samples along dim 0.
        y: int64 labels.
        randomness: ``vmap``'s randomness mode; ``"different"`` for a network with active dropout.

    Returns:
        ``{parameter name: tensor of shape (n, *param.shape)}``.
    """
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def loss_one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(net, (p, b), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, None, 0, 0), randomness=randomness)(params, buffers, x, y)


# ------------------------------------------------------------------------------------ the machine
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or what ``platform`` knows elsewhere."""
    return co.cpu_model()


def machine_info() -> dict[str, Any]:
    """CPU model, ``os.cpu_count()``, torch threads, OS, Python and the load average now."""
    info = co.machine_info()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    return info


def versions() -> dict[str, str]:
    """The installed version of every package in :data:`PACKAGES` (``"not installed"`` if absent)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def library_digest() -> str:
    """SHA-256 over the library's Python sources: names the exact code measured, committed or not."""
    return co.library_digest()


def git_info() -> dict[str, Any]:
    """The checkout's commit and whether the library or the benchmarks differ from it."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain", "--", "mstore_lightning", "benchmarks").strip()),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def report_header(benchmark: str, args: dict[str, Any]) -> dict[str, Any]:
    """The fields every peer result file starts with: what ran, when, where, on which versions."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": args,
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
        "mstore_lightning_sources_sha256": library_digest(),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Writes a result file, creating its folder, and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, paths: what ``json`` cannot write by itself."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
