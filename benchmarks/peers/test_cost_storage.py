"""Checks of ``capture_cost.py`` and ``storage.py`` against independent references.

They need the peers' environment (Opacus, BackPACK), so they live here and not in ``tests/``:

    .venv-peers/bin/python -m pytest benchmarks/peers/test_cost_storage.py -q
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common

cc = common.load_peer_script("capture_cost")
ps = common.load_peer_script("storage")


def _batch(model: str, n: int) -> dict[str, torch.Tensor]:
    data = common.make_data(common.SPECS[model], 1)
    return data[list(range(n))]


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_per_sample_grads_match_an_autograd_loop(model):
    """The reference all results rest on: vmap(grad) equals one backward per sample."""
    net = cc._no_dropout(common.build(model)).double()
    batch = _batch(model, 3)
    x = batch["x"].double() if batch["x"].is_floating_point() else batch["x"]
    got = common.per_sample_grads(net, x, batch["y"])
    for i in range(3):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), batch["y"][i : i + 1]).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------- capture cost
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_every_arm_takes_the_same_training_steps(model, tmp_path):
    """Peers add per-sample gradients without changing training: every arm ends at the plain weights."""
    data = common.make_data(common.SPECS[model], 3)
    final = {}
    for name in cc.ARMS:
        _, module = cc.fit_once(cc.ARM_SPECS[name], model, data, tmp_path / "store.zarr")
        net = module.net._module if name == "opacus" else module.net
        final[name] = torch.cat([p.detach().flatten() for p in net.parameters()])
    plain = final.pop("plain")
    start = torch.cat([p.flatten() for p in common.build(model).parameters()])
    moved = (plain - start).norm()
    assert moved > 0
    for name, weights in final.items():
        # Against how far training moved them: a step of a wrongly scaled gradient fails this.
        assert (weights - plain).norm() / moved < 1e-4, name
    store = common.co.check_store(tmp_path / "store.zarr", 3 * common.SPECS[model].batch_size)
    assert store["ids_ok"], store


@pytest.mark.parametrize("arm", ["opacus", "backpack", "func"])
def test_peers_give_exact_per_sample_gradients_on_the_cnn(arm, tmp_path):
    data = common.make_data(common.SPECS["cnn"], 1)
    check = cc.check_arm(cc.ARM_SPECS[arm], "cnn", data, tmp_path)
    assert check["covered_tensors"] == check["total_tensors"] == 10
    assert check["max_rel_err"] < 1e-5


def test_coverage_on_the_transformer_is_counted(tmp_path):
    """BackPACK skips LayerNorm and attention; Opacus runs on the fixed (DPMultiheadAttention) network."""
    data = common.make_data(common.SPECS["transformer"], 1)
    backpack = cc.check_arm(cc.ARM_SPECS["backpack"], "transformer", data, tmp_path)
    assert "encoder.layers.0.norm1.weight" in backpack["not_covered"]
    assert "encoder.layers.1.self_attn.in_proj_weight" in backpack["not_covered"]
    assert backpack["max_rel_err"] < 1e-5
    opacus = cc.check_arm(cc.ARM_SPECS["opacus"], "transformer", data, tmp_path)
    assert opacus["covered_tensors"] == opacus["total_tensors"] and not opacus["not_covered"]
    assert opacus["max_rel_err"] < 1e-5


def test_compare_measures_the_error_it_is_given():
    torch.manual_seed(0)
    ref = {"w": torch.randn(4, 3, 2, dtype=torch.float64), "b": torch.randn(4, 3, dtype=torch.float64)}
    noise = {k: torch.randn_like(v) for k, v in ref.items()}
    scale = torch.tensor([0.0, 1e-3, 2e-2, 5e-3], dtype=torch.float64)  # per sample
    got = {k: v + scale.view(-1, *[1] * (v.ndim - 1)) * noise[k] for k, v in ref.items()}
    want = max(
        math.sqrt(sum(float((got[k][i] - ref[k][i]).square().sum()) for k in ref))
        / math.sqrt(sum(float(ref[k][i].square().sum()) for k in ref))
        for i in range(4)
    )
    out = cc._compare(got, ref)
    assert out["max_rel_err"] == pytest.approx(want, rel=1e-12)
    partial = cc._compare({"w": ref["w"]}, ref)
    assert partial["not_covered"] == ["b"] and partial["covered_elements"] == 6


# -------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_jl_projection_estimates_inner_products_to_its_predicted_error(kind, tmp_path):
    torch.manual_seed(1)
    n = 24
    base = torch.randn(n, 3000, dtype=torch.float64)
    exact = {"a": base[:, :1000], "b": base[:, 1000:]}
    gram = (base @ base.T).numpy()
    norms = np.sqrt(np.diag(gram))
    errs = {}
    for k in (64, 4096):
        rec = ps.jl_projection(exact, k, kind, tmp_path)
        assert rec["bytes_per_sample"] == 2 * k
        pair = np.abs(rec["gram"] - gram) / np.outer(norms, norms)
        # std of the estimate is at most sqrt(2/k) in cosine units; 6 of them is never reached by chance
        assert pair.max() < 6 * math.sqrt(2 / k)
        errs[k] = np.linalg.norm(rec["gram"] - gram)
    assert errs[4096] < errs[64] / 3  # error falls as 1/sqrt(k): 8x expected


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 12),
    dim=st.integers(1, 6),
    noise=st.floats(0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_error_figures_match_brute_force(n, dim, noise, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, dim))
    h = g + noise * rng.standard_normal((n, dim))
    ref, est = g @ g.T, h @ h.T
    rn, en = np.linalg.norm(g, axis=1), np.linalg.norm(h, axis=1)
    out = ps.errors(est, en, ref, rn)
    pairs = [abs(est[i, j] - ref[i, j]) / (rn[i] * rn[j]) for i, j in itertools.combinations(range(n), 2)]
    assert out["pair_err_median"] == pytest.approx(float(np.median(pairs)), abs=1e-12)
    assert out["pair_err_max"] == pytest.approx(max(pairs), abs=1e-12)
    assert out["norm_rel_err_max"] == pytest.approx(float(max(abs(en - rn) / rn)), abs=1e-12)
    assert out["pairs"] == n * (n - 1) // 2
    k = min(ps.TOPK, n - 1)
    overlap = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        top_est = set(sorted(others, key=lambda j: (-est[i, j], j))[:k])
        top_ref = set(sorted(others, key=lambda j: (-ref[i, j], j))[:k])
        overlap.append(len(top_est & top_ref) / k)
    # Ties are measure-zero for continuous draws, so the order of tied entries cannot matter.
    assert out["topk_overlap"] == pytest.approx(float(np.mean(overlap)))
    if noise == 0:
        assert out["gram_rel_fro"] == 0 and out["topk_overlap"] == 1


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_store_and_factor_memmaps_against_torch_func(model, tmp_path):
    """On a real capture: the fp32 store is exact; the fp16 memmaps hold 2 bytes a stored number."""
    spec = common.SPECS[model]
    data = common.make_data(spec, 1)
    net, stores, _ = ps.train_and_capture(model, data, ["fp32", "int8"], 1, tmp_path)
    ids = np.arange(0, spec.batch_size, spec.batch_size // 16)
    names = [n for n, _ in net.named_parameters()]
    exact = ps.exact_grads(net, data, ids, names)
    gram, norms = ps.gram_of(exact)

    lossless = ps.ours(stores["fp32"], ids)
    assert np.linalg.norm(lossless["gram"] - gram) / np.linalg.norm(gram) < 1e-5
    np.testing.assert_allclose(lossless["norms"], norms, rtol=1e-5)
    int8 = ps.ours(stores["int8"], ids)
    assert int8["bytes_per_sample"] < lossless["bytes_per_sample"]

    mm = ps.factor_memmaps(stores["fp32"], ids, tmp_path)
    assert mm["bytes_per_sample"] == 2 * _factor_numel(net, data[[0]]["x"])
    assert np.linalg.norm(mm["gram"] - gram) / np.linalg.norm(gram) < 2e-3  # float16: 2^-11 per number
    assert not np.allclose(mm["gram"], gram, rtol=1e-8, atol=0)  # it did go through float16


def _factor_numel(net: nn.Module, x: torch.Tensor) -> int:
    """Per sample, for every Linear and Conv2d: its input plus output numbers (the factors), or its
    parameter count where that is smaller (the store keeps the full gradient then)."""
    total = []

    def count(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        total.append(min(i[0][0].numel() + o[0].numel(), sum(p.numel() for p in m.parameters())))

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return sum(total)
