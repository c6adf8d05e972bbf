"""``GradientCapture`` as a ``trainer.callbacks`` entry of a LightningCLI YAML (the digits_cli example)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from mstore_lightning import CapturePolicy, GradientCapture, open_store
from mstore_lightning.reports.spec import parse_analytics

EXAMPLE = Path(__file__).resolve().parents[1] / "example_projects" / "digits_cli"
ANALYTICS = ["norms", {"self_influence": {"k": 20}}, "class_conflicts"]


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture(scope="module")
def example():
    """The example's ``train.py``, imported as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("digits_cli_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    # Registered so that its classes can be found by their module name (type hints, pickling).
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def write_config(tmp_path: Path, policy: dict[str, Any] | None = None, analytics: Any = None) -> Path:
    """The example's config.yaml, shortened and writing under ``tmp_path``.

    Args:
        tmp_path: where the store, the logs and the new YAML go.
        policy: entries merged into the callback's ``policy`` mapping.
        analytics: replaces the callback's ``analytics`` when given.

    Returns:
        The path of the written YAML.
    """
    cfg = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(
        max_epochs=2,
        default_root_dir=str(tmp_path / "root"),  # where LightningCLI saves its copy of the config
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (capture,) = trainer["callbacks"]
    capture["init_args"]["store"] = str(tmp_path / "digits.zarr")
    capture["init_args"]["policy"].update(policy or {})
    if analytics is not None:
        capture["init_args"]["analytics"] = analytics
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def the_capture(trainer) -> GradientCapture:
    captures = [cb for cb in trainer.callbacks if isinstance(cb, GradientCapture)]
    assert len(captures) == 1
    return captures[0]


def test_example_config_is_the_documented_one():
    cfg = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    (capture,) = cfg["trainer"]["callbacks"]
    assert capture["class_path"] == "mstore_lightning.GradientCapture"
    assert capture["init_args"]["policy"] == {
        "layers": ["net.*"],
        "precision": "int8",
        "loss_reduction": "mean",
    }
    assert capture["init_args"]["analytics"] == ANALYTICS


def test_fit_from_yaml_configures_capture_and_writes_the_store(example, tmp_path, capsys):
    cli = example.cli_main(["fit", "--config", str(write_config(tmp_path))])

    capture = the_capture(cli.trainer)
    assert capture.store == str(tmp_path / "digits.zarr")
    assert capture.mode == "overwrite"
    assert isinstance(capture.policy, CapturePolicy)
    assert capture.policy.layers == ("net.*",)
    assert capture.policy.precision == "int8"
    assert capture.policy.loss_reduction == "mean"
    # Fields the YAML leaves out keep their defaults.
    assert capture.policy == CapturePolicy(layers=["net.*"], precision="int8", loss_reduction="mean")
    assert [s.name for s in capture.analytics] == ["norms", "self_influence", "class_conflicts"]
    assert capture.analytics[1].params["k"] == 20
    assert capture.analytics == parse_analytics(ANALYTICS)

    store = open_store(tmp_path / "digits.zarr")
    assert store.epochs == [0, 1]
    assert store.layers == ["net.0", "net.2", "net.4"]
    n_train = len(cli.datamodule.train_set)
    for epoch in store.epochs:
        # Shuffled, with two workers: still every training sample exactly once per epoch.
        np.testing.assert_array_equal(np.sort(store.sample_ids(epoch)), np.arange(n_train))

    out = capsys.readouterr().out
    assert "epochs [0, 1]" in out
    assert "precision@20" in out
    # Chance is 0.1; rows named after the wrong samples would score about that.
    assert example.summarize(cli.trainer, cli.datamodule) >= 0.5


@pytest.mark.parametrize(
    ("policy", "analytics", "named"),
    [
        ({"precison": "int8"}, None, "precison"),
        (None, ["norms", "self_influnce"], "self_influnce"),
        (None, [{"self_influence": {"kk": 20}}], "kk"),
    ],
    ids=["policy-field-typo", "unknown-operator", "unknown-operator-param"],
)
def test_config_mistakes_fail_before_training(example, tmp_path, policy, analytics, named):
    config = write_config(tmp_path, policy=policy, analytics=analytics)
    with pytest.raises(ValueError, match=named):
        example.cli_main(["fit", "--config", str(config)])
    assert not (tmp_path / "digits.zarr").exists()


def test_invalid_policy_value_names_the_field(example, tmp_path):
    config = write_config(tmp_path, policy={"precision": "int9"})
    with pytest.raises(ValueError, match="`precision` can be"):
        example.cli_main(["fit", "--config", str(config)])


def test_print_config_round_trips(example, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.cli_main(["fit", "--config", str(write_config(tmp_path)), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)

    (capture,) = printed["trainer"]["callbacks"]
    assert capture["class_path"] == "mstore_lightning.GradientCapture"
    init_args = capture["init_args"]
    assert init_args["policy"]["layers"] == ["net.*"]
    assert init_args["policy"]["precision"] == "int8"
    assert init_args["policy"]["loss_reduction"] == "mean"
    assert init_args["analytics"] == ANALYTICS
    rebuilt = GradientCapture(**init_args)
    assert rebuilt.policy == CapturePolicy(layers=["net.*"], precision="int8", loss_reduction="mean")
    assert rebuilt.analytics == parse_analytics(ANALYTICS)
    assert not (tmp_path / "digits.zarr").exists()


def test_policy_and_analytics_from_their_own_yaml_files(example, tmp_path):
    policy_file, analytics_file = tmp_path / "policy.yaml", tmp_path / "analytics.yaml"
    policy_file.write_text(yaml.safe_dump({"layers": ["net.4"], "precision": "fp16"}))
    analytics_file.write_text(yaml.safe_dump({"analytics": ["norms", {"outliers": {"threshold": 3.0}}]}))
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].update(policy=str(policy_file), analytics=str(analytics_file))
    config = tmp_path / "files.yaml"
    config.write_text(yaml.safe_dump(cfg))

    cli = LightningCLI(example.DigitsMLP, example.DigitsDataModule, args=["--config", str(config)], run=False)
    capture = the_capture(cli.trainer)
    assert capture.policy == CapturePolicy(layers=["net.4"], precision="fp16")
    assert [(s.name, s.params.get("threshold")) for s in capture.analytics] == [
        ("norms", None),
        ("outliers", 3.0),
    ]


def test_help_lists_the_callback_arguments(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.cli_main(["fit", "--trainer.callbacks.help", "mstore_lightning.GradientCapture"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for name in ("store", "policy", "analytics", "analytics_budget_s", "mode"):
        assert f"--trainer.callbacks.{name}" in out
