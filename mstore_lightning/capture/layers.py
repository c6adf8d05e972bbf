"""Which layers a policy captures, what each stores, and what is reported as not captured."""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mstore_lightning.capture import attention, broadcast, choice, recurrent
from mstore_lightning.config import CapturePolicy, PolicyError, match_pattern
from mstore_lightning.core import pooling, projection, tensor_codes
from mstore_lightning.core.families.registry import Extractor, extractor_for_kind, find_extractor
from mstore_lightning.core.representation import Representation

ROUTE_MARGIN = 2.0  # a form replaces the size rule's choice only when measured this many times cheaper


@dataclass
class LayerPlan:
    """One captured module: its extractor and, once its first batch is seen, what it stores."""

    name: str
    module: nn.Module
    extractor: type[Extractor]
    hyper: dict[str, Any]
    params: list[str]
    param_shapes: dict[str, list[int]]
    representation: str | None = None
    uses: int = 0
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    choice: dict[str, Any] = field(default_factory=dict)  # what was considered, and why this
    projection: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()  # one use's per-sample input shape, fixed at the first batch
    full_method: str = "restore"  # how full per-sample gradients are formed (the fastest measured)
    # Training-mode BatchNorms its output gradient passes through (see capture.coupling).
    batch_coupled: list[str] = field(default_factory=list)
    # A layer fed by an attention module's capture-time forward (see capture.attention): the module,
    # its name, and which of its projections this layer is.
    # Its ids are shared by the batch and its output broadcast after it: expanded to the batch at capture.
    broadcast: bool = False
    owner: nn.Module | None = None
    owner_name: str | None = None
    role: str | None = None
    _matrices: tuple[Tensor, Tensor] | None = None
    _cands: list[choice.Candidate] = field(default_factory=list)
    _rep: Representation | None = None

    @property
    def ready(self) -> bool:
        return self.representation is not None

    def spec(self) -> dict[str, Any]:
        """JSON description: everything a reader needs, without the model."""
        out = {
            "name": self.name,
            "kind": self.extractor.kind,
            "module_type": type(self.module).__name__,
            "hyper": self.hyper,
            "params": self.params,
            "param_shapes": self.param_shapes,
            "representation": self.representation,
            "uses": self.uses,
            "input_shape": list(self.input_shape),
            "arrays": self.arrays,
            "choice": self.choice,
            "full_method": self.full_method,
        }
        if self.projection is not None:
            out["projection"] = self.projection
        if self.summary:
            out["summary"] = self.summary
        if self.batch_coupled:
            out["batch_coupled"] = list(self.batch_coupled)
        if self.broadcast:
            out["broadcast"] = True
        if self.owner_name is not None:
            out["fed_by"] = {"module": self.owner_name, "role": self.role}
        return out

    @classmethod
    def from_spec(
        cls, spec: dict[str, Any], modules: Mapping[str, nn.Module], extractor: type[Extractor]
    ) -> LayerPlan:
        """The plan a store recorded, bound to its module in ``modules`` (a model's ``named_modules``),
        to recompute its rows.

        Raises:
            KeyError: ``modules`` has no module the layer was captured from.
        """
        fed = spec.get("fed_by")
        owner = modules[fed["module"]] if fed else None
        module = modules[spec["name"]] if spec["name"] in modules or not fed else owner
        plan = cls(
            name=spec["name"],
            module=module,
            extractor=extractor,
            hyper=spec["hyper"],
            params=spec["params"],
            param_shapes=spec["param_shapes"],
            representation=spec["representation"],
            uses=spec["uses"],
            arrays=spec["arrays"],
            choice=spec.get("choice", {}),
            projection=spec.get("projection"),
            summary=spec.get("summary", {}),
            input_shape=tuple(spec["input_shape"]),
            full_method=spec.get("full_method", "restore"),
            batch_coupled=list(spec.get("batch_coupled", [])),
            broadcast=bool(spec.get("broadcast", False)),
            owner=owner,
            owner_name=fed["module"] if fed else None,
            role=fed["role"] if fed else None,
        )
        if plan.projection is not None:
            p = plan.projection
            plan._matrices = projection.projection_matrices(p, plan.name, p["dim_in"], p["dim_out"])
        return plan

    def finalize(
        self,
        uses: list[tuple[Tensor, Tensor]],
        policy: CapturePolicy,
        input_from_data: bool = False,
        write_rate: float | None = None,
        follow: str | None = None,
    ) -> None:
        """Chooses what to store from the first captured batch (see :mod:`.choice`).

        With ``write_rate`` (the writer's bytes per second) and ``policy.representation="auto"``, the
        exact forms within the byte budget are timed on this batch, each formed and encoded the
        fastest way it can be, and the one whose time plus its bytes at ``write_rate`` is least
        replaces the size rule's choice when :data:`ROUTE_MARGIN` times cheaper. Without it (a
        distributed run, whose processes must choose alike) the smaller is kept.
        ``follow`` keeps the representation a store already holds for the layer.

        With ``policy.dedup`` and ``input_from_data`` (no trained parameter feeds the layer input: the
        first layer, or one after frozen layers) the input is marked for deduplication, since its rows
        repeat when the data does. Other inputs and output gradients depend on the current weights and
        never repeat, so hashing them would cost time for nothing.
        """
        self.uses = len(uses)
        self.input_shape = tuple(uses[0][0].shape[1:])
        a0 = _stack([u[0][:1] for u in uses], self.uses)
        d0 = _stack([u[1][:1] for u in uses], self.uses).float()
        pool = policy.pool_for(self.name, type(self.module).__name__) if self.extractor.kind == "conv" else 1
        cands = choice.candidates(
            self.extractor,
            self.hyper,
            self.params,
            self.param_shapes,
            a0,
            d0,
            policy.precision_for(self.name, type(self.module).__name__),
            pool,
            policy.projection_seed,
        )
        chosen, reason = choice.pick(cands, policy.representation, policy.budget, policy.projection_dim)
        exact = [c for c in cands if c.representation in ("factors", "full") and not c.summary]
        costs: dict[str, dict[str, float]] = {}
        if follow is not None and policy.representation == "auto" and chosen in exact:
            chosen = next((c for c in exact if c.representation == follow), chosen)
            reason = f"the store holds this layer as {follow}"
        elif policy.representation == "auto" and chosen in exact and len(exact) > 1 and write_rate:
            max_bytes = (policy.budget or {}).get("layer_bytes_per_sample")
            fits = [c for c in exact if max_bytes is None or c.nbytes <= max_bytes]
            costs = self._costs(fits, uses, write_rate)
            total = {c.representation: costs[c.representation].get("total_ms", math.inf) for c in fits}
            cheapest = min(fits, key=lambda c: total[c.representation])
            # Timings are noisy: near a tie the size rule's choice stands, so that runs agree.
            if (
                chosen not in fits
                or total[cheapest.representation] * ROUTE_MARGIN < total[chosen.representation]
            ):
                reason = f"least measured cost, over {reason}"
                chosen = cheapest
            else:
                reason = f"{reason}; no form measured {ROUTE_MARGIN:g}x cheaper"
        if chosen.representation == "full" and len(self.extractor.full_methods) > 1 and "full" not in costs:
            costs = {**costs, **self._costs([chosen], uses, write_rate or 0.0)}
        self._cands = cands
        self._keep(chosen, reason, policy.dedup and input_from_data)
        if costs:
            self.choice["measured"] = {"write_mb_per_s": round((write_rate or 0) / 1e6, 1), **costs}

    def _keep(self, chosen: choice.Candidate, reason: str, dedup: bool) -> None:
        self.representation, self.arrays = chosen.representation, copy.deepcopy(chosen.arrays)
        self.projection, self.summary = copy.deepcopy(chosen.projection), chosen.summary
        if self.projection is not None:
            self.projection["predicted_error"] = chosen.error
            self._matrices = projection.projection_matrices(
                self.projection, self.name, self.projection["dim_in"], self.projection["dim_out"]
            )
        if dedup and self.representation == "factors" and not self.summary:
            self.arrays["a"]["dedup"] = True
        self.choice = {
            "kept": chosen.describe(),
            "bytes_per_sample": chosen.nbytes,
            "reason": reason,
            "considered": {
                c.describe(): {"bytes": c.nbytes, "error": round(c.error, 4)} for c in self._cands
            },
        }

    @property
    def projections(self) -> list[choice.Candidate]:
        """The projections considered at :meth:`finalize` (empty for a family without one)."""
        return [c for c in self._cands if c.representation == "projection"]

    def project(self, chosen: choice.Candidate, why: str) -> None:
        """Keeps projection ``chosen`` instead of the per-layer choice (a whole-capture budget)."""
        self._keep(chosen, why, False)

    def _costs(
        self, cands: list[choice.Candidate], uses: list[tuple[Tensor, Tensor]], write_rate: float
    ) -> dict[str, dict[str, float]]:
        """Measured cost of each exact candidate on this batch: forming and encoding its rows (for
        full gradients, by each of the family's methods, keeping the fastest in
        :attr:`full_method`), plus writing its bytes at ``write_rate``.

        Candidates go smallest first; one whose writes alone cost more than a cheaper total is not
        formed at all (a full gradient of a wide layer takes as long to form as many steps).
        """
        a = _stack([u[0] for u in uses], len(uses))
        d = _stack([u[1] for u in uses], len(uses)).float()
        out: dict[str, dict[str, float]] = {}
        best = math.inf
        for cand in sorted(cands, key=lambda c: c.nbytes):
            write = cand.nbytes * a.shape[0] / write_rate if write_rate else 0.0
            if write >= best:
                out[cand.representation] = {"write_ms": round(1e3 * write, 3), "skipped": "writes cost more"}
                continue
            methods = self.extractor.full_methods if cand.representation == "full" else ("factors",)
            timed = {}
            for method in methods:

                def form(method: str = method, cand: choice.Candidate = cand) -> None:
                    if method == "factors":
                        rows = self.extractor.factor_rows(self.hyper, a, d)
                    else:
                        rows = self.extractor.full_rows(self.hyper, self.params, a, d, method)
                    for name, values in rows.items():
                        tensor_codes.encode_rows(cand.arrays[name], values)

                timed[method] = _timed(form, a.device, limit=best - write)
            fastest = min(timed, key=timed.get)
            if cand.representation == "full":
                self.full_method = fastest
            total = timed[fastest] + write
            best = min(best, total)
            out[cand.representation] = {
                **{
                    f"form_ms_{m}" if len(timed) > 1 else "form_ms": round(1e3 * t, 3)
                    for m, t in timed.items()
                },
                "write_ms": round(1e3 * write, 3),
                "total_ms": round(1e3 * total, 3),
            }
        return out

    def dedup_arrays(self) -> list[str]:
        """Arrays whose rows are deduplicated."""
        return [n for n, spec in self.arrays.items() if spec.get("dedup")]

    @property
    def sqnorm_is_cheap(self) -> bool:
        """Whether a norm costs next to nothing: full gradients, and the factors of linear layers with
        one position a sample. Elsewhere (sequences, convolutions) it costs up to the layer's weight
        gradient, and ``policy.norms="cheap"`` leaves it to readers."""
        if self.representation == "full":
            return True
        positions = self.uses * math.prod(self.input_shape[:-1])
        return (
            self.representation == "factors"
            and self.extractor.kind in ("linear", "conv1d_transposed")
            and (positions == 1 and not self.summary)
        )

    @property
    def rep(self) -> Representation:
        """The representation chosen (once :attr:`ready`): what the store's readers see."""
        if self._rep is None:
            self._rep = Representation.from_spec(self.spec())
        return self._rep

    def sqnorms(self, rows: dict[str, Tensor]) -> Tensor:
        """Per-sample squared gradient norms ``(B,)`` (float64) of one batch's exact rows, before
        any quantization. Kept on every layer, so that norms, cosines and self-influence read them
        instead of scanning the rows; over positions the kernels take the cheaper of the factors'
        Gram matrices and the gradient itself, so a norm costs at most the layer's weight gradient."""
        return self.rep.sqnorm(rows)

    def rows(self, uses: list[tuple[Tensor, Tensor]], multiplier: float) -> dict[str, Tensor]:
        """Per-sample rows of one batch, with ``d`` scaled to each sample's own loss."""
        if len(uses) > self.uses:
            raise RuntimeError(
                f"Layer {self.name!r} was called {len(uses)} times in one forward, but {self.uses} times "
                "in the first captured batch; capture needs the same number of calls in every batch."
            )
        for a, _ in uses:
            if tuple(a.shape[1:]) != self.input_shape:
                raise RuntimeError(
                    f"Layer {self.name!r} got per-sample inputs of shape {tuple(a.shape[1:])}, but "
                    f"{self.input_shape} in the first captured batch; capture needs fixed per-sample shapes "
                    "(pad sequences to one length)."
                )
        a = _stack([u[0] for u in uses], self.uses)
        d = _stack([u[1] for u in uses], self.uses).float() * multiplier
        if self.representation == "projection":
            a_m, d_m = self.extractor.matrices(self.hyper, a, d)
            p_in, p_out = self._matrices
            return projection.project(a_m, d_m, p_in, p_out, self.projection["form"], self.params)
        if self.representation == "factors":
            if self.summary:
                return {
                    "a": pooling.pool(a.float(), self.summary["pool"]),
                    "d": pooling.pool(d, self.summary["pool"]),
                }
            return self.extractor.factor_rows(self.hyper, a, d)
        return self.extractor.full_rows(self.hyper, self.params, a, d, self.full_method)


