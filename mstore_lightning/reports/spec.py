"""Which analytics run at each captured epoch's end, and with what parameters.

``GradientCapture(analytics=...)`` takes a list whose items are an operator name, or a one-key
mapping ``{name: {param: value}}``, or a mapping with a ``name`` key; or a path to a YAML file
holding such a list (under an optional top-level ``analytics`` key). Everything is validated when
the callback is built, so a typo fails before training starts. The operators, their parameters and
defaults are those of :data:`mstore_lightning.reports.operators.OPERATORS`.

Example:
    >>> [s.name for s in parse_analytics(["norms", {"self_influence": {"k": 5}}])]
    ['norms', 'self_influence']
    >>> parse_analytics([{"self_influence": {"k": 5}}])[0].params["k"]
    5
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from mstore_lightning.core import checks
from mstore_lightning.reports.operators import OPERATORS, REQUIRED, parameters

_EPOCH_CHOICES = ("all", "current")
_METRICS = ("cosine", "dot")

AnalyticsLike = Sequence[str | Mapping[str, Any]] | str | os.PathLike | None


class AnalyticsError(ValueError):
    """An ``analytics`` entry names an unknown operator or gives it a parameter it cannot use."""


@dataclass(frozen=True)
class AnalyticSpec:
    """One configured epoch-end analytic.

    Attributes:
        name: an operator in :data:`~mstore_lightning.reports.operators.OPERATORS`.
        params: its parameters, defaults filled in.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {self.name: dict(self.params)}


def parse_analytics(analytics: AnalyticsLike) -> list[AnalyticSpec]:
    """Validates ``analytics`` and fills in defaults.

    Args:
        analytics: a list of names and ``{name: params}`` mappings, a YAML path, or ``None``.

    Returns:
        The specs, in the order given.

    Raises:
        AnalyticsError: naming the entry, the allowed values and what was given.
    """
    if analytics is None:
        return []
    if isinstance(analytics, (str, os.PathLike)):
        analytics = _from_yaml(analytics)
    if isinstance(analytics, Mapping) or not isinstance(analytics, Sequence):
        raise AnalyticsError(
            "`analytics` must be a list of operator names or {name: params} mappings, or a YAML path; "
            f"got {type(analytics).__name__}."
        )
    specs = [_entry(item, i) for i, item in enumerate(analytics)]
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AnalyticsError(
            f"`analytics` lists {', '.join(repeated)} more than once; give each operator once."
        )
    return specs


def _from_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise AnalyticsError(
            f"`analytics` names a file that does not exist: {os.fspath(path)!r}. Give a list of "
            "operator names, or the path of a YAML file holding one."
        ) from None
    except yaml.YAMLError as exc:
        raise AnalyticsError(f"The analytics file {checks.yaml_problem(path, exc)}.") from exc
    if isinstance(data, Mapping) and set(data) == {"analytics"}:
        data = data["analytics"]
    return [] if data is None else data


def _entry(item: Any, i: int) -> AnalyticSpec:
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, Mapping) and "name" in item:
        name, params = item["name"], {k: v for k, v in item.items() if k != "name"}
    elif isinstance(item, Mapping) and len(item) == 1:
        ((name, params),) = item.items()
        params = {} if params is None else params
    else:
        raise AnalyticsError(
            f"`analytics[{i}]` must be an operator name or a one-key mapping {{name: params}}; got {item!r}."
        )
    if name not in OPERATORS:
        raise AnalyticsError(
            f"`analytics[{i}]` names an unknown operator {name!r}; the operators are {', '.join(OPERATORS)}."
        )
    if not isinstance(params, Mapping):
        raise AnalyticsError(f"`analytics[{i}]` ({name}): parameters must be a mapping, got {params!r}.")
    allowed = parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        hint = ", ".join(allowed) if allowed else "none"
        raise AnalyticsError(
            f"`analytics[{i}]` ({name}) has unknown parameter(s) {', '.join(unknown)}; it takes: {hint}."
        )
    merged = {**{k: v for k, v in allowed.items() if v is not REQUIRED}, **params}
    _check_params(name, merged, i, required=[k for k, v in allowed.items() if v is REQUIRED])
    return AnalyticSpec(name, merged)


def _check_params(name: str, p: dict[str, Any], i: int, required: list[str]) -> None:
    where = f"`analytics[{i}]` ({name})"

    def error(message: str) -> AnalyticsError:
        return AnalyticsError(f"{where}: {message}")

    for key in ("k", "dim"):
        if key in p:
            checks.whole(key, p[key], low=1, noun="a positive integer", error=error)
    if "threshold" in p:
        checks.number("threshold", p["threshold"], error=error)
    if "epochs" in p and p["epochs"] not in _EPOCH_CHOICES:
        raise AnalyticsError(f"{where}: `epochs` can be {' or '.join(_EPOCH_CHOICES)}, got {p['epochs']!r}.")
    shape = p.get("image_shape")
    if shape is not None and (
        not isinstance(shape, Sequence)
        or len(shape) not in (2, 3)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise AnalyticsError(f"{where}: `image_shape` must be [H, W] or [C, H, W], got {shape!r}.")
    layers = p.get("layers")
    if layers is not None and (isinstance(layers, str) or not all(isinstance(x, str) for x in layers)):
        raise AnalyticsError(f"{where}: `layers` must be a list of layer names, got {layers!r}.")
    if "metric" in p and p["metric"] not in _METRICS:
        raise AnalyticsError(f"{where}: `metric` can be {' or '.join(_METRICS)}, got {p['metric']!r}.")
    ids = p.get("ids")
    if ids is not None and (
        isinstance(ids, (str, bytes))
        or not isinstance(ids, Sequence)
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids)
    ):
        raise AnalyticsError(f"{where}: `ids` must be a list of sample ids (integers >= 0), got {ids!r}.")
    if "ids" in required and not ids:
        raise AnalyticsError(f"{where}: give the samples to follow, e.g. {{{name}: {{ids: [3, 17]}}}}.")
    missing = [key for key in required if key not in p]
    if missing:  # a parameter without a default, other than ids: fail here, not mid-training
        raise AnalyticsError(f"{where}: give {', '.join(missing)}; it has no default.")
