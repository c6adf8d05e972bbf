"""Each layer's form is routed by its measured cost: the time to form and encode it, plus its bytes at
the writer's rate, within the byte budget; and the fastest way to form full gradients is kept."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mstore_lightning.capture import layers as layers_mod
from mstore_lightning.capture.hooks import HookManager
from mstore_lightning.capture.layers import select_layers
from mstore_lightning.config import CapturePolicy
from mstore_lightning.facade.describe import explain_costs


def first_batch(layer: nn.Module, x: torch.Tensor):
    model = nn.Sequential(layer)
    plans, _ = select_layers(model, CapturePolicy(layers=["0"]))
    hooks = HookManager()
    hooks.attach(plans)
    hooks.active = True
    model(x).square().sum().backward()
    uses = hooks.take()["0"]
    hooks.detach()
    return plans["0"], uses


def conv_batch():
    # Full gradients (896 numbers) are far smaller than the factors (3,072 + 32,768).
    return first_batch(nn.Conv2d(3, 32, 3, padding=1), torch.randn(8, 3, 32, 32))


@pytest.fixture
def fixed_times(monkeypatch):
    """Forming times by method, in seconds, in place of timing them."""
    times = {}

    def timed(fn, device, repeats=2, limit=math.inf):
        return times[fn.__defaults__[0]]

    monkeypatch.setattr(layers_mod, "_timed", timed)
    return times


def test_the_least_total_of_forming_and_writing_is_kept(fixed_times):
    plan, uses = conv_batch()
    fixed_times.update(factors=0.001, restore=0.050, grouped_conv=0.020)
    # Writes nearly free: the factors, cheaper to form though 40x larger, win.
    plan.finalize(uses, CapturePolicy(precision="int8"), write_rate=1e15)
    assert plan.representation == "factors"
    measured = plan.choice["measured"]
    assert measured["factors"]["total_ms"] == pytest.approx(1.0, abs=1e-3)
    assert measured["full"]["form_ms_grouped_conv"] == 20 and measured["full"]["form_ms_restore"] == 50
    assert plan.full_method == "grouped_conv"  # the faster way, had full been kept
    assert plan.choice["reason"].startswith("least measured cost")

    # At 100 MB/s the factors' 8 x 35,840 bytes cost 2.9 ms to write; full gradients 0.07 ms.
    plan, uses = conv_batch()
    fixed_times.update(factors=0.001, restore=0.002, grouped_conv=0.0015)
    plan.finalize(uses, CapturePolicy(precision="int8"), write_rate=1e8)
    assert plan.representation == "full" and plan.full_method == "grouped_conv"
    measured, considered = plan.choice["measured"], plan.choice["considered"]
    write_ms = {k: 1e3 * considered[k]["bytes"] * 8 / 1e8 for k in ("full", "factors")}
    assert measured["full"]["total_ms"] == pytest.approx(1.5 + write_ms["full"], abs=1e-3)
    # Smallest first: the factors' writes alone cost more than the full gradients' total.
    assert write_ms["factors"] > measured["full"]["total_ms"]
    assert measured["factors"] == {
        "write_ms": pytest.approx(write_ms["factors"], abs=1e-3),
        "skipped": "writes cost more",
    }
    assert "grouped_conv 1.5 ms" in explain_costs(plan.choice["measured"])


def test_the_byte_budget_bounds_what_is_timed(fixed_times):
    plan, uses = conv_batch()
    fixed_times.update(factors=0.0, restore=1.0, grouped_conv=1.0)
    policy = CapturePolicy(precision="int8", budget={"layer_bytes_per_sample": 2000})
    plan.finalize(uses, policy, write_rate=1e15)
    assert plan.representation == "full" and set(plan.choice["measured"]) == {"write_mb_per_s", "full"}


def test_forced_forms_a_stored_layer_and_distributed_runs_keep_the_size_rule(fixed_times):
    fixed_times.update(factors=0.0, restore=1.0, grouped_conv=2.0)
    plan, uses = conv_batch()
    plan.finalize(uses, CapturePolicy(precision="int8", representation="full"), write_rate=1e15)
    assert plan.representation == "full" and plan.full_method == "restore"
    plan, uses = conv_batch()
    plan.finalize(uses, CapturePolicy(precision="int8"), write_rate=1e15, follow="full")
    assert plan.representation == "full" and "store holds" in plan.choice["reason"]
    plan, uses = conv_batch()
    plan.finalize(uses, CapturePolicy(precision="int8"), write_rate=None)  # processes must agree
    assert plan.representation == "full" and plan.choice["reason"].startswith("smallest exact form")


def test_real_timings_are_recorded_and_the_kept_form_has_the_least_total():
    plan, uses = conv_batch()
    plan.finalize(uses, CapturePolicy(precision="int8"), write_rate=2e8)
    measured = plan.choice["measured"]
    assert {"factors", "full"} <= set(measured) and measured["write_mb_per_s"] == 200
    totals = {k: v.get("total_ms", math.inf) for k, v in measured.items() if isinstance(v, dict)}
    smaller = min(("factors", "full"), key=lambda k: plan.choice["considered"][k]["bytes"])
    # The least total is kept only when it beats the smaller form by the margin; else the smaller.
    wins = min(totals.values()) * layers_mod.ROUTE_MARGIN < totals[smaller]
    assert plan.representation == (min(totals, key=totals.get) if wins else smaller)
    forms = {k: v for k, v in measured["full"].items() if k.startswith("form_ms_")}
    assert plan.full_method == min(forms, key=forms.get).removeprefix("form_ms_")
    assert measured["full"]["write_ms"] == pytest.approx(
        1e3 * plan.choice["considered"]["full"]["bytes"] * 8 / 2e8, abs=1e-3
    )


def test_a_form_whose_writes_alone_cost_more_is_never_formed(monkeypatch):
    formed = []

    def timed(fn, device, repeats=2, limit=math.inf):
        formed.append(fn.__defaults__[0])
        return 0.001

    monkeypatch.setattr(layers_mod, "_timed", timed)
    # A wide linear layer: its full gradient (256 x 512) would take long to form, and 64 of them
    # at 100 MB/s take 84 ms to write, more than the factors' whole cost.
    plan, uses = first_batch(nn.Linear(512, 256), torch.randn(64, 512))
    plan.finalize(uses, CapturePolicy(precision="int8"), write_rate=1e8)
    assert plan.representation == "factors" and formed == ["factors"]
    full_bytes = plan.choice["considered"]["full"]["bytes"]  # weight and bias codes, and scales
    assert plan.choice["measured"]["full"] == {
        "write_ms": pytest.approx(1e3 * full_bytes * 64 / 1e8, abs=1e-3),
        "skipped": "writes cost more",
    }
    assert "more than the cheaper form" in explain_costs(plan.choice["measured"])
