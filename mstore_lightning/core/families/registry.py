"""The extractor registry: per-layer-family rules for per-sample gradients.

An extractor knows, for one family of modules, what the forward hook keeps (the *prefix*, usually the
layer input), how the output gradient (the *suffix*) combines with it into per-sample gradients, and
how to compute inner products of those gradients directly on the stored factors. Everything a reader
needs is in the layer's JSON ``hyper`` dict, so restoring never needs the model.

Rows passed to the read-side methods carry a *uses* axis after the batch axis: a module called ``U``
times in one forward stores ``U`` prefixes and suffixes per sample, and its gradient is their sum.

Example:
    >>> import torch.nn as nn
    >>> find_extractor(nn.Linear(3, 2)).kind
    'linear'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

Hyper = dict[str, Any]
Rows = dict[str, Tensor]

_REGISTRY: dict[type, type[Extractor]] = {}
_BY_KIND: dict[str, type[Extractor]] = {}
_DUCK: list[tuple[Callable[[nn.Module], bool], type[Extractor]]] = []


class Extractor(ABC):
    """Base class of the per-family rules. Subclasses are stateless and used through the class."""

    kind: ClassVar[str]
    #: whether the family has a factor form cheaper to analyse than its full gradient
    has_factors: ClassVar[bool] = True

    # ----------------------------------------------------------- setup (has the module)
    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        """JSON hyperparameters that the read side needs."""
        return {}

    @classmethod
    def param_names(cls, module: nn.Module) -> list[str]:
        """Names of the module's own parameters this extractor covers."""
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why this module instance cannot be captured exactly, or ``None``."""
        return None

    # ----------------------------------------------------------- capture (hot path)
    #: whether :meth:`prefix` takes the module too (its state at the call: BatchNorm's statistics);
    #: extractors written for two arguments keep working
    prefix_takes_module: ClassVar[bool] = False

    @classmethod
    def prefix(cls, hyper: Hyper, inputs: tuple[Any, ...]) -> Tensor:
        """What the forward hook keeps; rows along dim 0."""
        return inputs[0].detach()

    @classmethod
    def factor_rows(cls, hyper: Hyper, a: Tensor, d: Tensor) -> Rows:
        """Arrays stored in the factor representation, for a ``(B, U, ...)`` stack of uses."""
        return {"a": a, "d": d}

    # Ways to form full per-sample gradients on the training thread; the capture times each on its
    # first batch and keeps the fastest.
    full_methods: ClassVar[tuple[str, ...]] = ("restore",)

    @classmethod
    def full_rows(
        cls, hyper: Hyper, params: list[str], a: Tensor, d: Tensor, method: str = "restore"
    ) -> Rows:
        """Per-sample gradients ``{param: (B, *shape)}`` from ``(B, U, ...)`` factors, formed by
        ``method`` (one of :attr:`full_methods`)."""
        return cls.restore(hyper, params, {"a": a, "d": d})

    @classmethod
    def prefix_is_index(cls) -> bool:
        """Whether the prefix holds integer ids (stored as int64) rather than numbers."""
        return False

    # ----------------------------------------------------------- read side (no module)
    @classmethod
    @abstractmethod
    def restore(cls, hyper: Hyper, params: list[str], rows: Rows) -> Rows:
        """Per-sample gradients ``{param: (B, *shape)}`` from factor rows ``{"a", "d"}``."""

    @classmethod
    def gram(cls, hyper: Hyper, params: list[str], x: Rows, y: Rows) -> Tensor:
        """``(n, m)`` inner products of the per-sample gradients of factor rows ``x`` and ``y``.

        This fallback restores the gradients; families with a cheaper factor identity override it.
        """
        gx, gy = cls.restore(hyper, params, x), cls.restore(hyper, params, y)
        return sum(flat_gram(gx[p], gy[p]) for p in params)

    @classmethod
    def sqnorm(cls, hyper: Hyper, params: list[str], x: Rows) -> Tensor:
        """``(n,)`` squared norms of the per-sample gradients of factor rows ``x``."""
        gx = cls.restore(hyper, params, x)
        return sum(gx[p].reshape(gx[p].shape[0], -1).double().pow(2).sum(1) for p in params)

    # ----------------------------------------------------------- the input as a point (read side)
    @classmethod
    def input_width(cls, hyper: Hyper, a_shape: list[int]) -> int:
        """The width of :meth:`input_features` for stored prefixes of row shape ``a_shape``."""
        return int(a_shape[-1])

    @classmethod
    def input_features(cls, hyper: Hyper, a: Tensor) -> Tensor:
        """``(n, width)``: each sample's stored prefix ``a (n, U, ..., I)`` as one point, for finding
        the samples nearest it.

        By default the mean over uses and positions: a sequence is read as a set of token features,
        pooled as a sentence embedding pools them.
        """
        return a.float().reshape(a.shape[0], -1, a.shape[-1]).mean(1)


def register(*module_types: type) -> Callable[[type[Extractor]], type[Extractor]]:
    """Class decorator: registers an extractor for module types (subclasses match too)."""

    def deco(cls: type[Extractor]) -> type[Extractor]:
        for t in module_types:
            _REGISTRY[t] = cls
        _BY_KIND[cls.kind] = cls
        return cls

    return deco


def register_duck(predicate: Callable[[nn.Module], bool]) -> Callable[[type[Extractor]], type[Extractor]]:
    """Class decorator: registers an extractor for modules recognised by ``predicate``."""

    def deco(cls: type[Extractor]) -> type[Extractor]:
        _DUCK.append((predicate, cls))
        _BY_KIND[cls.kind] = cls
        return cls

    return deco


def find_extractor(module: nn.Module) -> type[Extractor] | None:
    """The extractor for ``module``: exact type first, then the nearest registered base class."""
    _load_builtin()
    for t in type(module).__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    for predicate, cls in _DUCK:
        if predicate(module):
            return cls
    return None


def extractor_for_kind(kind: str) -> type[Extractor]:
    _load_builtin()
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise KeyError(f"No extractor of kind {kind!r}; known kinds are {sorted(_BY_KIND)}.") from None


def _load_builtin() -> None:
    # Imported lazily: the family modules import this one to register themselves.
    from mstore_lightning.core.families import (  # noqa: F401
        attention,
        batchnorm,
        broadcast,
        conv,
        embedding,
        gpt2_conv1d,
        linear,
        norm,
    )


def flat_gram(x: Tensor, y: Tensor) -> Tensor:
    """Inner products of rows flattened after dim 0, in float32 or wider."""
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype) @ y.to(dtype).T
