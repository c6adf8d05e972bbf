"""Argument checks shared by every part: each message names the argument, what it takes, and the value.

Example:
    >>> whole("k", 3, low=1)
    3
    >>> choice("metric", "euclid", ("cosine", "dot"))
    Traceback (most recent call last):
    ...
    ValueError: `metric` can be 'cosine', 'dot'; got 'euclid'.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def choice(name: str, value: T, allowed: Collection[Any], error: type[Exception] = ValueError) -> T:
    """``value`` when it is one of ``allowed``."""
    if value not in allowed:
        raise error(f"`{name}` can be {', '.join(repr(a) for a in allowed)}; got {value!r}.")
    return value


def whole(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    noun: str | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """``value`` as an ``int``; booleans, floats and values below ``low`` or above ``high`` are refused.

    ``noun`` says what is expected ("a positive number of bytes"); by default "an integer", with
    ``>= low`` where there is a bound. A value above ``high`` is told "an integer <= high".
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or (low is not None and value < low)
    ):
        what = noun or ("an integer" if low is None else f"an integer >= {low}")
        raise error(f"`{name}` must be {what}, got {value!r}.")
    if high is not None and value > high:
        raise error(f"`{name}` must be an integer <= {high}, got {value!r}.")
    return int(value)


def number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    below: float | None = None,
    noun: str | None = None,
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a ``float``: a real number (not a boolean), ``> 0`` with ``positive``, ``< below``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    ok = ok and (not positive or float(value) > 0) and (below is None or float(value) < below)
    if not ok:
        raise error(
            f"`{name}` must be {noun or ('a number > 0' if positive else 'a number')}, got {value!r}."
        )
    return float(value)


def a_callable(name: str, fn: Any, takes: str = "a batch", error: type[Exception] = ValueError) -> Any:
    """``fn`` when it is ``None`` or callable."""
    if fn is not None and not callable(fn):
        raise error(f"`{name}` must be a callable taking {takes}, got {type(fn).__name__}.")
    return fn


def a_path(name: str, value: Any, error: type[Exception] = ValueError) -> str:
    """``value`` as a string: a non-empty path or URL."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise error(f"`{name}` must be a non-empty path or URL, got {value!r}.")
    return os.fspath(value)


def an_iterable(name: str, value: Any, noun: str, error: type[Exception] = ValueError) -> Any:
    """``value`` when it is ``None`` or iterable; ``noun`` says what is expected ("a DataLoader")."""
    if value is not None and not hasattr(value, "__iter__"):
        raise error(f"`{name}` must be {noun}, got {type(value).__name__}.")
    return value


def yaml_problem(path: str | os.PathLike, exc: Exception) -> str:
    """What a ``yaml.YAMLError`` found in ``path``, with the file and the line (1-based) where it
    has a mark: a tag ``safe_load`` refuses, or a syntax error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{os.fspath(path)!r}{where}: {what} (read with yaml.safe_load, which builds no Python objects)"
