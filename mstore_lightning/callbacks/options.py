"""Every argument of :class:`~mstore_lightning.GradientCapture`, validated once.

Example:
    >>> CaptureOptions("runs/demo.zarr", on_error="raise").on_error
    'raise'
    >>> CaptureOptions("runs/demo.zarr", mode="keep")
    Traceback (most recent call last):
    ...
    ValueError: `mode` can be 'error', 'overwrite', 'append'; got 'keep'.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mstore_lightning.config import CapturePolicy, PolicyLike
from mstore_lightning.core.checks import a_callable, a_path, an_iterable, choice, number, whole
from mstore_lightning.reports.spec import AnalyticsLike, parse_analytics
from mstore_lightning.store.dedup import DEFAULT_DEDUP_BYTES
from mstore_lightning.store.session import MODES
from mstore_lightning.store.writer import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_BYTES

ON_ERROR = ("warn", "raise")
ON_PRESSURE = ("block", "drop")
_RECORDER_ARGS = (
    "sample_ids",
    "labels",
    "loss_fn",
    "mode",
    "queue_bytes",
    "chunk_bytes",
    "storage_options",
    "dedup_bytes",
    "on_pressure",
)


@dataclass(frozen=True)
class CaptureOptions:
    """The arguments of :class:`~mstore_lightning.GradientCapture` (documented there), checked and
    normalised: ``store`` and ``report_dir`` as strings, ``policy`` as a
    :class:`~mstore_lightning.CapturePolicy`, ``analytics`` as parsed specs.

    Raises:
        ValueError: an argument is out of range; the message names it, what it takes and the value.
        PolicyError: the policy is invalid.
    """

    store: str | os.PathLike
    policy: PolicyLike = None
    sample_ids: Callable[[Any], Any] | None = None
    labels: Callable[[Any], Any] | None = None
    mode: str = "error"
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    storage_options: dict[str, Any] | None = None
    dedup_bytes: int = DEFAULT_DEDUP_BYTES
    loss_fn: Callable[[Any, Any], Any] | None = None
    query: Iterable[Any] | None = None
    analytics: AnalyticsLike = None
    analytics_budget_s: float | None = None
    report_dir: str | os.PathLike | None = None
    analytics_background: bool = False
    analytics_max_overhead: float | None = None
    on_error: str = "warn"
    on_pressure: str = "block"

    def __post_init__(self) -> None:
        # The order of the checks is the order users have seen errors in: the store first.
        self._set("store", a_path("store", self.store))
        choice("on_error", self.on_error, ON_ERROR)
        choice("on_pressure", self.on_pressure, ON_PRESSURE)
        choice("mode", self.mode, MODES)
        for name in ("queue_bytes", "chunk_bytes", "dedup_bytes"):
            self._set(name, whole(name, getattr(self, name), low=1, noun="a positive number of bytes"))
        an_iterable("query", self.query, "a DataLoader (or an iterable of batches)")
        for name in ("sample_ids", "labels", "loss_fn"):
            a_callable(name, getattr(self, name))
        self._positive_or_none("analytics_budget_s", "a positive number of seconds")
        self._set("policy", CapturePolicy.coerce(self.policy))
        self._set("analytics", parse_analytics(self.analytics))
        self._set("report_dir", None if self.report_dir is None else os.fspath(self.report_dir))
        self._set("analytics_background", bool(self.analytics_background))
        self._positive_or_none("analytics_max_overhead", "a positive share of training time (0.1 for 10%)")

    def recorder_args(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~mstore_lightning.capture.recorder.Recorder` they give."""
        return {name: getattr(self, name) for name in _RECORDER_ARGS}

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen instance, once, in __post_init__

    def _positive_or_none(self, name: str, noun: str) -> None:
        if getattr(self, name) is not None:
            number(name, getattr(self, name), positive=True, noun=noun)
