"""Every extractor against torch.func per-sample gradients, over hypothesis-drawn shapes.

Each case runs a real forward and backward through the capture hooks, builds the stored rows, and
checks ``restore``, ``sqnorm`` and ``gram`` (on the factors) against an independent reference.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from torch import nn
from torch.func import functional_call, grad, vmap

from mstore_lightning.core.families.gpt2_conv1d import is_transposed_conv1d
from mstore_lightning.core import quant, tensor_codes
from mstore_lightning.core.families.kron import int_matmul as kron_int_matmul
from mstore_lightning.core.families.kron import kron_sqnorm
from mstore_lightning.core.families.linear import LinearExtractor
from mstore_lightning.core.tensor_codes import Coded
from mstore_lightning.capture.hooks import HookManager
from mstore_lightning.capture.layers import select_layers
from mstore_lightning.config import CapturePolicy

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ATOL, RTOL = 1e-5, 1e-4


class Conv1D(nn.Module):
    """GPT-2's transposed-weight linear layer, written here so tests need no transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Wrap(nn.Module):
    """Calls ``layer`` ``uses`` times and sums the results, so multi-use layers are covered too."""

    def __init__(self, layer: nn.Module, uses: int = 1) -> None:
        super().__init__()
        self.layer, self.uses = layer, uses

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return sum(self.layer(x) for x in xs[: self.uses])


