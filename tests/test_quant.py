"""Quantized storage: round-trip error bounds, and the bounds on restored gradients, norms and dot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from mstore_lightning.store import quant

SETTINGS = settings(max_examples=60, deadline=None)


def round_trip(spec: dict, x: torch.Tensor) -> torch.Tensor:
    parts = {k: v.numpy() for k, v in quant.encode(spec, "a", x).items()}
    assert set(parts) == set(spec["parts"])
    for k, v in parts.items():
        assert list(v.shape[1:]) == spec["parts"][k]["row_shape"] and str(v.dtype) == spec["parts"][k]["dtype"]
    return quant.decode(spec, "a", parts)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    n=st.integers(1, 4),
    exponent=st.integers(-30, 30),
    heavy_tailed=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_int8_error_is_within_half_a_step_and_crest_factor_bound(shape, n, exponent, heavy_tailed, seed):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent
    if heavy_tailed:
        x = x**3
    spec = quant.array_spec("a", shape, "int8")
    lead = spec["scale_axes"]
    assert math.prod(shape[lead:]) >= quant.GROUP_MIN or lead == 0
    groups = x.reshape(n, *shape[:lead], -1).double()
    err = (round_trip(spec, x).double().reshape(groups.shape) - groups)
    amax = groups.abs().amax(-1)
    slack = 1 + 1e-4  # float32 arithmetic in encode and decode
    assert (err.abs().amax(-1) <= amax / 254 * slack).all()
    norm = groups.norm(dim=-1)
    kappa = amax / (norm / math.sqrt(groups.shape[-1]))
    live = norm > 0
    assert (err.norm(dim=-1)[live] <= (kappa / 254 * norm * slack)[live]).all()


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    precision=st.sampled_from(["fp32", "fp16", "bf16"]),
    seed=st.integers(0, 2**31),
)
def test_float_precisions_round_to_nearest(shape, precision, seed):
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    bits, subnormal_step = {"fp32": (24, 2.0**-149), "fp16": (11, 2.0**-24), "bf16": (8, 2.0**-133)}[precision]
    got = round_trip(quant.array_spec("a", shape, precision), x)
    assert ((got - x).abs() <= torch.clamp_min(x.abs() * 2.0**-bits, subnormal_step / 2)).all()


def test_ids_are_kept_exactly_whatever_the_precision():
    spec = quant.array_spec("a", [1, 5], "int8", index=True)
    ids = torch.randint(0, 2**40, (3, 1, 5))
    assert spec["encoding"] == "int64" and torch.equal(round_trip(spec, ids), ids)


class ConvSeqNet(nn.Module):
    """A conv layer, a linear layer over sequence positions, and two plain linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.seq = nn.Linear(64, 96)  # applied to 32 positions (channels) of 64 pixels
        self.fc1 = nn.Linear(96, 80)
        self.fc2 = nn.Linear(80, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2)  # (n, 32, 64)
        h = torch.relu(self.seq(h)).mean(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """One training run captured twice, lossless and at int8, with the torch.func reference."""
    path = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 16, 8, 8, generator=g), torch.randint(0, 5, (48,), generator=g)
    ref = Reference()
    caps = [
        GradientCapture(path / "fp32.zarr", policy=EXACT),
        GradientCapture(path / "int8.zarr", policy={"precision": "int8"}),
    ]
    trainer([ref, *caps], max_epochs=2).fit(Task(ConvSeqNet()), loader(x, y, batch_size=16))
    return open_store(path / "fp32.zarr"), open_store(path / "int8.zarr"), ref


def test_int8_is_the_default_and_is_recorded():
    assert GradientCapture("unused.zarr").policy.precision == "int8"


def test_int8_restored_gradients_have_median_cosine_at_least_0999(int8_run):
    _, store, ref = int8_run
    for epoch in store.epochs:
        ids = store.sample_ids(epoch).tolist()
        for layer in store.layers:
            spec = store.layer_spec(layer)
            assert spec["representation"] == "factors" and spec["arrays"]["d"]["encoding"] == "int8"
            got = torch.cat([g.flatten(1) for g in store.restore(epoch, layer, ids).values()], 1)
            want = torch.cat([ref.stacked(epoch, ids, f"{layer}.{p}").flatten(1) for p in ("weight", "bias")], 1)
            cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=1)
            assert cos.median() >= 0.999, (layer, cos.median())


def crest_error(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """The int8 relative-error bound ``κ/254`` of each row (one group per row here)."""
    flat = x.flatten(1).double()
    assert spec["scale_axes"] <= 1 and x.shape[1] == 1  # one use: one group per row
    rms = flat.norm(dim=1) / math.sqrt(flat.shape[1])
    return flat.abs().amax(1) / rms.clamp_min(1e-300) / 254


def test_int8_linear_gradients_norms_and_dot_stay_within_the_documented_bounds(int8_run):
    exact, store, ref = int8_run
    for epoch in store.epochs:
        ids = store.sample_ids(epoch).tolist()
        for layer in ("net.fc1", "net.fc2"):
            f = exact.factors(epoch, layer, ids)
            spec = store.layer_spec(layer)["arrays"]
            ea, ed = crest_error(f["a"], spec["a"]), crest_error(f["d"], spec["d"])
            eps = ea + ed + ea * ed
            got = torch.cat([g.flatten(1) for g in store.restore(epoch, layer, ids).values()], 1).double()
            want = torch.cat([ref.stacked(epoch, ids, f"{layer}.{p}").flatten(1) for p in ("weight", "bias")], 1)
            want = want.double()
            norm = want.norm(dim=1)
            slack = 1e-5 * norm  # float32 rounding of the reference itself
            assert ((got - want).norm(dim=1) <= eps * norm + slack).all()
            norms = torch.from_numpy(store.norms(epoch, layers=[layer]))
            assert ((norms - norm).abs() <= eps * norm + slack).all()
            dot = torch.from_numpy(store.dot(epoch, ids, ids, layers=[layer]))
            got_norm = got.norm(dim=1)
            bound = eps[:, None] * norm[:, None] * got_norm[None, :] + eps[None, :] * norm[None, :] * norm[:, None]
            assert ((dot - want @ want.T).abs() <= bound + 1e-5 * norm[:, None] * norm[None, :]).all()


def test_int8_store_is_smaller_than_fp32(int8_run):
    exact, store, _ = int8_run
    for layer in ("net.conv", "net.seq", "net.fc1"):  # net.fc2's few bytes are mostly array metadata
        assert store.nbytes_stored(layer=layer) < 0.5 * exact.nbytes_stored(layer=layer)
