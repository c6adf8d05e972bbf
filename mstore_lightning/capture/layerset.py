"""The layers a run captures: their plans, the hooks on them, what is not captured, what is recomputed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mstore_lightning.capture import choice
from mstore_lightning.capture.coupling import coupled_layers, is_training_batch_norm
from mstore_lightning.capture.hooks import HookManager, refuse_compiled
from mstore_lightning.capture.layers import (
    LayerPlan,
    misused_record,
    not_per_sample,
    not_per_sample_record,
    samples_seen,
    select_layers,
)
from mstore_lightning.config import CapturePolicy, PolicyError
from mstore_lightning.store import layout
from mstore_lightning.store.session import RunWriter, check_layer_storage


class LayerSet:
    """The captured layers of a model, by module name, with the hooks that collect their factors.

    Args:
        warn: ``warn(message)`` for selected parameters that are not captured.

    Attributes:
        plans: the captured layers by module name.
        uncovered: selected parameters that are not captured, each with its reason.
        recompute: store-or-recompute decisions by layer (see :mod:`.recompute`).
        hooks: the forward and output-gradient hooks on the planned layers.
        stored: the layer specs of the existing store this run writes into (empty for a new store):
            a layer's storage chosen at its first batch must match them (see :meth:`samples`).
    """

    def __init__(self, warn: Callable[[str], Any]) -> None:
        self.plans: dict[str, LayerPlan] = {}
        self.uncovered: list[dict] = []
        self.recompute: dict[str, dict[str, Any]] = {}
        self.hooks = HookManager()
        self.stored: dict[str, dict[str, Any]] = {}
        self._store_uri = ""
        self._policy: CapturePolicy | None = None
        self._warn = warn
        # Timings differ between processes; the processes of a distributed run must store alike.
        self.route_by_cost = True

    def select(self, model: nn.Module, policy: CapturePolicy) -> None:
        """Plans ``model``'s layers by ``policy`` and attaches hooks to them (afresh each time).

        Raises:
            PolicyError: the policy selects no layer that can be captured.
            RuntimeError: ``model`` is compiled.
        """
        refuse_compiled(model)
        self._policy = policy
        self.plans, self.uncovered = select_layers(model, policy)
        if self.uncovered:
            self._warn(uncovered_summary(self.uncovered, self.plans))
        if not self.plans:
            raise PolicyError(
                f"The policy's layers {list(policy.layers)} select no layer that can be captured; "
                "see the warnings above for why."
            )
        self.hooks.detach()  # a second fit attaches afresh
        norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        self.hooks.attach(self.plans, norms)
        self.hooks.keep_graph = bool(norms)
        self.recompute = {
            n: {"decision": "recompute", "why": "policy recompute.layers"}
            for n, p in self.plans.items()
            if policy.always_recomputed(n, type(p.module).__name__)
        }

    def recomputed(self) -> set[str]:
        """Layers decided to be recomputed rather than stored."""
        return {n for n, d in self.recompute.items() if d["decision"] == "recompute"}

    def ready(self) -> dict[str, LayerPlan]:
        """The plans whose representation is chosen (after their first captured batch)."""
        return {n: p for n, p in self.plans.items() if p.ready}

    def open_fields(self) -> dict[str, dict[str, Any]]:
        """Each layer's spec fields known before its first batch, checked against an existing store."""
        return {
            n: {"module_type": type(p.module).__name__, "param_shapes": p.param_shapes}
            for n, p in self.plans.items()
        }

    def use_store(self, uri: str, stored: dict[str, dict[str, Any]]) -> None:
        """Records the specs of the existing store this run writes into (``{}``: a new store)."""
        self._store_uri, self.stored = uri, dict(stored)

    def specs(self) -> dict[str, dict[str, Any]]:
        """The JSON specs of the ready layers, as the run metadata records them."""
        return {n: p.spec() for n, p in self.plans.items() if p.ready}

    def run_meta(
        self, policy: CapturePolicy, model_name: str, world_size: int, versions: dict[str, str]
    ) -> dict[str, Any]:
        """The run's metadata: the policy, these layers, and ``versions`` of the driving framework."""
        import numcodecs
        import zarr

        return {
            "schema_version": layout.SCHEMA_VERSION,
            "policy": policy.to_dict(),
            "loss_reduction": policy.loss_reduction,
            "model": model_name,
            "model_layers": {n: type(p.module).__name__ for n, p in self.plans.items()},
            "layers": self.specs(),
            "uncovered": self.uncovered,
            "recompute": self.recompute,
            "world_size": world_size,
            "versions": {
                "mstore_lightning": _version(),
                "torch": torch.__version__,
                **versions,
                "zarr": zarr.__version__,
                "numcodecs": numcodecs.__version__,
            },
        }

    def samples(self, uses: dict[str, list], run: RunWriter) -> int:
        """The batch's sample count; layers that did not see it row by row leave ``uses`` and the plans.

        Such a layer (an input shared by the batch, broadcast after the layer) is reported as uncovered
        the first time; one that was captured per sample before cannot be dropped without holes.
        """
        n = samples_seen(uses)
        for name, op in list(self.hooks.misused.items()):
            uses.pop(name, None)
            plan = self.plans.pop(name, None)
            if plan is None:
                continue
            if plan.ready:
                raise RuntimeError(
                    f"{plan.name} was broadcast over the batch in earlier batches, but this batch also used it "
                    f"through {op}, which the capture cannot split by sample; capture needs every batch to "
                    "use it the same way."
                )
            record = misused_record(plan, op)
            self.uncovered.append(record)
            self._warn_uncovered(record)
            run.update_meta(uncovered=self.uncovered)
        self.hooks.misused.clear()
        for name, rows in not_per_sample(uses, n).items():
            del uses[name]
            plan = self.plans.get(name)
            if plan is None:
                continue  # dropped at an earlier batch
            if plan.ready:
                raise RuntimeError(
                    f"Layer {name!r} saw {rows} row(s) in a batch of {n} samples, but one row per sample in "
                    "earlier batches; capture needs every batch to feed it one row per sample."
                )
            del self.plans[name]
            self.recompute.pop(name, None)
            record = not_per_sample_record(plan, rows, n)
            self.uncovered.append(record)
            self._warn_uncovered(record)
            run.update_meta(uncovered=self.uncovered)
        return n

    def finalize(self, uses: dict[str, list], write_rate: float | None = None) -> list[LayerPlan]:
        """Chooses the storage of each layer that sees its first batch, before any row of the batch
        is written; in an existing store it must be what the store's spec of the layer says.

        ``write_rate`` (the writer's bytes per second) lets ``representation="auto"`` weigh each
        exact form's measured cost (see :meth:`LayerPlan.finalize`); only where :attr:`route_by_cost`.

        Returns:
            The layers made ready by this batch.

        Raises:
            IncompatibleStoreError: a layer would store another representation, encoding or shape.
        """
        ready = []
        for name, plan in self.plans.items():
            if plan.ready or not uses.get(name):
                continue
            stored = self.stored.get(name, {}).get("representation")
            plan.broadcast = name in self.hooks.broadcast
            plan.finalize(
                uses[name],
                self._policy,
                not self.hooks.input_requires_grad.get(name, True),
                write_rate if self.route_by_cost else None,
                follow=stored,
            )
            ready.append(plan)
        if ready:
            self._fit_budget(ready)
            self._mark_coupled(ready)
        for plan in ready:
            if plan.name in self.stored:
                check_layer_storage(self._store_uri, plan.name, self.stored[plan.name], plan.spec())
        return ready

    def _fit_budget(self, ready: list[LayerPlan]) -> None:
        """Projects the largest of ``ready`` while the whole capture is over ``budget.bytes_per_sample``.

        Layers ready before, layers an existing store holds, and forced representations stay as chosen.
        """
        total = (self._policy.budget or {}).get("bytes_per_sample")
        if total is None:
            return
        free = self._policy.representation == "auto"
        adjustable = {
            p.name: p
            for p in ready
            if free and p.name not in self.stored and p.representation != "projection"
        }
        sizes = {n: p.choice["bytes_per_sample"] for n, p in adjustable.items()}
        fixed = sum(
            p.choice["bytes_per_sample"] for p in self.plans.values() if p.ready and p.name not in adjustable
        )
        picks = choice.fit_total(sizes, {n: p.projections for n, p in adjustable.items()}, fixed, total)
        for name, cand in picks.items():
            adjustable[name].project(
                cand,
                f"whole-capture budget {total:,} B/sample: the largest layers are projected, largest "
                f"first, until the capture fits (exact: {sizes[name]:,} B)",
            )
        after = fixed + sum(p.choice["bytes_per_sample"] for p in adjustable.values())
        if picks:
            self._warn(
                f"GradientCapture: the exact rows would take {fixed + sum(sizes.values()):,} B a sample, over "
                f"the budget of {total:,}; {len(picks)} layer(s) are stored as seeded projections "
                f"({', '.join(list(picks)[:4])}{' ...' if len(picks) > 4 else ''}), {after:,} B a sample in all, "
                f"with the predicted errors describe() shows. budget=None keeps every layer exact."
            )

    def _mark_coupled(self, ready: list[LayerPlan]) -> None:
        """Records which of ``ready`` BatchNorm in training mode couples, from the batch's graph,
        and says so once."""
        layer_nodes, norm_nodes = self.hooks.graph
        self.hooks.graph = ({}, {})
        if not self.hooks.keep_graph:
            return
        names = {p.name for p in ready}
        training = {p.name for p in ready if is_training_batch_norm(p.module)}
        coupled = coupled_layers({n: v for n, v in layer_nodes.items() if n in names}, norm_nodes, training)
        for plan in ready:
            plan.batch_coupled = coupled.get(plan.name, [])
        self.hooks.keep_graph = any(not p.ready for p in self.plans.values())
        if coupled:
            bns = sorted({b for v in coupled.values() for b in v})
            self._warn(
                f"GradientCapture: {len(coupled)} captured layer(s) have rows coupled by BatchNorm in "
                f"training mode ({', '.join(bns[:5])}{' ...' if len(bns) > 5 else ''}): "
                f"{', '.join(list(coupled)[:8])}{' ...' if len(coupled) > 8 else ''}. Batch statistics mix "
                "the samples, so their rows sum to the batch gradient but are not each sample's own; "
                "describe() and every result from them say so. For per-sample gradients, use GroupNorm "
                "or LayerNorm, or BatchNorm in eval mode (frozen statistics, as in fine-tuning)."
            )

    def _warn_uncovered(self, u: dict) -> None:
        self._warn(
            f"GradientCapture does not capture {u['module']} ({u['type']}) parameters {u['params']} "
            f"({u['numel']} numbers): {u['reason']}. They are recorded as uncovered in the store."
        )


