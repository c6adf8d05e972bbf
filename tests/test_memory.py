"""Analytics stream: reading an epoch many times larger than a chunk keeps peak memory near a chunk's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from helpers import EXACT, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store

# Peak RSS of the operations alone: /proc/self/clear_refs "5" resets the high-water mark (VmHWM).
PEAK = textwrap.dedent(
    """
    import sys
    from mstore_lightning import open_store

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))

    store = open_store(sys.argv[1])
    epoch, mode = int(sys.argv[2]), sys.argv[3]
    ids = store.sample_ids(epoch)
    first = store.sample_ids(0)
    # warm: imports (and their bytecode compiled on a fresh install) and first allocations, on every
    # path the measured operations take: kept norms, the factors streamed by dot, self-influence
    store.norms(0)
    store.dot(0, first[:4], first)
    store.self_influence(epochs=[0])
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    if mode == "stream":
        store.norms(epoch)
        store.dot(epoch, ids[:4], ids)
        store.self_influence(epochs=[epoch])
    else:  # every row at once, to show the measurement sees a full load
        rows = [store.factors(epoch, layer, ids) for layer in store.layers]
    print(status("VmHWM") - before)
    """
)


def peak_growth(path, epoch: int, mode: str) -> int:
    cmd = [sys.executable, "-c", PEAK, str(path), str(epoch), mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_the_epoch(tmp_path):
    torch.manual_seed(0)
    n = 12_000
    x, y = torch.randn(n, 256), torch.randint(0, 4, (n,))
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    path = tmp_path / "s.zarr"
    # epoch 0: 200 samples (warm-up reads); epoch 1: all 12,000; epoch 2: 3,000
    for epoch, count in ((0, 200), (1, n), (2, 3_000)):
        cap = GradientCapture(path, policy={**EXACT, "epochs": [epoch]}, chunk_bytes=64 << 10, mode="append")
        trainer([cap], max_epochs=epoch + 1).fit(Task(net), loader(x[:count], y[:count], batch_size=500, shuffle=False))
    store = open_store(path)
    assert [len(store.sample_ids(e)) for e in store.epochs] == [200, n, 3_000]
    row = (256 + 256 + 4) * 4  # fp32 factors of one sample
    # The least of two runs each: a stray transient (a thread pool's buffers, a late collection) can
    # lift one run's high-water mark; memory that grows with the epoch lifts every run.
    big = min(peak_growth(path, 1, "stream") for _ in range(2))
    small = min(peak_growth(path, 2, "stream") for _ in range(2))
    loaded = peak_growth(path, 1, "load")
    assert loaded > n * row / 2, loaded  # the measurement sees a full read
    # Four times the rows, about the same peak: memory follows the chunk, not the epoch.
    assert big - small < (n - 3_000) * row / 10, (big, small)
    assert big < loaded / 4, (big, loaded)
