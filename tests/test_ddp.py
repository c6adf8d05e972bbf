"""A real two-process DDP run on CPU (gloo): each process writes its own rows, rank 0 alone commits,
and the store holds exactly what a single reader expects."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import manifest_files, stored_manifests

from mstore_lightning import open_store
from mstore_lightning.store.verify import epoch_states, verify

pytestmark = pytest.mark.slow

N, EPOCHS = 32, 2

# Lightning's DDP launcher re-runs the script for each process, so the run lives in a file.
SCRIPT = textwrap.dedent(
    f"""
    import sys
    import lightning as L
    import torch
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from helpers import EXACT, Reference, Task, loader, trainer
    from test_capture_fit import data, mlp
    from mstore_lightning import GradientCapture

    class SaveReference(L.Callback):
        # Each process's torch.func per-sample gradients, for the test to compare with the store.
        def __init__(self, ref, out):
            self.ref, self.out = ref, out

        def on_fit_end(self, trainer, pl_module):
            grads = {{e: dict(d) for e, d in self.ref.grads.items()}}
            torch.save(grads, f"{{self.out}}/reference_{{trainer.global_rank}}.pt")

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        x, y = data(n={N})
        ref = Reference()
        cap = GradientCapture(f"{{out}}/s.zarr", policy=EXACT)
        fit = trainer([ref, cap, SaveReference(ref, out)], max_epochs={EPOCHS}, strategy="ddp", devices=2)
        fit.fit(Task(mlp()), loader(x, y, batch_size=4))
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    refs = [torch.load(out / f"reference_{r}.pt", weights_only=False) for r in (0, 1)]
    return out / "s.zarr", refs


def test_each_rank_writes_disjoint_rows_and_the_union_is_the_dataset(ddp_run):
    path, refs = ddp_run
    store = open_store(path)
    assert store.epochs == list(range(EPOCHS))
    for e in store.epochs:
        per_rank = [set(ref[e]) for ref in refs]  # what each process trained on
        assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
        ids = store.sample_ids(e)
        assert sorted(ids.tolist()) == list(range(N))
        ranks = store.catalog.rank_groups(e)
        assert [g.basename for g in ranks] == ["r0", "r1"]
        for r, g in enumerate(ranks):
            assert set(g["rows/ids"][:].tolist()) == per_rank[r]


def test_restored_gradients_equal_each_processes_torch_func_reference(ddp_run):
    path, refs = ddp_run
    store = open_store(path)
    for e in store.epochs:
        ids = store.sample_ids(e).tolist()
        by_id = {**refs[0][e], **refs[1][e]}
        for layer in store.layers:
            got = store.restore(e, layer, ids)
            for param, values in got.items():
                want = torch.stack([by_id[i][f"{layer}.{param}"] for i in ids])
                torch.testing.assert_close(values, want, atol=1e-6, rtol=1e-5)


def test_rank_zero_commits_once_and_influence_reads_every_rank(ddp_run):
    path, refs = ddp_run
    store = open_store(path)
    attrs = store.catalog.epoch_attrs(0)
    assert attrs["world_size"] == 2 and attrs["rows"] == N
    assert verify(str(path)).ok
    manifests = stored_manifests(path)  # each rank lists its own chunks before rank 0 commits
    assert {g.rsplit("/", 1)[-1] for g in manifests} == {"r0", "r1"} and manifests == manifest_files(path)
    si = store.self_influence()
    assert si.ids.tolist() == list(range(N))
    expected = np.zeros(N)
    for e in store.epochs:
        for i, g in {**refs[0][e], **refs[1][e]}.items():
            expected[i] += store.lr(e) * sum(float((t.double() ** 2).sum()) for t in g.values())
    np.testing.assert_allclose(si.scores, expected, rtol=1e-5)
    tracin = store.tracin([0, 5])
    assert tracin.scores.shape == (2, N)


# Rank 1 dies (SIGKILL, no cleanup) partway through the second epoch.
DYING = textwrap.dedent(
    f"""
    import datetime, os, signal, sys
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from helpers import EXACT, Task, loader, trainer
    from test_capture_fit import data, mlp
    from mstore_lightning import GradientCapture

    class Die(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 1 and trainer.current_epoch == 1 and batch_idx == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        out = sys.argv[1]
        # Lightning's watchdog SIGKILLs every process within 5 s of a rank's death, racing the
        # surviving rank's own report of its lost peer; polled every 2 minutes, the survivor's own
        # failure is what the test sees, every time.
        from lightning.fabric.strategies.launchers import subprocess_script
        subprocess_script._ChildProcessObserver.__init__.__defaults__ = (120,)
        torch.manual_seed(0)
        x, y = data(n={N})
        cap = GradientCapture(f"{{out}}/s.zarr", policy=EXACT)
        # A short collective timeout, so the surviving rank gives up instead of waiting 30 minutes.
        ddp = DDPStrategy(timeout=datetime.timedelta(seconds=20))
        fit = trainer([cap, Die()], max_epochs=3, strategy=ddp, devices=2)
        fit.fit(Task(mlp()), loader(x, y, batch_size=4))
    """
)


def test_a_rank_that_dies_leaves_its_epoch_uncommitted(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DYING)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0  # the surviving rank fails instead of hanging
    assert re.search("Connection (closed|reset) by peer", proc.stderr), proc.stderr[-4000:]
    path = tmp_path / "s.zarr"
    assert epoch_states(path) == {0: "committed", 1: "open"}
    store = open_store(path)
    assert store.epochs == [0]  # the epoch the rank died in is never visible, not even in part
    assert sorted(store.sample_ids(0).tolist()) == list(range(N))
    report = verify(str(path))
    assert report.ok, report