def select_layers(model: nn.Module, policy: CapturePolicy) -> tuple[dict[str, LayerPlan], list[dict]]:
    """Applies the policy's patterns to ``model``.

    Returns:
        The captured layers by module name, and records of selected parameters that are not
        captured, each with the module, its type, the parameters, their size and the reason.

    Raises:
        PolicyError: a ``layers`` pattern matches no module; the message lists the model's layers.
    """
    modules = dict(model.named_modules())
    candidates = {
        n: m for n, m in modules.items() if n and any(p.requires_grad for p in m.parameters(recurse=False))
    }
    for pattern in policy.layers:
        if not any(match_pattern(n, type(m).__name__, pattern) for n, m in modules.items() if n):
            listing = ", ".join(f"{n} ({type(m).__name__})" for n, m in candidates.items())
            raise PolicyError(
                f"The `layers` pattern {pattern!r} matches no module of {type(model).__name__}. "
                f"Its layers with parameters are: {listing or 'none'}."
            )
    owners: dict[int, list[str]] = {}
    for n, m in candidates.items():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)

    plans: dict[str, LayerPlan] = {}
    uncovered: list[dict] = []
    for name, module in candidates.items():
        if not policy.matches(name, type(module).__name__):
            continue
        own = {pn: p for pn, p in module.named_parameters(recurse=False) if p.requires_grad}
        ext = find_extractor(module)
        layers, reason = _fed_layers(module, ext)
        if layers is not None:  # pieces no module hook sees, fed by their owner
            covered = [pn for layer in layers for pn in layer["covers"]]
        else:
            covered = [] if reason else [pn for pn in ext.param_names(module) if pn in own]
        if not isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
            shared = [pn for pn in covered if len(owners[id(own[pn])]) > 1]
            if shared:
                others = sorted(set(owners[id(own[shared[0]])]) - {name})
                reason = (
                    f"parameter {shared[0]!r} is shared with {others}; its gradient sums every module's use"
                )
                covered, layers = [], []
        missing = [pn for pn in own if pn not in covered]
        if missing:
            uncovered.append(
                {
                    "module": name,
                    "type": type(module).__name__,
                    "params": missing,
                    "numel": int(sum(own[pn].numel() for pn in missing)),
                    "reason": reason or "no extractor covers these parameters",
                }
            )
        for layer in layers or []:
            plans[f"{name}.{layer['suffix']}"] = LayerPlan(
                name=f"{name}.{layer['suffix']}",
                module=module,
                extractor=extractor_for_kind(layer["kind"]),
                hyper=layer["hyper"],
                params=layer["params"],
                param_shapes=layer["param_shapes"],
                owner=module,
                owner_name=name,
                role=layer["role"],
            )
        if covered and layers is None:
            parent = name.rpartition(".")[0]
            fed = isinstance(modules.get(parent), nn.MultiheadAttention)  # its out_proj: applied functionally
            plans[name] = LayerPlan(
                name=name,
                module=module,
                extractor=ext,
                hyper=ext.hyper(module),
                params=covered,
                param_shapes={pn: list(own[pn].shape) for pn in covered},
                owner=modules[parent] if fed else None,
                owner_name=parent if fed else None,
                role="out_proj" if fed else None,
            )
    return plans, uncovered


