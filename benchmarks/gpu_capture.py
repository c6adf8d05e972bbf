"""Capture cost on a CUDA device, with a check that no captured step synchronizes it.

Two models, each trained with and without capture in a plain SGD loop driving the library's
:class:`~mstore_lightning.capture.recorder.Recorder` (the code :class:`~mstore_lightning.GradientCapture`
runs in each Lightning hook), alternating plain and capture arms (A B A B, medians):

- ``resnet18_gn``: ResNet-18's layout (BasicBlocks 2-2-2-2, 64-512 channels) with GroupNorm, 32x32
  images, batch 128, int8 of every layer, the exact form per layer measured at the first batch;
- ``gpt2_small``: GPT-2 small's shape (12 blocks, d=768, 12 heads, vocabulary 50,257) at T=512,
  batch 8, with a per-layer byte budget, so the large linear layers store seeded projections.

Every captured step after the first runs under ``torch.cuda.set_sync_debug_mode("error")``: a step
that synchronizes the device (``.item()``, ``.cpu()``, a blocking copy) fails the run. The first step
is left out: it measures each layer's forms once, by design. Then the tests marked ``cuda`` run.

Usage (about 3 minutes on one H100):
    python benchmarks/gpu_capture.py                       # writes results/gpu_capture_<commit>.json
    python benchmarks/gpu_capture.py --device cpu --quick  # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstore_lightning import CapturePolicy, open_store
from mstore_lightning.capture.recorder import Recorder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.10
LR = 0.01


# ---------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    """ResNet's BasicBlock with GroupNorm (per sample, so per-sample gradients stay exact)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, c_out)
        self.skip = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(32, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(y)) + self.skip(x))


