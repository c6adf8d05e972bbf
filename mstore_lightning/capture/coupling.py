"""Which captured layers' rows are batch-coupled by BatchNorm in training mode.

A BatchNorm in training mode normalises by the batch's statistics, so the gradient flowing back
through it mixes the samples' losses: the output gradient of every layer below it carries other
samples' terms. Such a layer's rows still sum to the batch gradient, but row ``i`` is not sample
``i``'s own gradient. A BatchNorm's own affine rows depend on the others' inputs through ``x̂``.

The capture finds them on the first captured batch's autograd graph: a layer is coupled when its
output's node is reachable, walking from the outputs towards the inputs, from the output node of a
training-mode BatchNorm (or SyncBatchNorm) call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn


def is_training_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def reachable(starts: Iterable[Any]) -> set[Any]:
    """The autograd nodes reachable from ``starts``' inputs (the nodes themselves excluded)."""
    seen: set[Any] = set()
    stack = [fn for node in starts for fn, _ in node.next_functions if fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return seen


def coupled_layers(
    layer_nodes: Mapping[str, list[Any]],
    norm_nodes: Mapping[str, list[Any]],
    training_norms: Iterable[str] = (),
) -> dict[str, list[str]]:
    """``{layer: [BatchNorm names]}`` of the layers whose output gradient passes through a
    training-mode BatchNorm, from one batch's graph.

    Args:
        layer_nodes: each captured layer's output nodes (``output.grad_fn`` of its calls).
        norm_nodes: each training-mode BatchNorm's output nodes.
        training_norms: captured layers that are themselves training-mode BatchNorms: coupled by
            their own statistics.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> lin, bn = torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)
        >>> h = lin(x); y = bn(h)
        >>> coupled_layers({"lin": [h.grad_fn]}, {"bn": [y.grad_fn]})
        {'lin': ['bn']}
    """
    below = {bn: reachable(nodes) for bn, nodes in norm_nodes.items()}
    out: dict[str, list[str]] = {}
    for layer, nodes in layer_nodes.items():
        bns = [bn for bn, seen in below.items() if bn != layer and any(n in seen for n in nodes)]
        if layer in training_norms:
            bns.insert(0, layer)
        if bns:
            out[layer] = bns
    return out
