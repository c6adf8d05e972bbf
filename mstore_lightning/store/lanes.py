"""Worker threads for the per-chunk kernels of a scan over few queries.

A query against every stored row is a matrix-vector product per chunk. BLAS runs those on one
thread, and they are bound by memory bandwidth, which a second thread raises by half or more on
this kind of machine (13.5 against 20.5 GB/s on two cores). Many queries make a matrix product,
which BLAS already spreads over torch's threads; those run inline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from typing_extensions import Self

# At most this many queries make a scan matrix-vector bound (BLAS keeps such products on one thread).
FEW_QUERIES = 8


class Lanes:
    """Runs ``submit``-ted calls on ``threads`` worker threads, or inline with one.

    At most two calls per thread wait at once, so a fast reader cannot pile up chunks in memory.
    :meth:`wait`, and leaving the ``with`` block, wait for every call and raise the first failure.

    Example:
        >>> import numpy as np
        >>> out = np.zeros(4)
        >>> with Lanes(2) as lanes:
        ...     for i in range(4):
        ...         lanes.submit(out.__setitem__, i, i * i)  # each call writes its own slot
        >>> out.tolist()
        [0.0, 1.0, 4.0, 9.0]
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._pending: deque[Future] = deque()

    @classmethod
    def for_queries(cls, queries: int) -> Lanes:
        return cls(torch.get_num_threads() if queries <= FEW_QUERIES else 1)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
            return
        while len(self._pending) >= 2 * self.threads:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Waits for every call submitted so far; raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:  # on an error already raised, just stop
                self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
