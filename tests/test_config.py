"""The run configuration has one schema; every way of setting it must agree with it."""

import inspect
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedbrats.client.settings import model_for
from fedbrats.shared.config import CHOICES, DATA_ARGUMENTS, DEMO, MODEL_ARGUMENTS, RANGES, RunConfig
from fedbrats.shared.models import MODELS, available_models, create_model

ROOT = Path(__file__).resolve().parents[1]


def test_flower_round_trip_is_lossless():
    config = RunConfig(rounds=7, lr=3e-4, deep_supervision=True, strategy_params={"proximal_mu": 0.01})
    flat = config.to_flower()
    assert flat["local-epochs"] == 1 and flat["strategy-proximal-mu"] == 0.01
    assert RunConfig.from_flower(flat) == config


def test_pyproject_flower_config_mirrors_the_schema():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]["config"]
    assert flower == RunConfig().to_flower()
    assert pyproject["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedbrats.server.app:app", "clientapp": "fedbrats.client.app:app"}


def test_from_flower_coerces_strings_and_rejects_unknown_keys():
    config = RunConfig.from_flower({"rounds": "5", "deep-supervision": "true", "lr": "0.01"})
    assert (config.rounds, config.deep_supervision, config.lr) == (5, True, 0.01)
    with pytest.raises(ValueError, match="unknown run configuration key 'roundz'"):
        RunConfig.from_flower({"roundz": 3})
    with pytest.raises(ValueError, match="'rounds' expects int"):
        RunConfig.from_flower({"rounds": "three"})


def test_invalid_values_are_named():
    with pytest.raises(ValueError, match="model-width must be a positive multiple of 8"):
        RunConfig(model_width=12)
    with pytest.raises(ValueError, match=r"patch-size must be a multiple of 2\^\(model-depth - 1\) = 8, got 100"):
        RunConfig(patch_size=100, model_depth=4)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lr", "nan", "lr must be a finite number, got nan"),
        ("lr", "inf", "lr must be a finite number"),
        ("lr", "0", r"lr must be > 0, got 0.0"),
        ("timeout", "0", r"timeout must be > 0 seconds, got 0.0"),
        ("timeout", "-inf", "timeout must be a finite number"),
        ("val-fraction", "1", r"val-fraction must be in \[0, 1\), got 1.0"),
        ("rounds", "0", "rounds must be >= 1, got 0"),
        ("batch-size", "0", "batch-size must be >= 1, got 0"),
        ("patch-size", "0", "patch-size must be >= 1, got 0"),
        ("model-depth", "1", "model-depth must be >= 2"),
        ("model-dropout", "1.0", r"model-dropout must be in \[0, 1\), got 1.0"),
        ("model-act", "gelu", "model-act must be one of leakyrelu, relu, got 'gelu'"),
        ("lr-schedule", "step", "lr-schedule must be one of cosine, poly, constant"),
        ("cache", "ram", "cache must be one of memory, disk, none, got 'ram'"),
        ("selection", "best", "selection must be one of all, fraction, fastest, deadline"),
        ("dp-grad-sample-mode", "ghost", "dp-grad-sample-mode must be one of auto, functorch, hooks"),
        ("client-dp-delta", "0", r"client-dp-delta must be in \(0, 1\)"),
        ("eval-every", "0", "eval-every must be >= 1"),
        ("rounds", "inf", "'rounds' expects int, got 'inf'"),
        ("strategy-percentile", "abc", r"'strategy-percentile' expects float \(a number\), got 'abc'"),
        ("strategy-percentile", "nan", "strategy-percentile must be a finite number"),
        ("model-se", "maybe", "'model-se' expects bool"),
    ],
)
def test_every_value_is_checked_when_a_config_is_built(key, value, expected):
    """The error names the key as the user typed it and what was expected."""
    with pytest.raises(ValueError, match=expected):
        RunConfig.from_flower({key: value})


def test_toml_values_of_the_wrong_type_are_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = "fast"\nrounds = 2.5\n[strategy_params]\npercentile = "high"\n')
    with pytest.raises(ValueError, match="run.toml") as err:
        RunConfig.from_toml(path)
    text = str(err.value)
    assert "lr must be a number, got 'fast'" in text and "rounds must be an integer, got 2.5" in text
    assert "strategy-percentile must be a number, got 'high'" in text
    path.write_text("lr = 1\n")  # a TOML integer is a fine float setting
    assert RunConfig.from_toml(path).lr == 1.0 and isinstance(RunConfig.from_toml(path).lr, float)


