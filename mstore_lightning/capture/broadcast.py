"""Capturing raw ``Parameter``s of batch size 1 that a module's forward broadcasts over the batch.

A ViT adds its position table to every sample's tokens and prepends its class token to each: the
parameter's gradient sums the samples', but the broadcast's *output* gradient keeps them apart. While
a capture is active, the owning module runs under a torch function mode (see
``attention.Routed``) that watches those parameters. Each ``p.expand(B, ...)`` and each ``x + p``
(either side) whose result has the batch's rows hands that result to the capture; sample ``i``'s
gradient is row ``i`` of its gradient, summed over the axes the broadcast widened.

Any other use of the parameter that yields a tensor with a gradient (``p * x``, a slice, an
interpolation) would carry part of its gradient past the watch, so it stops the capture of that
parameter: reported on the first batch, an error after (see :class:`Watch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

# Operations whose result is the parameter broadcast over the batch, gradient for gradient.
_EXPAND = {Tensor.expand}
_ADD = {Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add}


def virtual_layers(module: nn.Module) -> list[dict[str, Any]]:
    """A layer for each of ``module``'s own trainable parameters of batch size 1 (``(1, ...)``, two
    axes or more), in the form of ``attention.virtual_layers``; one sample's gradient has the
    parameter's shape less its first axis."""
    return [
        {
            "suffix": n,
            "role": n,
            "kind": "broadcast",
            "hyper": {"params_of": {n: n}},
            "params": [n],
            "param_shapes": {n: list(p.shape[1:])},
            "covers": [n],
        }
        for n, p in module.named_parameters(recurse=False)
        if p.requires_grad and p.dim() >= 2 and p.shape[0] == 1
    ]


class Watch(TorchFunctionMode):
    """Hands each broadcast of the watched parameters to ``feed(name, result, param)``; an other use
    goes to ``other(name, op)``."""

    def __init__(
        self, params: dict[str, nn.Parameter], feed: Callable[..., None], other: Callable[[str, str], None]
    ) -> None:
        super().__init__()
        self.params, self.feed, self.other = params, feed, other

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if not isinstance(result, Tensor) or not result.requires_grad:
            return result
        for name, p in self.params.items():
            if not any(a is p for a in args):
                continue
            if (func in _EXPAND or func in _ADD) and result.dim() == p.dim() and result.shape[0] > 1:
                self.feed(name, result, p)
            else:
                self.other(name, getattr(func, "__name__", repr(func)))
        return result


def per_sample(grad: Tensor, shape: torch.Size) -> Tensor:
    """Row ``i`` of a broadcast's output gradient, summed over the axes where ``shape`` is 1."""
    dims = [k for k in range(1, grad.dim()) if shape[k] == 1 and grad.shape[k] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad
