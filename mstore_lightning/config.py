"""The capture policy: what to capture, when, and at what precision.

A :class:`CapturePolicy` is built from keyword arguments, a dict or a YAML file and is validated at
construction, so a typo fails before any training starts. It serialises to plain JSON for the store.

Example:
    >>> policy = CapturePolicy(layers=["fc*"], epochs="last", precision="fp16")
    >>> CapturePolicy.from_dict(policy.to_dict()) == policy
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import yaml

from mstore_lightning.core import checks
from mstore_lightning.core.quant import check_precision

LOSS_REDUCTIONS = ("mean", "sum")
REPRESENTATIONS = ("auto", "factors", "full", "projection")
TIMINGS = ("during", "checkpoint")
NORMS = ("all", "cheap")
_EPOCH_WORDS = ("all", "last")
# Upper bounds no real run reaches, so a typo (10**30) fails here rather than as an int64 overflow or
# an absurd allocation later. Counts fit an int32; projection_dim sizes dim x dim matrices per layer.
MAX_COUNT = 2**31 - 1
MAX_PROJECTION_DIM = 65536
MAX_POOL = 65536  # a pooling block larger than any feature map
MAX_BYTES_PER_SAMPLE = 2**40  # 1 TiB per sample
# The default whole-capture budget, 1 MiB a sample: see benchmarks/default_budget.py for the measurement.
DEFAULT_BUDGET = {"bytes_per_sample": 1 << 20}

# Mapping first: jsonargparse (LightningCLI) tries union members in order and keeps a mapping a dict,
# which CapturePolicy.coerce then validates with its own messages.
PolicyLike = Union[Mapping[str, Any], "CapturePolicy", str, os.PathLike, None]


class PolicyError(ValueError):
    """A policy field has a value the policy cannot use."""


@dataclass(frozen=True)
class CapturePolicy:
    """What :class:`~mstore_lightning.GradientCapture` captures.

    Args:
        layers: fnmatch patterns matched against module names (``"encoder.*"``) and type names
            (``"Linear"``). ``["*"]`` selects every module that holds parameters.
        exclude: patterns, matched the same way, removed from the selection.
        epochs: ``"all"``, ``"last"`` (needs ``Trainer(max_epochs=...)``), ``{"every": n}`` or a list
            of epoch numbers.
        every_n_steps: capture one training batch in ``n`` (counted per epoch, from batch 0).
        samples: ``"all"``, a fraction in ``(0, 1]`` (chosen by a seeded hash of the sample id, so the
            same samples are kept in every epoch), or ``{"ids": [...]}`` for an explicit set.
        sample_seed: seed of the hash that picks a sample fraction.
        precision: storage precision of the captured rows: ``"int8"`` (symmetric, one scale per row,
            position or channel; median cosine of restored gradients >= 0.999), ``"fp16"``, ``"bf16"``,
            ``"fp32"`` (lossless), ``"kbit:N"`` (N-bit codes on quantile bins fitted per chunk) or
            ``"threshold[:q]"`` (one bit: above or below the chunk's q-quantile). See
            :mod:`mstore_lightning.core.quant` for the error of each.
        layer_precision: ``{pattern: precision}`` overriding ``precision`` for the layers a pattern
            matches (the first matching pattern wins).
        loss_reduction: how ``training_step`` reduces per-sample losses: ``"mean"`` or ``"sum"``.
        representation: ``"auto"`` stores, per layer, the factors or the full per-sample gradient,
            whichever is smaller (or what ``budget`` asks); ``"factors"``, ``"full"`` or
            ``"projection"`` force one. See :mod:`mstore_lightning.capture.choice`.
        budget: what a sample may cost: ``"bytes_per_sample"``, the stored bytes (before compression)
            of one sample over the whole capture; ``"layer_bytes_per_sample"``, a cap on each layer's;
            ``"max_error"``, the relative error of inner products a layer's projection may add. Every
            layer is kept exact while the whole capture fits; the layers that do not fit are projected,
            largest first, until it does (see :mod:`mstore_lightning.capture.choice`). The default,
            :data:`DEFAULT_BUDGET`, keeps ordinary models exact and a GPT-2-sized one within a disk;
            ``None`` keeps every layer exact whatever it costs.
        projection_dim: size of both sides of a forced projection (``representation="projection"``
            without a budget), capped at the layer's own sizes.
        projection_seed: seed of the projection matrices (recorded; the matrices are not stored).
        pool: average-pool convolution inputs and output gradients over ``pool``-sized blocks
            (MISTIQUE's POOL; approximate): an int for every convolution, or ``{pattern: int}``.
        recompute: store-or-recompute (see :mod:`mstore_lightning.capture.recompute`):
            ``{"threshold_s_per_gb": s, "expected_queries": q}`` decides per layer after the first
            captured epoch by measured costs; ``{"layers": [patterns]}`` always recomputes those layers.
        timing: ``"during"`` captures each training row at its own step, with that step's weights
            (TracIn's "during training" form); ``"checkpoint"`` captures nothing during the epoch and
            passes over the training set again at its end, with the end-of-epoch weights in eval mode
            (TracInCP's exact definition), at the cost of that extra pass.
        dedup: store a layer input row identical to one already stored (in this run) once, and
            reference it: the first layer's input when data is not augmented, inputs after frozen
            layers. Output gradients depend on the current weights and are never deduplicated.
        norms: which layers' exact squared norms the capture keeps for each row. ``"all"`` (the
            default): every layer's, so norms, cosines and self-influence never scan the rows; over
            positions (sequences, convolutions) each costs up to the layer's own weight gradient,
            7-11% of fit time on the CPU benchmarks. ``"cheap"``: only where a norm costs next to
            nothing (full gradients, linear layers with one position a sample); queries over the
            other layers then compute norms from the stored rows.
    """

    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    epochs: Any = "all"
    every_n_steps: int = 1
    samples: Any = "all"
    sample_seed: int = 0
    precision: str = "int8"
    layer_precision: Any = None
    loss_reduction: str = "mean"
    representation: str = "auto"
    dedup: bool = True
    budget: Any = field(default_factory=lambda: dict(DEFAULT_BUDGET))
    projection_dim: int = 64
    projection_seed: int = 0
    pool: Any = 1
    recompute: Any = None
    timing: str = "during"
    norms: str = "all"
    _id_set: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _parse_patterns("layers", self.layers, allow_empty=False))
        object.__setattr__(self, "exclude", _parse_patterns("exclude", self.exclude, allow_empty=True))
        object.__setattr__(self, "epochs", _parse_epochs(self.epochs))
        object.__setattr__(
            self, "every_n_steps", _parse_positive_int("every_n_steps", self.every_n_steps, MAX_COUNT)
        )
        object.__setattr__(self, "samples", _parse_samples(self.samples))
        object.__setattr__(self, "sample_seed", _parse_int("sample_seed", self.sample_seed))
        object.__setattr__(self, "layer_precision", _parse_layer_precision(self.layer_precision))
        try:
            check_precision(self.precision)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("representation", self.representation, REPRESENTATIONS)
        _check_choice("timing", self.timing, TIMINGS)
        _check_choice("norms", self.norms, NORMS)
        object.__setattr__(self, "budget", _parse_budget(self.budget))
        object.__setattr__(
            self,
            "projection_dim",
            _parse_positive_int("projection_dim", self.projection_dim, MAX_PROJECTION_DIM),
        )
        object.__setattr__(self, "projection_seed", _parse_int("projection_seed", self.projection_seed))
        object.__setattr__(self, "pool", _parse_pool(self.pool))
        object.__setattr__(self, "recompute", _parse_recompute(self.recompute))
        if not isinstance(self.dedup, (bool, np.bool_)):
            raise PolicyError(f"`dedup` must be true or false, got {self.dedup!r}.")
        object.__setattr__(self, "dedup", bool(self.dedup))
        if isinstance(self.samples, dict):
            object.__setattr__(self, "_id_set", frozenset(self.samples["ids"]))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapturePolicy:
        """Builds a policy from a mapping, rejecting unknown keys."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"A policy must be a mapping of fields, got {type(data).__name__}.")
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise PolicyError(f"Unknown policy field(s) {unknown}; allowed fields are {allowed}.")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CapturePolicy:
        """Reads a policy from a YAML file (``yaml.safe_load``)."""
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise PolicyError(f"The policy file {checks.yaml_problem(path, exc)}.") from exc
        if data is None:
            data = {}
        if isinstance(data, Mapping) and "policy" in data and len(data) == 1:
            data = data["policy"]
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, policy: PolicyLike) -> CapturePolicy:
        """Accepts a policy, a dict, a YAML path or ``None`` (the defaults)."""
        if policy is None:
            return cls()
        if isinstance(policy, CapturePolicy):
            return policy
        if isinstance(policy, Mapping):
            return cls.from_dict(policy)
        if isinstance(policy, (str, os.PathLike)):
            if not os.path.isfile(policy):
                raise PolicyError(f"`policy` names the file {str(policy)!r}, which does not exist.")
            return cls.from_yaml(policy)
        raise PolicyError(
            f"`policy` can be a CapturePolicy, a dict or a path to a YAML file, got {type(policy).__name__}."
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict that :meth:`from_dict` turns back into an equal policy."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    # ---------------------------------------------------------------- decisions
    def matches(self, name: str, type_name: str) -> bool:
        """Whether a module, by name or type name, is selected."""
        hit = any(match_pattern(name, type_name, p) for p in self.layers)
        return hit and not any(match_pattern(name, type_name, p) for p in self.exclude)

    def precision_for(self, name: str, type_name: str) -> str:
        """The storage precision of one layer."""
        for pattern, precision in (self.layer_precision or {}).items():
            if match_pattern(name, type_name, pattern):
                return precision
        return self.precision

    def pool_for(self, name: str, type_name: str) -> int:
        """The pooling factor of a convolution (1: none)."""
        if isinstance(self.pool, int):
            return self.pool
        return next((f for p, f in self.pool.items() if match_pattern(name, type_name, p)), 1)

    def always_recomputed(self, name: str, type_name: str) -> bool:
        """Whether the policy names a layer to recompute rather than store."""
        patterns = (self.recompute or {}).get("layers", ())
        return any(match_pattern(name, type_name, p) for p in patterns)

    def captures_epoch(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether training epoch ``epoch`` (0-based) is captured."""
        spec = self.epochs
        if spec == "all":
            return True
        if spec == "last":
            return max_epochs is not None and epoch == max_epochs - 1
        if isinstance(spec, dict):
            return epoch % spec["every"] == 0
        return epoch in spec

    def captures_step(self, batch_idx: int) -> bool:
        """Whether the ``batch_idx``-th training batch of an epoch is captured."""
        return batch_idx % self.every_n_steps == 0

    def sample_mask(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the samples in ``ids`` that the policy keeps."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.samples == "all":
            return np.ones(ids.shape, dtype=bool)
        if isinstance(self.samples, dict):
            return np.fromiter((int(i) in self._id_set for i in ids), dtype=bool, count=ids.size)
        return _unit_hash(ids, self.sample_seed) < self.samples


# -------------------------------------------------------------------- helpers
def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    checks.choice(name, value, allowed, PolicyError)


def _parse_patterns(name: str, value: Any, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise PolicyError(
            f"`{name}` must be a list of non-empty fnmatch patterns (e.g. ['*']), got {value!r}."
        )
    if not value and not allow_empty:
        raise PolicyError(f"`{name}` must hold at least one pattern (e.g. ['*']), got an empty list.")
    return tuple(value)


def _parse_int(name: str, value: Any) -> int:
    return checks.whole(name, value, error=PolicyError)


def _parse_positive_int(name: str, value: Any, high: int | None = None) -> int:
    # Two messages: "an integer" for a value of another type, "an integer >= 1" for one too small.
    return checks.whole(name, _parse_int(name, value), low=1, high=high, error=PolicyError)


def _parse_epochs(value: Any) -> Any:
    allowed = "'all', 'last', {'every': n} with n >= 1, or a list of epoch numbers >= 0"
    if isinstance(value, str):
        if value not in _EPOCH_WORDS:
            raise PolicyError(f"`epochs` can be {allowed}; got {value!r}.")
        return value
    if isinstance(value, Mapping):
        if set(value) != {"every"}:
            raise PolicyError(f"`epochs` can be {allowed}; got {dict(value)!r}.")
        return {"every": _parse_positive_int("epochs.every", value["every"], MAX_COUNT)}
    if (
        isinstance(value, Sequence)
        and value
        and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) and e >= 0 for e in value)
    ):
        return tuple(sorted({int(e) for e in value}))
    raise PolicyError(f"`epochs` can be {allowed}; got {value!r}.")


def _parse_samples(value: Any) -> Any:
    allowed = "'all', a fraction in (0, 1], or {'ids': [sample ids]}"
    if isinstance(value, str):
        if value != "all":
            raise PolicyError(f"`samples` can be {allowed}; got {value!r}.")
        return value
    if isinstance(value, (float, int, np.floating)) and not isinstance(value, bool):
        if not 0.0 < float(value) <= 1.0:
            raise PolicyError(f"`samples` can be {allowed}; got the fraction {value!r}.")
        return "all" if float(value) == 1.0 else float(value)
    if isinstance(value, Mapping) and set(value) == {"ids"}:
        ids = value["ids"]
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if (
            not isinstance(ids, Sequence)
            or not ids
            or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
            raise PolicyError(f"`samples.ids` must be a non-empty list of sample ids >= 0, got {ids!r}.")
        return {"ids": tuple(sorted({int(i) for i in ids}))}
    raise PolicyError(f"`samples` can be {allowed}; got {value!r}.")


def _parse_layer_precision(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) and k for k in value):
        raise PolicyError(f"`layer_precision` must map layer patterns to precisions, got {value!r}.")
    for pattern, precision in value.items():
        try:
            check_precision(precision)
        except ValueError as exc:
            raise PolicyError(f"`layer_precision[{pattern!r}]`: {exc}") from None
    return dict(value)


def _parse_budget(value: Any) -> dict[str, Any] | None:
    allowed = (
        "None or a mapping with 'bytes_per_sample' (the whole capture's, int > 0), "
        "'layer_bytes_per_sample' (each layer's, int > 0) and/or 'max_error' (in (0, 1))"
    )
    if value is None:
        return None
    keys = {"bytes_per_sample", "layer_bytes_per_sample", "max_error"}
    if not isinstance(value, Mapping) or not value or set(value) - keys:
        raise PolicyError(f"`budget` can be {allowed}; got {value!r}.")
    out = {}
    for key in ("bytes_per_sample", "layer_bytes_per_sample"):
        if key in value:
            out[key] = _parse_positive_int(f"budget.{key}", value[key], MAX_BYTES_PER_SAMPLE)
    if "max_error" in value:
        out["max_error"] = checks.number(
            "budget.max_error",
            value["max_error"],
            positive=True,
            below=1,
            noun="a number in (0, 1)",
            error=PolicyError,
        )
    return out


def _parse_recompute(value: Any) -> dict[str, Any] | None:
    allowed = (
        "None or a mapping with 'threshold_s_per_gb' (> 0) and optional 'expected_queries' (int >= 1), "
        "and/or 'layers' (patterns always recomputed)"
    )
    if value is None:
        return None
    keys = {"threshold_s_per_gb", "expected_queries", "layers"}
    if (
        not isinstance(value, Mapping)
        or set(value) - keys
        or not set(value) & {"threshold_s_per_gb", "layers"}
    ):
        raise PolicyError(f"`recompute` can be {allowed}; got {value!r}.")
    out: dict[str, Any] = {}
    if "threshold_s_per_gb" in value:
        t = value["threshold_s_per_gb"]
        out["threshold_s_per_gb"] = checks.number(
            "recompute.threshold_s_per_gb", t, positive=True, error=PolicyError
        )
        out["expected_queries"] = _parse_positive_int(
            "recompute.expected_queries", value.get("expected_queries", 10), MAX_COUNT
        )
    elif "expected_queries" in value:
        raise PolicyError("`recompute.expected_queries` needs `recompute.threshold_s_per_gb`.")
    if "layers" in value:
        out["layers"] = _parse_patterns("recompute.layers", value["layers"], allow_empty=False)
    return out


def _parse_pool(value: Any) -> Any:
    allowed = "an int >= 1 for every convolution, or a mapping of layer patterns to ints >= 1"
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise PolicyError(f"`pool` can be {allowed}; got {dict(value)!r}.")
        return {k: _parse_positive_int(f"pool[{k!r}]", v, MAX_POOL) for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PolicyError(f"`pool` can be {allowed}; got {value!r}.")
    return _parse_positive_int("pool", value, MAX_POOL)


def match_pattern(name: str, type_name: str, pattern: str) -> bool:
    """Whether an fnmatch ``pattern`` matches a module's name or its type name."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(type_name, pattern)


def _unit_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id, seed) mapped to [0, 1): a stable, seeded coin per sample."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