def test_enumerations_agree_with_their_owners():
    from fedbrats.client.accounting import ACCOUNTANTS
    from fedbrats.client.optimizers import OPTIMIZERS
    from fedbrats.client.privacy import GRAD_SAMPLE_MODES
    from fedbrats.client.trainer import SCHEDULES
    from fedbrats.shared.models.blocks import ACTIVATIONS
    from fedbrats.shared.models.classifier import CLASS_HEADS

    assert CHOICES["model_act"] == ACTIVATIONS
    assert CHOICES["model_class_head"] == CLASS_HEADS
    assert CHOICES["lr_schedule"] == SCHEDULES
    assert CHOICES["local_optimizer"] == OPTIMIZERS
    assert CHOICES["dp_accountant"] == ACCOUNTANTS
    assert CHOICES["dp_grad_sample_mode"] == GRAD_SAMPLE_MODES
    assert set(CHOICES) | set(RANGES) <= {f.name for f in fields(RunConfig)}


@pytest.mark.parametrize("name", available_models())
def test_every_model_argument_is_a_run_configuration_key(name):
    """Each registered model's constructor arguments (but the data's in/out channels) can be set by a key."""
    parameters = inspect.signature(MODELS.get(name)).parameters
    arguments = [p for p in parameters if p not in ("self", *DATA_ARGUMENTS)]
    unreachable = [a for a in arguments if a not in MODEL_ARGUMENTS]
    assert not unreachable, f"model {name!r}: no run configuration key sets {unreachable}"
    flower_keys = set(RunConfig().to_flower())
    for argument in arguments:
        assert MODEL_ARGUMENTS[argument].replace("_", "-") in flower_keys
    config = RunConfig(model=name)
    headless = {"class_head"} & set(arguments)  # a segmentation run builds no class head, so names no kind
    assert sorted(config.model_config) == sorted(set(arguments) - headless)
    if headless:
        assert sorted(RunConfig(model=name, task="multitask").model_config) == sorted(arguments)


def test_model_settings_reach_the_model_unchanged():
    keys = {"model-width": "16", "model-depth": "3", "deep-supervision": "true", "model-dropout": "0.1",
            "model-act": "relu", "model-se": "true", "patch-size": "32"}
    config = RunConfig.from_flower(keys)
    expected = {"width": 16, "depth": 3, "deep_supervision": True, "dropout": 0.1, "act": "relu", "se": True,
                "n_classes": 0}  # segmentation: resunet without its classification head
    assert config.model_config == expected
    model = model_for(config)
    assert {k: model.config[k] for k in expected} == expected


def test_a_key_the_model_does_not_take_is_an_error(monkeypatch):
    def plain(in_channels: int = 4, out_channels: int = 3, width: int = 8, depth: int = 2):
        return create_model("resunet", width=width, depth=depth)

    monkeypatch.setitem(MODELS._factories, "plain-test", plain)
    assert RunConfig(model="plain-test").model_config == {"width": 32, "depth": 5}
    with pytest.raises(ValueError, match="model-se do not apply to model 'plain-test'"):
        _ = RunConfig(model="plain-test", model_se=True).model_config

    def extra(width: int = 8, groups: int = 8):
        return create_model("resunet", width=width)

    monkeypatch.setitem(MODELS._factories, "extra-test", extra)
    with pytest.raises(ValueError, match=r"takes \['groups'\], which no run configuration key sets"):
        _ = RunConfig(model="extra-test").model_config


def test_toml_overrides_base(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\nlocal-epochs = 3\n[strategy_params]\nproximal_mu = 0.1\n')
    base = RunConfig().replace(**DEMO)
    config = RunConfig.from_toml(path, base=base)
    assert (config.rounds, config.local_epochs, config.model_width) == (4, 3, DEMO["model_width"])
    assert config.strategy_params == {"proximal_mu": 0.1}
    path.write_text("colour = 'red'\n")
    with pytest.raises(ValueError, match="run.toml.*colour"):
        RunConfig.from_toml(path)