def _fed_layers(
    module: nn.Module, ext: type[Extractor] | None
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The layers of ``module``'s own parameters that its owner feeds (``None`` for a module that
    module hooks see), and why the rest of them are not captured, where known.

    Attention and recurrent modules (``capture.attention``, ``capture.recurrent``), and modules
    without an extractor, whose raw parameters of batch size 1 are captured at their broadcast
    (``capture.broadcast``).
    """
    if isinstance(module, nn.RNNBase):
        why = recurrent.supported(module)
        return ([] if why else recurrent.virtual_layers(module)), why
    if isinstance(module, nn.MultiheadAttention):
        return attention.virtual_layers(module), None
    if ext is None:
        return broadcast.virtual_layers(module), _why_not(module, ext)
    return None, _why_not(module, ext)


def samples_seen(uses: Mapping[str, list[tuple[Tensor, Tensor]]]) -> int:
    """The batch's sample count as its layers saw it: the most common leading size of their gradients.

    A layer fed an input shared by the whole batch sees fewer rows (see :func:`not_per_sample`); the
    most common size keeps such a layer from deciding the count. ``0`` when no layer fired.
    """
    sizes = Counter(d.shape[0] for calls in uses.values() for _, d in calls)
    return max(sizes, key=lambda s: (sizes[s], s)) if sizes else 0


def not_per_sample(uses: Mapping[str, list[tuple[Tensor, Tensor]]], n: int) -> dict[str, int]:
    """Layers whose calls did not see the batch's ``n`` samples as rows, with the rows they saw.

    Example: BERT's and GPT-2's position embeddings look up position ids of shape ``(1, T)``, and their
    ``(1, T, H)`` output is broadcast over the batch afterwards, so its gradient sums every sample's.
    """
    out = {}
    for name, calls in uses.items():
        bad = [t.shape[0] for a, d in calls for t in (a, d) if t.shape[0] != n]
        if bad:
            out[name] = bad[0]
    return out


def not_per_sample_record(plan: LayerPlan, rows: int, n: int) -> dict[str, Any]:
    """The uncovered record of a layer found by :func:`not_per_sample`."""
    own = dict(plan.module.named_parameters(recurse=False))
    return {
        "module": plan.name,
        "type": type(plan.module).__name__,
        "params": list(plan.params),
        "numel": int(sum(own[p].numel() for p in plan.params)),
        "reason": (
            f"its calls see {rows} row(s) for a batch of {n} samples: an input shared by the whole batch "
            "(such as position ids) is broadcast after the layer, so its output gradient sums over the "
            "samples and cannot be split into per-sample gradients"
        ),
    }


def misused_record(plan: LayerPlan, op: str) -> dict[str, Any]:
    """The uncovered record of a broadcast parameter that the forward also used through ``op``."""
    p = getattr(plan.module, plan.role)
    return {
        "module": plan.owner_name,
        "type": type(plan.module).__name__,
        "params": [plan.role],
        "numel": int(p.numel()),
        "reason": (
            f"a raw parameter used inside the module's forward through {op}, besides any broadcast over "
            "the batch; no hook can split that use's gradient by sample"
        ),
    }


def _why_not(module: nn.Module, ext: type[Extractor] | None) -> str | None:
    if ext is None:
        return (
            f"no extractor is registered for {type(module).__name__}: its parameters are used inside its "
            "own forward, not through a submodule, where no hook can split their gradient by sample"
        )
    return ext.unsupported(module)


def _timed(fn: Any, device: torch.device, repeats: int = 2, limit: float = math.inf) -> float:
    """Least seconds of ``repeats`` calls of ``fn`` after a first, warming one; only the first
    when it alone takes past ``limit`` seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for k in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - t0
        if k == 0 and elapsed > limit:
            return elapsed
        best = min(best, elapsed) if k else best
    return best


def _stack(ts: list[Tensor], uses: int) -> Tensor:
    if len(ts) == 1 and uses == 1:
        return ts[0].unsqueeze(1)
    out = torch.stack(ts, 1)
    if len(ts) < uses:  # a use that did not happen contributes nothing
        pad = out.new_zeros((out.shape[0], uses - len(ts), *out.shape[2:]))
        out = torch.cat([out, pad], 1)
    return out