def check_layer(layer: nn.Module, inputs: list[torch.Tensor], representation: str = "auto") -> str:
    """Captures ``layer`` on ``inputs`` (one per use) and compares with torch.func; returns the representation."""
    torch.manual_seed(1)
    model = Wrap(layer, len(inputs))
    out_shape = model(*inputs).shape
    weights = torch.randn(out_shape[1:])  # each sample's loss is a fixed random functional of its output

    def losses(out: torch.Tensor) -> torch.Tensor:
        return (out * weights).reshape(out.shape[0], -1).sum(1)

    plans, uncovered = select_layers(model, CapturePolicy(layers=["layer"]))
    assert not uncovered, uncovered
    plan = plans["layer"]
    hooks = HookManager()
    hooks.attach(plans)
    hooks.active = True
    losses(model(*inputs)).sum().backward()
    uses = hooks.take()["layer"]
    hooks.detach()
    assert len(uses) == len(inputs)
    plan.finalize(uses, CapturePolicy(precision="fp32", representation=representation))
    rows = plan.rows(uses, 1.0)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict, *xi: torch.Tensor) -> torch.Tensor:
        return losses(functional_call(model, p, tuple(x.unsqueeze(0) for x in xi))).sum()

    ref = vmap(grad(loss_one), in_dims=(None, *[0] * len(inputs)))(params, *inputs)
    ref = {k.split(".", 1)[1]: v for k, v in ref.items()}

    ext, hyper = plan.extractor, plan.hyper
    got = ext.restore(hyper, plan.params, rows) if plan.representation == "factors" else rows
    assert set(got) == set(plan.params) == set(ref)
    for p in plan.params:
        torch.testing.assert_close(got[p], ref[p], atol=ATOL, rtol=RTOL)
    if plan.representation == "full":  # every way the capture may form them, whichever it timed faster
        assert plan.full_method in ext.full_methods
        for method in ext.full_methods:
            plan.full_method = method
            formed = plan.rows(uses, 1.0)
            for p in plan.params:
                torch.testing.assert_close(formed[p], ref[p], atol=ATOL, rtol=RTOL)
    flat_ref = torch.cat([ref[p].reshape(ref[p].shape[0], -1) for p in plan.params], 1).double()
    if plan.representation == "factors":
        torch.testing.assert_close(
            ext.sqnorm(hyper, plan.params, rows).double(), flat_ref.pow(2).sum(1), atol=ATOL, rtol=RTOL
        )
        half = max(1, flat_ref.shape[0] // 2)
        x = {k: v[:half] for k, v in rows.items()}
        assert_inner_products_close(ext.gram(hyper, plan.params, x, rows), flat_ref[:half], flat_ref)
    return plan.representation


def assert_inner_products_close(got: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """``got ≈ x @ y.T``. A float32 inner product errs by about eps·‖x‖‖y‖ however small it is (terms
    cancel), so each entry's bound scales with its two norms rather than with the result."""
    ref = x @ y.T
    bound = ATOL + RTOL * x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), (
        f"worst excess {float((err - bound).max()):.3g}; got {got}, expected {ref}"
    )


batch = st.integers(1, 5)
rep = st.sampled_from(["auto", "factors", "full"])


@SETTINGS
@given(
    b=batch,
    lead=st.lists(st.integers(1, 3), max_size=2),
    i=st.integers(1, 7),
    o=st.integers(1, 7),
    bias=st.booleans(),
    uses=st.integers(1, 2),
    rep=rep,
)
def test_linear_any_leading_dims(b, lead, i, o, bias, uses, rep):
    layer = nn.Linear(i, o, bias=bias)
    check_layer(layer, [torch.randn(b, *lead, i) for _ in range(uses)], rep)


@SETTINGS
@given(b=batch, t=st.integers(1, 4), nx=st.integers(1, 6), nf=st.integers(1, 6), rep=rep)
def test_transposed_conv1d(b, t, nx, nf, rep):
    layer = Conv1D(nf, nx)
    assert is_transposed_conv1d(layer)
    check_layer(layer, [torch.randn(b, t, nx)], rep)


@st.composite
def conv_case(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k = [draw(st.integers(1, 3)) for _ in range(nd)]
    dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    padding = draw(st.sampled_from(["int", "same", "valid", "tuple"]))
    stride = [1] * nd if padding == "same" else [draw(st.integers(1, 2)) for _ in range(nd)]
    pad = {
        "int": draw(st.integers(0, 2)),
        "same": "same",
        "valid": "valid",
        "tuple": tuple(draw(st.integers(0, 2)) for _ in range(nd)),
    }[padding]
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad_amt = [2 if isinstance(pad, int) else 0 for _ in range(nd)]
    if isinstance(pad, tuple):
        pad_amt = list(pad)
    elif pad == "same":
        pad_amt = [d * (kk - 1) for d, kk in zip(dil, k)]
    size = [
        max(d * (kk - 1) + 1, p + 1) + draw(st.integers(0, 2 if nd < 3 else 1))
        for d, kk, p in zip(dil, k, pad_amt)
    ]
    return nd, groups, cin, cout, k, dil, stride, pad, mode, size


@SETTINGS
@given(case=conv_case(), b=st.integers(1, 3), bias=st.booleans(), rep=rep)
def test_conv_nd(case, b, bias, rep):
    nd, groups, cin, cout, k, dil, stride, pad, mode, size = case
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    layer = cls(
        cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias, padding_mode=mode
    )
    check_layer(layer, [torch.randn(b, cin, *size)], rep)


@SETTINGS
@given(
    b=batch,
    t=st.integers(1, 6),
    v=st.integers(2, 9),
    e=st.integers(1, 5),
    pad=st.booleans(),
    uses=st.integers(1, 2),
    rep=rep,
)
def test_embedding(b, t, v, e, pad, uses, rep):
    layer = nn.Embedding(v, e, padding_idx=0 if pad else None)
    check_layer(layer, [torch.randint(0, v, (b, t)) for _ in range(uses)], rep)


@SETTINGS
@given(
    b=batch,
    g=st.integers(1, 3),
    t=st.integers(2, 40),
    i=st.integers(1, 24),
    o=st.integers(1, 24),
    weight=st.booleans(),
    bias=st.booleans(),
)
def test_factor_norms_over_positions_either_way(b, g, t, i, o, weight, bias):
    """Norms over positions take the cheaper of the Gram and the gradient: both equal brute force."""
    a, d = torch.randn(b, g, t, i, dtype=torch.float64), torch.randn(b, g, t, o, dtype=torch.float64)
    ref = torch.zeros(b, dtype=torch.float64)
    if weight:
        ref += torch.einsum("bgto,bgti->bgoi", d, a).pow(2).sum((1, 2, 3))
    if bias:
        ref += d.sum(2).pow(2).sum((1, 2))
    torch.testing.assert_close(kron_sqnorm(a, d, weight, bias), ref)


def coded(x: torch.Tensor) -> Coded:
    """``x`` ``(n, *row)`` through the stored int8 form, kept as codes and scales."""
    spec = quant.array_spec("a", list(x.shape[1:]), "int8")
    parts = quant.split_rows(spec, tensor_codes.encode_rows(spec, x).data.numpy())
    return tensor_codes.decode_or_code(spec, "a", parts, codes=True)


@SETTINGS
@given(
    n=st.integers(1, 4),
    m=st.integers(1, 5),
    uses=st.integers(1, 2),
    t=st.integers(1, 12),
    i=st.integers(1, 40),
    o=st.integers(1, 40),
    params=st.sampled_from([["weight", "bias"], ["weight"], ["bias"]]),
)
def test_gram_of_int8_codes_equals_brute_force_on_their_values(n, m, uses, t, i, o, params):
    """The Gram of int8 rows formed on their codes (exact integer products, scaled after) equals
    the inner products of the per-sample gradients of the rows' decoded values."""
    assume(kron_int_matmul())
    rows = {
        k: {"a": coded(torch.randn(b, uses, t, i)), "d": coded(torch.randn(b, uses, t, o))}
        for k, b in (("x", n), ("y", m))
    }
    hyper = {"in_features": i, "out_features": o}
    got = LinearExtractor.gram(hyper, params, rows["x"], rows["y"])

    def grads(r: dict[str, Coded]) -> torch.Tensor:
        a, d = (r[k].decoded().double().flatten(1, -2) for k in ("a", "d"))
        flat = [torch.einsum("bto,bti->boi", d, a).flatten(1)] if "weight" in params else []
        return torch.cat([*flat, *([d.sum(1)] if "bias" in params else [])], 1)

    gx, gy = grads(rows["x"]), grads(rows["y"])
    want = gx @ gy.T
    scale = gx.norm(dim=1)[:, None] * gy.norm(dim=1)[None, :]
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-12).all()
    floats = LinearExtractor.gram(
        hyper, params, *({k: v.decoded() for k, v in rows[s].items()} for s in "xy")
    )
    assert ((got - floats).double().abs() <= 1e-5 * scale + 1e-12).all()  # the float path agrees


@pytest.mark.parametrize("t, i, o", [(3, 16, 16), (40, 4, 4)])  # the Gram, then the gradient itself
def test_factor_norms_cover_both_ways(t, i, o):
    a, d = torch.randn(2, 1, t, i, dtype=torch.float64), torch.randn(2, 1, t, o, dtype=torch.float64)
    ref = torch.einsum("bgto,bgti->bgoi", d, a).pow(2).sum((1, 2, 3)) + d.sum(2).pow(2).sum((1, 2))
    torch.testing.assert_close(kron_sqnorm(a, d, True, True), ref)


def test_embedding_stores_ids_not_one_hots():
    layer = nn.Embedding(1000, 8)
    model = Wrap(layer)
    plans, _ = select_layers(model, CapturePolicy(layers=["layer"]))
    assert check_layer(layer, [torch.randint(0, 1000, (3, 5))]) == "factors"
    hooks = HookManager()
    hooks.attach(plans)
    hooks.active = True
    model(torch.randint(0, 1000, (3, 5))).sum().backward()
    uses = hooks.take()["layer"]
    hooks.detach()
    plans["layer"].finalize(uses, CapturePolicy(precision="fp16"))
    a = plans["layer"].arrays["a"]
    assert (a["row_shape"], a["encoding"], a["parts"]) == (
        [1, 5],
        "int64",
        {"a": {"row_shape": [1, 5], "dtype": "int64"}},
    )


@SETTINGS
@given(
    b=batch,
    lead=st.lists(st.integers(1, 3), max_size=2),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    affine_bias=st.booleans(),
)
def test_layer_norm_affine(b, lead, shape, affine_bias):
    layer = nn.LayerNorm(shape, bias=affine_bias)
    with torch.no_grad():
        layer.weight.normal_()
    assert check_layer(layer, [torch.randn(b, *lead, *shape)]) == "full"


@SETTINGS
@given(
    b=batch, groups=st.integers(1, 3), per=st.integers(1, 3), spatial=st.lists(st.integers(1, 3), max_size=2)
)
def test_group_norm_affine(b, groups, per, spatial):
    assume(per * math.prod(spatial) > 1)  # torch refuses a group of one value
    layer = nn.GroupNorm(groups, groups * per)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    check_layer(layer, [torch.randn(b, groups * per, *spatial)])


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
@SETTINGS
@given(b=batch, t=st.integers(1, 3), c=st.integers(1, 5))
def test_rms_norm_weight(b, t, c):
    check_layer(nn.RMSNorm(c), [torch.randn(b, t, c)])


def test_representation_picks_the_smaller():
    # 1 position of 64 -> 64: factors take 128 numbers, the gradient 4160.
    assert check_layer(nn.Linear(64, 64), [torch.randn(3, 64)]) == "factors"
    # 100 positions of 2 -> 2: factors take 400 numbers, the gradient 6.
    assert check_layer(nn.Linear(2, 2), [torch.randn(3, 100, 2)]) == "full"


def test_frozen_weight_captures_bias_only():
    layer = nn.Linear(4, 3)
    layer.weight.requires_grad_(False)
    plans, _ = select_layers(Wrap(layer), CapturePolicy(layers=["layer"]))
    assert plans["layer"].params == ["bias"]
