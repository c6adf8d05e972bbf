"""Names a package imports on first use (PEP 562), so that importing it stays cheap.

Example:
    >>> import types
    >>> demo = types.ModuleType("demo")
    >>> demo.__getattr__ = lazy_names("demo", {"dumps": "json"})
    >>> demo.dumps([1])
    '[1]'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name of ``where`` from its module (``{name:
    module}``) when first asked for, and keeps it on the package."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        module = sys.modules.get(package)
        if module is not None:
            setattr(module, name, value)
        return value

    return __getattr__
