"""Sends report results to the trainer's own loggers.

Scalars go to every logger through ``log_metrics``, which all Lightning loggers implement.
Histograms, figures and tables use a logger's own API where it has one:

==============  ==================  ============================  ==========================
logger          histograms          figures                       tables
==============  ==================  ============================  ==========================
TensorBoard     ``add_histogram``   ``add_image`` (the PNG)       ``add_text`` (markdown)
MLflow          --                  ``log_artifact`` (the PNG)    ``log_table``
W&B             ``wandb.Histogram`` ``log_image``                 ``log_table``
any other       --                  --                            --
==============  ==================  ============================  ==========================

Every figure and table is also a PNG/CSV file beside the store, whatever the loggers. A logger
that fails is warned about once and then left alone: a report never stops training.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PREFIX = "mstore"  # every tag starts with it, so our metrics group together in each UI
_TEXT_ROWS = 20  # rows of a table sent as TensorBoard text


class LoggerSink:
    """Sends one epoch's results to ``loggers`` at ``step``.

    Args:
        loggers: ``trainer.loggers``.
        step: the global step the results belong to (the epoch's last).
        epoch: the epoch reported.
    """

    def __init__(self, loggers: Sequence[Any], step: int, epoch: int) -> None:
        self.loggers, self.step, self.epoch = list(loggers), int(step), int(epoch)
        self.failed: dict[int, str] = {}
        self._scalars: dict[str, float] = {}

    def scalars(self, metrics: dict[str, float]) -> None:
        """Queues scalars; :meth:`flush` sends them in one ``log_metrics`` call per logger, so that
        loggers writing a row per call (CSV) get one row per epoch."""
        self._scalars.update({f"{PREFIX}/{k}": float(v) for k, v in metrics.items()})

    def flush(self) -> None:
        if self._scalars:
            for lg in self.loggers:
                self._call(lg, lg.log_metrics, dict(self._scalars), step=self.step)
        self._scalars.clear()

    def histograms(self, values: dict[str, np.ndarray]) -> None:
        for lg in self.loggers:
            kind = _kind(lg)
            for name, v in values.items():
                if not len(v):
                    continue
                if kind == "tensorboard":
                    self._call(lg, lg.experiment.add_histogram, f"{PREFIX}/{name}", v, self.step)
                elif kind == "wandb":
                    self._call(lg, _wandb_histogram, lg, f"{PREFIX}/{name}", v, self.step)

    def figure(self, name: str, png: bytes, path: Path) -> None:
        """One figure, rendered once to ``png`` and saved at ``path``."""
        tag = f"{PREFIX}/{name}"
        for lg in self.loggers:
            kind = _kind(lg)
            if kind == "tensorboard":
                self._call(lg, _tensorboard_image, lg, tag, png, self.step)
            elif kind == "mlflow":
                folder = f"{PREFIX}/epoch_{self.epoch:05d}"
                self._call(lg, lg.experiment.log_artifact, lg.run_id, str(path), folder)
            elif kind == "wandb":
                self._call(lg, lg.log_image, key=tag, images=[str(path)], step=self.step)

    def table(self, name: str, frame: Any) -> None:
        tag = f"{PREFIX}/{name}"
        for lg in self.loggers:
            kind = _kind(lg)
            if kind == "tensorboard":
                self._call(lg, lg.experiment.add_text, tag, _markdown(frame), self.step)
            elif kind == "mlflow":
                file = f"{PREFIX}/epoch_{self.epoch:05d}/{name.replace('/', '_')}.json"
                self._call(lg, lg.experiment.log_table, lg.run_id, data=frame, artifact_file=file)
            elif kind == "wandb":
                self._call(lg, lg.log_table, key=tag, dataframe=frame, step=self.step)

    def _call(self, lg: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        if id(lg) in self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a logger's failure must not take training down
            self.failed[id(lg)] = f"{type(exc).__name__}: {exc}"
            log.warning(
                "%s failed to log report results, which it no longer gets: %s", type(lg).__name__, exc
            )


class RecordingSink:
    """Keeps what would go to a :class:`LoggerSink`, to replay it later or in another process.

    Every argument it keeps (dicts, arrays, bytes, paths, data frames) pickles, so a report
    computed in a worker process reaches the trainer's loggers in the training process.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def scalars(self, metrics: dict[str, float]) -> None:
        self.calls.append(("scalars", (dict(metrics),)))

    def histograms(self, values: dict[str, np.ndarray]) -> None:
        self.calls.append(("histograms", (dict(values),)))

    def figure(self, name: str, png: bytes, path: Path) -> None:
        self.calls.append(("figure", (name, png, path)))

    def table(self, name: str, frame: Any) -> None:
        self.calls.append(("table", (name, frame)))

    def flush(self) -> None:
        self.calls.append(("flush", ()))

    def replay(self, sink: LoggerSink) -> None:
        for method, args in self.calls:
            getattr(sink, method)(*args)


def _kind(lg: Any) -> str:
    """The logger family, by class name, so that no logger library is imported to ask."""
    for cls in type(lg).__mro__:
        name = cls.__name__
        if name == "TensorBoardLogger":
            return "tensorboard"
        if name == "MLFlowLogger":
            return "mlflow"
        if name == "WandbLogger":
            return "wandb"
    return "other"


def _tensorboard_image(lg: Any, tag: str, png: bytes, step: int) -> None:
    """The PNG as it is, into torch's event writer: ``add_image`` would decode it to pixels and
    encode it again, 17 ms a figure against 0.1 ms. Another writer (tensorboardX) gets pixels."""
    writer = lg.experiment
    file_writer = getattr(writer, "_get_file_writer", None)
    channels = _PNG_CHANNELS.get(png[25])  # the IHDR chunk's colour type; a palette PNG gets pixels
    if _is_torch_writer(writer) and file_writer is not None and channels is not None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
        file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        return
    from matplotlib.image import imread

    writer.add_image(tag, imread(io.BytesIO(png), format="png")[..., :3], step, dataformats="HWC")


# PNG colour type -> channels, as TensorBoard's Summary.Image.colorspace counts them
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _is_torch_writer(writer: Any) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    return isinstance(writer, SummaryWriter)


def _wandb_histogram(lg: Any, tag: str, values: np.ndarray, step: int) -> None:
    import wandb

    lg.log_metrics({tag: wandb.Histogram(values)}, step=step)


def _markdown(frame: Any) -> str:
    """A table as markdown, which TensorBoard's text tab renders."""
    head = frame.head(_TEXT_ROWS)
    cells = [[_cell(v) for v in row] for row in head.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, head.columns)) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if len(frame) > _TEXT_ROWS:
        lines.append(f"\n{len(frame) - _TEXT_ROWS} more rows in the CSV file beside the store.")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")
