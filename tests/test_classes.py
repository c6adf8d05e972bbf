"""Class gradients and class conflicts on the factors, against sums of torch.func per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from test_extractors import Conv1D


class Mixed(nn.Module):
    """A grouped conv, a GPT-2 Conv1D (transposed weight) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.mid = Conv1D(16, 8 * 4 * 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("classes")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(36, 4, 4, 4, generator=g), torch.randint(0, 3, (36,), generator=g)
    ref = Reference()
    policy = {**EXACT, "representation": "factors"}  # every layer on the factor path
    caps = [GradientCapture(path / "f.zarr", policy=policy), GradientCapture(path / "full.zarr", policy={**EXACT, "representation": "full"})]
    trainer([ref, *caps], max_epochs=1).fit(Task(Mixed()), loader(x, y, batch_size=12))
    return open_store(path / "f.zarr"), open_store(path / "full.zarr"), ref, y


@pytest.mark.parametrize("which", [0, 1])
def test_class_gradients_are_sums_of_per_sample_gradients(run, which):
    store, ref, y = run[which], run[2], run[3]
    ids = store.sample_ids(0).tolist()
    cg = store.class_gradients(0)
    np.testing.assert_array_equal(cg.classes, [0, 1, 2])
    np.testing.assert_array_equal(cg.counts, np.bincount(y.numpy(), minlength=3))
    for layer in store.layers:
        for p in ("weight", "bias"):
            per_sample = ref.stacked(0, ids, f"{layer}.{p}").double()
            labels = y[ids]
            want = torch.stack([per_sample[labels == c].sum(0) for c in range(3)])
            torch.testing.assert_close(cg.grads[layer][p], want, rtol=1e-4, atol=1e-6)  # float32 rows


@pytest.mark.parametrize("which", [0, 1])
def test_class_conflicts_match_brute_force(run, which):
    store, ref, y = run[which], run[2], run[3]
    ids = store.sample_ids(0).tolist()
    names = [f"{layer}.{p}" for layer in store.layers for p in ("weight", "bias")]
    g = torch.cat([ref.stacked(0, ids, n).flatten(1).double() for n in names], 1)
    labels = y[ids]
    classes = torch.stack([g[labels == c].sum(0) for c in range(3)])
    cos = torch.nn.functional.cosine_similarity(classes[:, None], classes[None], dim=-1)
    got = store.class_conflicts(0)
    np.testing.assert_allclose(got.cosine, cos.numpy(), rtol=1e-5, atol=1e-8)
    align = torch.nn.functional.cosine_similarity(g, classes[labels], dim=1)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_allclose(got.alignment, align.numpy(), rtol=1e-4, atol=1e-7)
    share = [(align[labels == c] < 0).double().mean().item() for c in range(3)]
    np.testing.assert_allclose(got.opposing_share, share)
    assert got.cosine.diagonal() == pytest.approx(1.0)


def test_class_results_convert_to_pandas(run):
    store, y = run[0], run[3]
    cg = store.class_gradients(0).to_pandas()
    assert cg["class"].tolist() == [0, 1, 2] and cg["count"].tolist() == np.bincount(y.numpy(), minlength=3).tolist()
    conflicts = store.class_conflicts(0).to_pandas()
    assert list(conflicts.columns) == ["id", "alignment"] and len(conflicts) == 36
