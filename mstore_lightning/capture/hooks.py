"""Forward hooks plus output-gradient hooks that pair each layer call's input with its gradient.

A use is kept only when its output gradient arrives. That one rule makes activation checkpointing
safe both ways: a non-reentrant re-run's outputs never receive gradient (so it is not counted twice),
and a reentrant re-run is the only forward with grad enabled (so it is counted once). State lives
here, never on the user's modules; the one thing set on a module, the capture-time forward of an
attention module or of one with broadcast parameters (``attention.Routed``), goes with the hooks.

Layers that module hooks cannot see are fed by their owner: ``nn.MultiheadAttention`` (its routed
forward), ``nn.LSTM``/``nn.GRU`` (a forward hook and a re-run, ``capture.recurrent``) and raw
parameters broadcast over the batch (``capture.broadcast``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mstore_lightning.capture import attention, broadcast, recurrent
from mstore_lightning.capture.layers import LayerPlan


class _Use:
    """One call: its prefix, and the gradients of its ``parts`` outputs, made into ``d`` by ``combine``."""

    __slots__ = ("a", "combine", "grads", "order")

    def __init__(self, a: Tensor, order: int, parts: int = 1, combine: Callable | None = None) -> None:
        self.a, self.order, self.grads, self.combine = a, order, [None] * parts, combine

    def hook(self, part: int = 0) -> Callable[[Tensor], None]:
        def set_grad(grad: Tensor) -> None:
            grad, g = grad.detach(), self.grads[part]
            self.grads[part] = grad if g is None else g + grad

        return set_grad

    @property
    def fired(self) -> bool:
        return any(g is not None for g in self.grads)

    def resolved(self) -> tuple[Tensor, Tensor]:
        """``(a, d)``: ``d`` made from the outputs' gradients, then ``a`` (which may be computed
        from them: a recurrent module's re-run)."""
        d = self.grads[0] if self.combine is None else self.combine(self.grads)
        return (self.a() if callable(self.a) else self.a), d


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
        # The batch's sample count, when the caller knows it before the forward (its ids); else the
        # rows of the forward's first captured call. A position table looked up once for the batch
        # is expanded to it (see _forward_hook).
        self.batch_rows: int | None = None
        self._rows_seen: int | None = None
        self.broadcast: set[str] = set()  # layers whose single-row output was expanded to the batch
        # Broadcast parameters used in a way the capture cannot split by sample: layer -> the op.
        self.misused: dict[str, str] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, plans: Mapping[str, LayerPlan], norms: Mapping[str, nn.Module] | None = None) -> None:
        """Hooks ``plans``' modules; and ``norms`` (BatchNorms) to see which layers they couple."""
        if self._handles:
            raise RuntimeError("Hooks are already attached; detach them before attaching again.")
        fed: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for name, plan in plans.items():
            self._pending[name] = []
            if plan.owner is not None:  # fed by its owner: attention, recurrent or broadcast capture
                fed.setdefault(id(plan.owner), (plan.owner, {}))[1][plan.role] = name
            else:
                self._handles.append(plan.module.register_forward_hook(self._forward_hook(name, plan)))
        for owner, roles in fed.values():
            if isinstance(owner, nn.RNNBase):
                hook = self._recurrent_hook(roles)
                self._handles.append(owner.register_forward_hook(hook, with_kwargs=True))
            elif isinstance(owner, nn.MultiheadAttention):
                self._handles.append(attention.Routed.attention(owner, _AttentionFeed(self, roles)))
            else:  # raw parameters broadcast over the batch
                self._handles.append(self._watch(owner, roles))
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
            fired = sorted((u for u in uses if u.fired), key=lambda u: u.order)
            out[name] = [u.resolved() for u in fired]
        self.graph = (dict(self.layer_nodes), dict(self.norm_nodes))
        self.discard()
        return out

    def discard(self) -> None:
        for uses in self._pending.values():
            uses.clear()
        self._order = 0
        self._rows_seen = None
        self.layer_nodes.clear()
        self.norm_nodes.clear()

    def _forward_hook(self, name: str, plan: LayerPlan) -> Any:
        extractor, hyper = plan.extractor, plan.hyper
        takes_module = extractor.prefix_takes_module
        expands = extractor.kind == "embedding"

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Tensor | None:
            if not self.capturing():
                return None
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            self.input_requires_grad[name] = any(isinstance(t, Tensor) and t.requires_grad for t in inputs)
            a = extractor.prefix(hyper, inputs, module) if takes_module else extractor.prefix(hyper, inputs)
            rows = self.batch_rows or self._rows_seen
            if rows is None:
                self._rows_seen = rows = output.shape[0]
            if output.shape[0] == 1 < rows and a.shape[0] == 1 and expands:
                # Ids shared by the batch (position ids of shape (1, T)): the output is broadcast
                # after the layer, so expanding it here (a view) changes no value downstream, and its
                # gradient arrives per sample instead of summed.
                output, a = output.expand(rows, *output.shape[1:]), a.expand(rows, *a.shape[1:])
                self.broadcast.add(name)
                self.add_use(name, a, [output])
                return output
            self.add_use(name, a, [output])
            return None

        return hook

    def capturing(self) -> bool:
        """Whether a forward now is captured: the hooks are on and grad is enabled."""
        return self.active and torch.is_grad_enabled()

    def add_use(self, name: str, a: Tensor, outputs: list[Tensor], combine: Callable | None = None) -> None:
        """Records one call of layer ``name``: prefix ``a``, and a hook on each output's gradient."""
        use = _Use(a, self._order, len(outputs), combine)
        self._order += 1
        self._pending[name].append(use)
        for part, out in enumerate(outputs):
            if not out.requires_grad:
                continue
            out.register_hook(use.hook(part))
            if self.keep_graph:
                self.layer_nodes.setdefault(name, []).append(out.grad_fn)

    def _watch(self, owner: nn.Module, roles: dict[str, str]) -> attention.Routed:
        params = {n: getattr(owner, n) for n in roles}

        def feed(param: str, result: Tensor, p: Tensor) -> None:
            name = roles[param]
            self.input_requires_grad[name] = False
            ones = result.new_ones((result.shape[0], 1))
            self.add_use(name, ones, [result], lambda grads: broadcast.per_sample(grads[0], p.shape))

        def other(param: str, op: str) -> None:
            self.misused.setdefault(roles[param], op)

        return attention.Routed(owner, self.capturing, lambda: broadcast.Watch(params, feed, other))

    def _recurrent_hook(self, roles: dict[str, str]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self.capturing():
                return
            x, hx = args[0], args[1] if len(args) > 1 else kwargs.get("hx")
            if not isinstance(x, Tensor) or x.dim() != 3:
                raise RuntimeError(
                    f"GradientCapture captures {type(module).__name__} on padded, batched tensors; this call "
                    f"got {type(x).__name__ if not isinstance(x, Tensor) else f'a {x.dim()}-D tensor'}. Pad "
                    "the sequences (torch.nn.utils.rnn.pad_packed_sequence), or leave the module out of "
                    "the policy's layers."
                )
            out, state = output
            outs = [out, *(state if isinstance(state, tuple) else (state,))]
            if not any(o.requires_grad for o in outs):
                return
            call = recurrent.Call(module, x, hx)
            for role, name in roles.items():
                self.input_requires_grad[name] = role.startswith("hh") or x.requires_grad
                self.add_use(
                    name,
                    lambda role=role: call.rows(role, [])[0],
                    [o for o in outs],
                    lambda grads, role=role: call.rows(role, grads)[1],
                )

        return hook

    def _norm_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            keep = self.keep_graph and self.active and module.training and isinstance(output, Tensor)
            if keep and output.grad_fn is not None:
                self.norm_nodes.setdefault(name, []).append(output.grad_fn)

        return hook


class _AttentionFeed:
    """Turns the projections :func:`attention.attend` hands over into uses of the planned layers."""

    def __init__(self, hooks: HookManager, roles: dict[str, str]) -> None:
        self.hooks, self.roles = hooks, roles

    def enabled(self) -> bool:
        return self.hooks.capturing()

    def linear(self, role: str, x: Tensor | None, out: Tensor, seq: tuple[int, int] | None = None) -> None:
        name = self.roles.get(role)
        if name is None:
            return
        # Sequence-first (T, N, F) to rows (N, T, F); a bias alone has the input 1. The hook goes on
        # ``out`` itself: a view of it would never receive a gradient.
        shape = (*seq, -1) if seq else out.shape
        a = (
            out.new_ones((shape[1], shape[0], 1))
            if x is None
            else x.detach().view(shape[:2] + (-1,)).transpose(0, 1)
        )
        self.hooks.input_requires_grad[name] = x is not None and x.requires_grad
        self.hooks.add_use(name, a, [out], lambda grads: grads[0].view(shape[:2] + (-1,)).transpose(0, 1))

    def packed(self, inputs: list[Tensor], outputs: list[Tensor], groups: list[list[int]]) -> None:
        name = self.roles.get("in_proj")
        if name is None:
            return
        self.hooks.input_requires_grad[name] = any(x.requires_grad for x in inputs)
        a = attention.packed_inputs(inputs, groups)
        shapes = [x.detach() for x in inputs]
        self.hooks.add_use(name, a, outputs, lambda grads: attention.packed_grads(grads, shapes, groups))


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
