"""CapturePolicy: construction from every source, and an exact message for every bad field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mstore_lightning import CapturePolicy, PolicyError


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    policy = CapturePolicy(layers=["fc*", "Conv2d"], epochs=[2, 0], samples=0.25, precision="bf16")
    assert CapturePolicy.from_dict(policy.to_dict()) == policy
    path = tmp_path / "policy.yaml"
    path.write_text("layers: ['fc*', Conv2d]\nepochs: [0, 2]\nsamples: 0.25\nprecision: bf16\n")
    assert CapturePolicy.from_yaml(path) == policy
    assert CapturePolicy.coerce(str(path)) == policy
    assert CapturePolicy.coerce(policy.to_dict()) == policy
    assert CapturePolicy.coerce(None) == CapturePolicy()


def test_yaml_may_nest_under_policy_and_is_safe_loaded(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policy:\n  precision: fp16\n")
    assert CapturePolicy.from_yaml(path).precision == "fp16"
    path.write_text("precision: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        CapturePolicy.from_yaml(path)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"precision": "int4"}, r"`precision` can be 'fp32', 'fp16', 'bf16', 'int8'.*; got 'int4'"),
        ({"precision": "kbit:9"}, r"'kbit:N' \(N in 1..8\).*got 'kbit:9'"),
        ({"precision": "kbit:"}, r"got 'kbit:'"),
        ({"precision": "threshold:1.5"}, r"'threshold\[:q\]' \(q in \(0, 1\)\); got 'threshold:1.5'"),
        ({"precision": "threshold:x"}, r"got 'threshold:x'"),
        ({"precision": 8}, r"got 8"),
        ({"dedup": "yes"}, r"`dedup` must be true or false, got 'yes'"),
        ({"timing": "after"}, r"`timing` can be 'during', 'checkpoint'; got 'after'"),
        ({"layer_precision": {"fc*": "int3"}}, r"`layer_precision\['fc\*'\]`: `precision` can be .*got 'int3'"),
        ({"layer_precision": ["fc*"]}, r"`layer_precision` must map layer patterns to precisions"),
        ({"loss_reduction": "none"}, r"`loss_reduction` can be 'mean', 'sum'; got 'none'"),
        ({"representation": "sparse"}, r"`representation` can be 'auto', 'factors', 'full', 'projection'; got 'sparse'"),
        ({"budget": {"bytes": 10}}, r"`budget` can be None or a mapping with 'bytes_per_sample'.*got \{'bytes': 10\}"),
        ({"budget": {"bytes_per_sample": 0}}, r"`budget.bytes_per_sample` must be an integer >= 1, got 0"),
        ({"budget": {"max_error": 1.5}}, r"`budget.max_error` must be a number in \(0, 1\), got 1.5"),
        ({"budget": {"layer_bytes_per_sample": -1}}, r"`budget.layer_bytes_per_sample` must be an integer >= 1"),
        ({"projection_dim": 0}, r"`projection_dim` must be an integer >= 1, got 0"),
        ({"pool": 0}, r"`pool` must be an integer >= 1, got 0"),
        ({"pool": "2"}, r"`pool` can be an int >= 1 for every convolution, or a mapping.*got '2'"),
        ({"pool": {"conv*": 0}}, r"`pool\['conv\*'\]` must be an integer >= 1, got 0"),
        ({"epochs": "first"}, r"`epochs` can be 'all', 'last', \{'every': n\}.*got 'first'"),
        ({"epochs": {"every": 0}}, r"`epochs.every` must be an integer >= 1, got 0"),
        ({"epochs": {"each": 2}}, r"`epochs` can be .*got \{'each': 2\}"),
        ({"epochs": [-1]}, r"`epochs` can be .*got \[-1\]"),
        ({"epochs": []}, r"`epochs` can be .*got \[\]"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1, got 0"),
        ({"every_n_steps": 1.5}, r"`every_n_steps` must be an integer, got 1.5"),
        ({"samples": 0.0}, r"`samples` can be 'all', a fraction in \(0, 1\].*got the fraction 0.0"),
        ({"samples": 1.5}, r"got the fraction 1.5"),
        ({"samples": "some"}, r"`samples` can be .*got 'some'"),
        ({"samples": {"ids": []}}, r"`samples.ids` must be a non-empty list of sample ids >= 0, got \[\]"),
        ({"samples": {"ids": [-3]}}, r"`samples.ids` must be a non-empty list"),
        ({"layers": []}, r"`layers` must hold at least one pattern"),
        ({"layers": [3]}, r"`layers` must be a list of non-empty fnmatch patterns"),
        ({"exclude": [""]}, r"`exclude` must be a list of non-empty fnmatch patterns"),
        ({"sample_seed": "x"}, r"`sample_seed` must be an integer, got 'x'"),
    ],
)
def test_every_bad_field_names_field_allowed_and_given(fields, match):
    with pytest.raises(PolicyError, match=match):
        CapturePolicy(**fields)
    with pytest.raises(PolicyError, match=match):
        CapturePolicy.from_dict(fields)


@pytest.mark.parametrize(
    ("fields", "name", "limit", "given"),
    [
        ({"every_n_steps": 10**30}, "every_n_steps", 2**31 - 1, 10**30),
        ({"projection_dim": 10**12}, "projection_dim", 65536, 10**12),
        ({"budget": {"bytes_per_sample": 2**41}}, "budget.bytes_per_sample", 2**40, 2**41),
        ({"pool": 10**6}, "pool", 65536, 10**6),
        ({"pool": {"conv*": 10**6}}, r"pool\['conv\*'\]", 65536, 10**6),
        ({"epochs": {"every": 2**31}}, "epochs.every", 2**31 - 1, 2**31),
        (
            {"recompute": {"threshold_s_per_gb": 1.0, "expected_queries": 10**20}},
            "recompute.expected_queries",
            2**31 - 1,
            10**20,
        ),
    ],
)
def test_absurd_integers_are_refused_naming_field_limit_and_value(fields, name, limit, given):
    match = rf"^`{name}` must be an integer <= {limit}, got {given}\.$"
    with pytest.raises(PolicyError, match=match):
        CapturePolicy(**fields)
    with pytest.raises(PolicyError, match=match):
        CapturePolicy.from_dict(fields)


def test_the_upper_bounds_themselves_are_accepted():
    policy = CapturePolicy(
        every_n_steps=2**31 - 1,
        projection_dim=65536,
        budget={"bytes_per_sample": 2**40},
        pool=65536,
        epochs={"every": 2**31 - 1},
        recompute={"threshold_s_per_gb": 1.0, "expected_queries": 2**31 - 1},
    )
    assert CapturePolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("layers: ['*']\nprecision: !!python/object:os.system\n", 2, "could not determine a constructor"),
        ("layers: ['*']\nprecision: fp16\nexclude: [a\n  b: c\n", 4, "expected ',' or ']'"),
        ("precision: fp16\n\tepochs: all\n", 2, "found character '\\t'"),
    ],
    ids=["python tag", "unclosed list", "tab"],
)
def test_a_bad_yaml_policy_is_a_policy_error_naming_file_and_line(tmp_path, text, line, problem):
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(text)
    for load in (CapturePolicy.from_yaml, CapturePolicy.coerce):
        with pytest.raises(PolicyError) as info:
            load(str(path))
        message = str(info.value)
        assert message.startswith(f"The policy file {str(path)!r}, line {line}: "), message
        assert problem in message and "\n" not in message
        assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_unknown_fields_and_bad_sources():
    with pytest.raises(PolicyError, match=r"Unknown policy field\(s\) \['precison'\]; allowed fields are \["):
        CapturePolicy.from_dict({"precison": "fp16"})
    with pytest.raises(PolicyError, match="names the file 'nope.yaml', which does not exist"):
        CapturePolicy.coerce("nope.yaml")
    with pytest.raises(PolicyError, match="can be a CapturePolicy, a dict or a path to a YAML file, got int"):
        CapturePolicy.coerce(3)
    with pytest.raises(PolicyError, match="A policy must be a mapping of fields, got list"):
        CapturePolicy.from_dict([1])


def test_layer_matching_by_name_type_and_exclude():
    p = CapturePolicy(layers=["encoder.*", "Conv2d"], exclude=["*.bias_only"])
    assert p.matches("encoder.fc", "Linear")
    assert p.matches("stem", "Conv2d")
    assert not p.matches("head", "Linear")
    assert not p.matches("encoder.bias_only", "Linear")


def test_epoch_and_step_selection():
    assert CapturePolicy(epochs="last").captures_epoch(4, 5)
    assert not CapturePolicy(epochs="last").captures_epoch(3, 5)
    assert [e for e in range(7) if CapturePolicy(epochs={"every": 3}).captures_epoch(e, 7)] == [0, 3, 6]
    assert [e for e in range(5) if CapturePolicy(epochs=[1, 4]).captures_epoch(e, 5)] == [1, 4]
    assert [s for s in range(7) if CapturePolicy(every_n_steps=3).captures_step(s)] == [0, 3, 6]


@settings(max_examples=30, deadline=None)
@given(frac=st.floats(0.05, 0.95), seed=st.integers(0, 2**31))
def test_sample_fraction_is_stable_and_close_to_asked(frac, seed):
    p = CapturePolicy(samples=frac, sample_seed=seed)
    ids = np.arange(20000)
    mask = p.sample_mask(ids)
    assert abs(mask.mean() - frac) < 0.03
    perm = np.random.default_rng(seed).permutation(ids)
    np.testing.assert_array_equal(p.sample_mask(perm), mask[perm])  # per sample, not per position


def test_explicit_id_set():
    p = CapturePolicy(samples={"ids": [3, 1, 3]})
    assert p.samples == {"ids": (1, 3)}
    np.testing.assert_array_equal(p.sample_mask(np.array([0, 1, 2, 3])), [False, True, False, True])


def test_layer_precision_overrides_by_first_matching_pattern():
    policy = CapturePolicy(precision="int8", layer_precision={"head": "fp32", "Linear": "kbit:4"})
    assert policy.precision_for("head", "Linear") == "fp32"
    assert policy.precision_for("body.0", "Linear") == "kbit:4"
    assert policy.precision_for("conv", "Conv2d") == "int8"
    assert CapturePolicy.from_dict(policy.to_dict()) == policy