def uncovered_summary(uncovered: list[dict], plans: dict[str, LayerPlan]) -> str:
    """One message for every selected parameter not captured: grouped by module type and reason,
    with counts, sizes and the share of the selected parameters."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for u in uncovered:
        groups.setdefault((u["type"], u["reason"]), []).append(u)
    missing = sum(u["numel"] for u in uncovered)
    captured = sum(math.prod(s) for p in plans.values() for s in p.param_shapes.values())
    share = missing / max(1, missing + captured)
    head = (
        f"GradientCapture does not capture {missing:,} of the {missing + captured:,} selected parameter "
        f"numbers ({share:.1%}), in {len(uncovered)} module(s):"
    )
    lines = [head]
    for (kind, reason), us in sorted(groups.items(), key=lambda g: -sum(u["numel"] for u in g[1])):
        names = ", ".join(u["module"] or "(the model)" for u in us[:3]) + (" ..." if len(us) > 3 else "")
        params = sorted({p for u in us for p in u["params"]})
        numel = sum(u["numel"] for u in us)
        lines.append(f"  - {kind} x{len(us)} ({names}; {', '.join(params)}; {numel:,} numbers): {reason}")
    lines.append("They are recorded as uncovered in the store: store.uncovered and describe() list them all.")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mstore-lightning")
    except PackageNotFoundError:
        return "unknown"