def resnet18_gn(width: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(32, width), nn.ReLU()]
    c = width
    for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
        layers += [Block(c, c_out, 1 if i == 0 else 2), Block(c_out, c_out, 1)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2's layout: token and position embeddings, pre-norm blocks, a final norm and the head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, length: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(GPTBlock(d, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln(self.blocks(self.wte(tokens) + self.wpe(pos))))


def model_specs(quick: bool) -> dict[str, dict[str, Any]]:
    """Each model's builder, batch maker, per-sample loss and capture policy."""
    d, layers, heads, vocab, length = (64, 2, 4, 512, 32) if quick else (768, 12, 12, 50257, 512)

    def images(g: torch.Generator, device: str) -> dict[str, torch.Tensor]:
        n = 16 if quick else 128
        return {
            "x": torch.randn(n, 3, 32, 32, generator=g).to(device),
            "y": torch.randint(0, 10, (n,), generator=g).to(device),
        }

    def tokens(g: torch.Generator, device: str) -> dict[str, torch.Tensor]:
        n = 2 if quick else 8
        t = torch.randint(0, vocab, (n, length + 1), generator=g).to(device)
        return {"x": t[:, :-1], "y": t[:, 1:]}

    def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.dim() == 3:  # a sequence: each sample's loss is its mean token loss
            return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(dim=1)
        return F.cross_entropy(out, y, reduction="none")

    return {
        "resnet18_gn": {
            "build": lambda: resnet18_gn(32 if quick else 64),
            "batch": images,
            "loss": ce,
            "policy": {"layers": ["*"], "precision": "int8"},
        },
        "gpt2_small": {
            "build": lambda: GPT(vocab, d, layers, heads, length),
            "batch": tokens,
            "loss": ce,
            # Per layer: the big linears keep a seeded projection of about 16 KiB a sample.
            "policy": {"layers": ["*"], "precision": "int8", "budget": {"bytes_per_sample": 16384}},
        },
    }


# ---------------------------------------------------------------------------------------------- runs
@contextlib.contextmanager
def no_sync(device: str) -> Iterator[None]:
    """Any device synchronization in the block raises (CUDA only)."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run_arm(spec: dict[str, Any], steps: int, device: str, store: Path | None) -> dict[str, Any]:
    """Trains ``steps`` steps (plus one warm-up) and returns the seconds a step, device time included."""
    torch.manual_seed(0)
    model = spec["build"]().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [spec["batch"](g, device) for _ in range(4)]
    for i, b in enumerate(data):
        b["index"] = torch.arange(i * len(b["x"]), (i + 1) * len(b["x"]), device=device)
    recorder = None
    if store is not None:
        recorder = Recorder(str(store), CapturePolicy(**spec["policy"]), labels=lambda b: None)
        recorder.plan(model, max_epochs=1)
        recorder.start()
        recorder.open(recorder.run_meta(type(model).__name__), resume=False)
        recorder.begin_epoch(0, lr_groups=[[LR]])

    def step(i: int) -> None:
        batch = data[i % len(data)]
        if recorder is not None:
            planned, _ = recorder.plan_step({"index": batch["index"] + i * 10_000}, i)
            recorder.begin_step(planned)
        opt.zero_grad(set_to_none=True)
        losses = spec["loss"](model(batch["x"]), batch["y"])
        losses.mean().backward()
        if recorder is not None:
            recorder.record_backward(accumulation=1, global_step=i, lr=LR)
            recorder.end_step(losses.detach(), batch)
        opt.step()

    step(0)  # warm-up: kernels chosen, and the capture's forms measured
    sync(device)
    t0 = time.perf_counter()
    with no_sync(device) if recorder is not None else contextlib.nullcontext():
        for i in range(1, steps + 1):
            step(i)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    out: dict[str, Any] = {"s_per_step": seconds}
    if recorder is not None:
        t1 = time.perf_counter()
        recorder.finish_epoch(model, global_step=steps + 1)
        out["finish_s"] = time.perf_counter() - t1
        out["writer_wait_s"] = recorder.writer.wait_seconds if recorder.writer else None
        recorder.detach()
        recorder.close()
        s = open_store(store)
        samples = len(s.sample_ids(0))
        out["bytes_per_sample"] = dir_bytes(store) / max(samples, 1)
        out["forms"] = {layer: s.layer_spec(layer).get("representation") for layer in s.layers}
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench(name: str, spec: dict[str, Any], pairs: int, steps: int, device: str, work: Path) -> dict[str, Any]:
    plain, captured, last = [], [], {}
    for p in range(pairs):
        plain.append(run_arm(spec, steps, device, None)["s_per_step"])
        store = work / f"{name}_{p}.zarr"
        last = run_arm(spec, steps, device, store)
        captured.append(last["s_per_step"])
        shutil.rmtree(store, ignore_errors=True)
        print(
            f"  {name} pair {p + 1}: plain {plain[-1] * 1e3:.1f} ms, capture {captured[-1] * 1e3:.1f} ms",
            flush=True,
        )
    ratio = statistics.median(captured) / statistics.median(plain)
    return {
        "plain_ms_per_step": [s * 1e3 for s in plain],
        "capture_ms_per_step": [s * 1e3 for s in captured],
        "ratio": ratio,
        "bytes_per_sample": last.get("bytes_per_sample"),
        "writer_wait_s": last.get("writer_wait_s"),
        "forms": last.get("forms"),
        "no_step_synchronized": device == "cuda",  # a synchronizing step raises under the debug mode
    }


def cuda_tests() -> dict[str, Any]:
    """Runs the tests marked ``cuda``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,  # its exit code is reported
    )
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    return {"exit_code": proc.returncode, "summary": tail[0]}


def commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny models: checks the script, measures nothing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in model_specs(args.quick).items():
            results[name] = bench(name, spec, args.pairs, args.steps, args.device, Path(tmp))
    tests = cuda_tests() if args.device == "cuda" else None
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "benchmark": "gpu_capture",
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "quick": args.quick,
        "pairs": args.pairs,
        "steps": args.steps,
        "target": TARGET,
        "models": results,
        "cuda_tests": tests,
    }
    print(f"\n{'model':<14}{'plain ms':>10}{'capture ms':>12}{'ratio':>8}{'B/sample':>12}   device: {device}")
    for name, r in results.items():
        print(
            f"{name:<14}{statistics.median(r['plain_ms_per_step']):>10.1f}"
            f"{statistics.median(r['capture_ms_per_step']):>12.1f}{r['ratio']:>7.2f}x"
            f"{(r['bytes_per_sample'] or math.nan):>12,.0f}"
        )
    if tests is not None:
        print(f"tests marked cuda: {tests['summary']} (exit {tests['exit_code']})")
    out = args.out or (
        RESULTS / f"gpu_capture_{report['commit']}.json"
        if args.device == "cuda" and not args.quick
        else Path(tempfile.gettempdir()) / "gpu_capture.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if tests is None or tests["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
