"""Rows go from the training step to the writer without the step reading any value back.

On CUDA such a read (``.item()``, ``.cpu()``, ``bool(t)``, ``nonzero``) makes the training thread wait
for the device. On the CPU the same code paths run, so a mode that records every such call checks
them here; the CUDA tests run the real thing, under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mstore_lightning import CapturePolicy, open_store
from mstore_lightning.capture.recorder import Recorder
from mstore_lightning.core import quant, tensor_codes
from mstore_lightning.core.transfer import DeviceCopies, HostCopy


def cuda(test):
    """Marks a test that needs a CUDA device (``-m cuda`` picks them); it skips without one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
}


class ReadsBack(TorchFunctionMode):
    """Records every call that reads a tensor's values back to Python (a device sync on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, 3)
    )


def batches(n_batches: int, size: int = 8, device: str = "cpu") -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        out.append(
            {
                "x": torch.randn(size, 2, 16, generator=g).to(device),
                "target": torch.randint(0, 3, (size,), generator=g).to(device),
                "index": torch.arange(b * size, (b + 1) * size).to(device),
            }
        )
    return out


def run_steps(tmp_path, precision: str, device: str, watch) -> Recorder:
    """Trains one captured epoch; ``watch()`` is the context every step after the first runs in."""
    torch.manual_seed(0)
    net = model().to(device)
    policy = CapturePolicy(layers=["*"], precision=precision, dedup=False)
    recorder = Recorder(str(tmp_path / f"{precision}.zarr"), policy, labels=lambda b: b["target"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    recorder.plan(net, max_epochs=1)
    recorder.start()
    recorder.open(recorder.run_meta("m"), resume=False)
    recorder.begin_epoch(0, lr_groups=[[0.1]])
    for i, batch in enumerate(batches(6, device=device)):
        ctx = watch() if i else _nothing()
        with ctx:
            step, _ = recorder.plan_step(batch, i)
            recorder.begin_step(step)
            opt.zero_grad()
            losses = nn.functional.cross_entropy(net(batch["x"]), batch["target"], reduction="none")
            losses.mean().backward()
            recorder.record_backward(accumulation=1, global_step=i, lr=0.1)
            recorder.end_step(losses.detach(), batch)
        opt.step()
    recorder.finish_epoch(net, global_step=6)
    recorder.detach()
    recorder.close()
    return recorder


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("precision", ["int8", "fp32", "fp16"])
def test_a_captured_step_reads_no_value_back_from_its_tensors(tmp_path, precision):
    modes: list[ReadsBack] = []

    def watch():
        modes.append(ReadsBack())
        return modes[-1]

    run_steps(tmp_path, precision, "cpu", watch)
    reads = [c for m in modes for c in m.calls]
    assert len(modes) == 5
    # The batch's ids and labels are CPU tensors here, read once each per step by design (on CUDA
    # they travel as copies in flight instead); nothing else may read a value back.
    assert sorted(set(reads)) == ["cpu", "numpy"], reads
    assert len(reads) == 5 * 4, reads
    store = open_store(tmp_path / f"{precision}.zarr")
    assert len(store.sample_ids(0)) == 48


def test_a_nan_sample_is_still_named_at_the_epochs_end(tmp_path):
    """The non-finite masks stay unread during the epoch, and are read at its end."""
    torch.manual_seed(0)
    net = model()
    policy = CapturePolicy(layers=["*"], precision="int8", dedup=False)
    recorder = Recorder(str(tmp_path / "nan.zarr"), policy, labels=lambda b: b["target"])
    recorder.plan(net, max_epochs=1)
    recorder.start()
    recorder.open(recorder.run_meta("m"), resume=False)
    recorder.begin_epoch(0, lr_groups=[[0.1]])
    data = batches(3)
    data[1]["x"][5, 0, 3] = float("nan")  # id 13
    for i, batch in enumerate(data):
        step, _ = recorder.plan_step(batch, i)
        recorder.begin_step(step)
        losses = nn.functional.cross_entropy(net(batch["x"]), batch["target"], reduction="none")
        losses.mean().backward()
        recorder.record_backward(accumulation=1, global_step=i, lr=0.1)
        recorder.end_step(losses.detach(), batch)
    with pytest.warns(UserWarning, match=r"ids \[13\]"):
        recorder.finish_epoch(net, global_step=3)
    recorder.detach()
    recorder.close()
    assert open_store(tmp_path / "nan.zarr").nonfinite(0).tolist() == [13]


def test_host_buffers_copy_cpu_rows_at_once_and_need_no_wait():
    copies = DeviceCopies()
    host = copies.host_buffer((4, 3), np.dtype(np.float32), pinned=False)
    rows = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    copies.copy(host, rows)
    assert copies.record(rows.device) is None
    np.testing.assert_array_equal(host, rows.numpy().astype(np.float32))


# ------------------------------------------------------------------------------------- CUDA only
@cuda
def test_cuda_rows_reach_pinned_buffers_through_a_side_stream_and_an_event():
    copies = DeviceCopies()
    src = torch.randint(-100, 100, (1024, 257), dtype=torch.int8, device="cuda")
    host = copies.host_buffer(tuple(src.shape), np.dtype(np.int8), pinned=True)
    assert torch.from_numpy(host).is_pinned()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copies.copy(host, src)
        ready = copies.record(src.device)
        ids = HostCopy(torch.arange(7, device="cuda"), copies)
        assert len(ids) == 7
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ready.synchronize()
    np.testing.assert_array_equal(host, src.cpu().numpy())
    assert ids.numpy().tolist() == list(range(7))


@cuda
@pytest.mark.parametrize("precision", ["int8", "int8:row", "fp16", "bf16", "kbit:4"])
def test_codes_made_on_cuda_are_within_one_code_step_of_the_cpu_reference(precision):
    torch.manual_seed(0)
    x = torch.randn(64, 12, 33) * torch.logspace(-3, 3, 64)[:, None, None]
    spec = quant.array_spec("a", [12, 33], precision)
    cpu = quant.split_rows(spec, tensor_codes.encode_rows(spec, x).data.numpy())
    gpu = quant.split_rows(spec, tensor_codes.encode_rows(spec, x.cuda()).data.cpu().numpy())
    for name, ref in cpu.items():
        got = gpu[name]
        if ref.dtype.kind in "iu":
            assert np.abs(got.astype(np.int64) - ref.astype(np.int64)).max() <= 1, name
        else:
            np.testing.assert_allclose(
                got.astype(np.float64), ref.astype(np.float64), rtol=1e-6, err_msg=name
            )


@cuda
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_cuda_step_never_synchronizes_and_stores_what_the_cpu_stores(tmp_path, precision):
    def watch():
        class Sync:
            def __enter__(self):
                torch.cuda.set_sync_debug_mode("error")

            def __exit__(self, *exc):
                torch.cuda.set_sync_debug_mode("default")
                return False

        return Sync()

    run_steps(tmp_path / "gpu", precision, "cuda", watch)
    run_steps(tmp_path / "cpu", precision, "cpu", _nothing)
    gpu = open_store(tmp_path / "gpu" / f"{precision}.zarr")
    cpu = open_store(tmp_path / "cpu" / f"{precision}.zarr")
    assert gpu.sample_ids(0).tolist() == cpu.sample_ids(0).tolist()
    np.testing.assert_allclose(gpu.norms(0), cpu.norms(0), rtol=0.02)
