"""The run configuration has one schema; every way of setting it must agree with it."""

import tomllib
from pathlib import Path

import pytest

from fedbrats.shared.config import DEMO, RunConfig

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
    with pytest.raises(ValueError, match="model_width must be a multiple of 8"):
        RunConfig(model_width=12)
    with pytest.raises(ValueError, match="patch_size 100 must be a multiple"):
        RunConfig(patch_size=100, model_depth=4)


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
