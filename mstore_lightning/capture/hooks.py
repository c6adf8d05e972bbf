"""Forward hooks plus output-gradient hooks that pair each layer call's input with its gradient.

A use is kept only when its output gradient arrives. That one rule makes activation checkpointing
safe both ways: a non-reentrant re-run's outputs never receive gradient (so it is not counted twice),
and a reentrant re-run is the only forward with grad enabled (so it is counted once). State lives
here, never on the user's modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mstore_lightning.capture.layers import LayerPlan


class _Use:
    __slots__ = ("a", "d", "order")

    def __init__(self, a: Tensor, order: int) -> None:
        self.a, self.d, self.order = a, None, order

    def set_grad(self, grad: Tensor) -> None:
        grad = grad.detach()
        self.d = grad if self.d is None else self.d + grad


class HookManager:
    """Attaches to the planned layers and collects ``(prefix, output gradient)`` per call.

    Hooks do nothing unless :attr:`active` is set, grad is enabled and the output requires grad, so
    validation, inference and frozen layers cost nothing.
    """

    def __init__(self) -> None:
        self.active = False
        self._handles: list[RemovableHandle] = []
        self._pending: dict[str, list[_Use]] = {}
        self._order = 0
        # Whether a layer's input depends on a trained parameter; an input that does not is a
        # function of the data alone, so its rows can repeat (deduplication looks only at those).
        self.input_requires_grad: dict[str, bool] = {}
        # While set, each call's output node is kept (planned layers, and training-mode BatchNorms):
        # the first batch's graph shows which layers BatchNorm couples (see capture.coupling).
        self.keep_graph = False
        self.layer_nodes: dict[str, list[Any]] = {}
        self.norm_nodes: dict[str, list[Any]] = {}
        self.graph: tuple[dict[str, list[Any]], dict[str, list[Any]]] = ({}, {})  # as of the last take

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, plans: Mapping[str, LayerPlan], norms: Mapping[str, nn.Module] | None = None) -> None:
        """Hooks ``plans``' modules; and ``norms`` (BatchNorms) to see which layers they couple."""
        if self._handles:
            raise RuntimeError("Hooks are already attached; detach them before attaching again.")
        for name, plan in plans.items():
            self._pending[name] = []
            self._handles.append(plan.module.register_forward_hook(self._forward_hook(name, plan)))
        for name, module in (norms or {}).items():
            self._handles.append(module.register_forward_hook(self._norm_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.discard()
        self.active = False

    def take(self) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """The calls whose gradient arrived since the last take, per layer in forward order.

        The output nodes kept with :attr:`keep_graph` move to :attr:`graph` (the last batch's only)."""
        out = {}
        for name, uses in self._pending.items():
            fired = sorted((u for u in uses if u.d is not None), key=lambda u: u.order)
            out[name] = [(u.a, u.d) for u in fired]
        self.graph = (dict(self.layer_nodes), dict(self.norm_nodes))
        self.discard()
        return out

    def discard(self) -> None:
        for uses in self._pending.values():
            uses.clear()
        self._order = 0
        self.layer_nodes.clear()
        self.norm_nodes.clear()

    def _forward_hook(self, name: str, plan: LayerPlan) -> Any:
        pending = self._pending[name]
        extractor, hyper = plan.extractor, plan.hyper
        takes_module = extractor.prefix_takes_module

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            self.input_requires_grad[name] = any(isinstance(t, Tensor) and t.requires_grad for t in inputs)
            a = extractor.prefix(hyper, inputs, module) if takes_module else extractor.prefix(hyper, inputs)
            use = _Use(a, self._order)
            self._order += 1
            pending.append(use)
            output.register_hook(use.set_grad)
            if self.keep_graph:
                self.layer_nodes.setdefault(name, []).append(output.grad_fn)

        return hook

    def _norm_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            keep = self.keep_graph and self.active and module.training and isinstance(output, Tensor)
            if keep and output.grad_fn is not None:
                self.norm_nodes.setdefault(name, []).append(output.grad_fn)

        return hook


def refuse_compiled(model: nn.Module) -> None:
    """Raises ``RuntimeError`` for a ``torch.compile``'d model, on which hooks cannot capture."""
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = getattr(model, "_compiler_ctx", None) is not None or any(
        isinstance(m, OptimizedModule) for m in model.modules()
    )
    if compiled:
        raise RuntimeError(
            "GradientCapture cannot capture a torch.compile'd model: hooks added after compilation are "
            "ignored and output-gradient hooks break graphs, so captured gradients could be wrong or "
            "missing. Train without torch.compile while capturing."
        )
