"""Copies from the training device to host memory that never make the training thread wait.

On CUDA a copy is ``non_blocking`` into pinned memory, on a side stream that first waits for the work
that made the rows; the event recorded after a chunk's copies is what its reader waits on, on another
thread or later. The training thread itself never synchronizes the device. On the CPU a copy is a
plain copy into reused memory, and there is nothing to wait for.

Example::

    copies = DeviceCopies()
    host = copies.host_buffer((1024, 64), np.dtype(np.int8), pinned=rows.is_cuda)
    copies.copy(host[:128], rows)  # rows: a (128, 64) int8 tensor on any device
    ready = copies.record(rows.device)  # None on the CPU
    if ready is not None:
        ready.synchronize()  # then host[:128] holds the rows
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class DeviceCopies:
    """One side stream per CUDA device for device-to-host copies, and the events that mark them done."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    @staticmethod
    def host_buffer(shape: tuple[int, ...], dtype: np.dtype, pinned: bool) -> np.ndarray:
        """An uninitialised host array; in page-locked memory with ``pinned`` (it must be, for a
        device copy into it not to wait for the device)."""
        if not pinned:
            return np.empty(shape, dtype=dtype)
        # The array's base keeps the pinned tensor, and so its memory, alive.
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True).numpy()

    def copy(self, dst: np.ndarray, src: torch.Tensor) -> None:
        """Copies ``src`` into ``dst``: on the CPU now; from CUDA, queued on the side stream."""
        if not src.is_cuda:
            torch.from_numpy(dst).copy_(src)  # torch casts an order of magnitude faster than numpy
            return
        stream = self._stream(src.device)
        stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(stream):
            torch.from_numpy(dst).copy_(src, non_blocking=True)
        src.record_stream(stream)  # its memory is not reused before the copy has read it

    def record(self, device: torch.device | None) -> Any:
        """An event after every copy queued so far from ``device``; ``None`` for the CPU."""
        if device is None or device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(self._stream(device))
        return event

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


class HostCopy:
    """A 1-D device tensor's host copy in flight, such as a batch's sample ids.

    ``len()`` and ``tensor`` need no wait; :meth:`numpy` waits for the copy (the device's work queued
    before it, not after), so a training step reads it only where it must.
    """

    def __init__(self, tensor: torch.Tensor, copies: DeviceCopies) -> None:
        self.tensor = tensor
        dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
        self._host = copies.host_buffer(tuple(tensor.shape), dtype, pinned=True)
        copies.copy(self._host, tensor)
        self._ready = copies.record(tensor.device)

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def numpy(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host


def host_array(values: np.ndarray | HostCopy) -> np.ndarray:
    """``values`` on the host, waiting for a copy in flight."""
    return values.numpy() if isinstance(values, HostCopy) else values


def as_rows(values: np.ndarray | HostCopy) -> torch.Tensor:
    """``values`` as a tensor to hand to the writer: where they live, with no wait."""
    return values.tensor if isinstance(values, HostCopy) else torch.from_numpy(values)
