"""The simulation driver: config precedence, the generated Flower app, isolated local SuperLinks."""

from __future__ import annotations

import argparse
import io
import tomllib

from shared.config import DEMO, RunConfig
from simulations import simulate


def _args(**overrides):
    values = dict(preset="demo", config=None, set=[], rounds=None, strategy=None, seed=None)
    return argparse.Namespace(**{**values, **overrides})


def test_generated_app_carries_exactly_the_run_config():
    config = RunConfig(rounds=4, out_dir='/tmp/a "quoted" dir', strategy_params={"proximal_mu": 0.01})
    app = tomllib.loads(simulate.app_pyproject(config))
    assert app["tool"]["flwr"]["app"]["components"]["serverapp"] == "server.app:app"
    assert RunConfig.from_flower(app["tool"]["flwr"]["app"]["config"]) == config


def test_config_precedence_preset_file_set_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("rounds = 7\nlr = 0.01\n")
    config = simulate.resolve_config(_args(config=toml, set=["lr=0.02", "local-epochs=3"], strategy="fedprox"))
    assert config.model_width == DEMO["model_width"]  # preset
    assert config.rounds == 7  # file over preset
    assert (config.lr, config.local_epochs) == (0.02, 3)  # --set over file
    assert config.strategy == "fedprox"  # flags last


def test_each_run_gets_its_own_local_superlink_ports(tmp_path, monkeypatch):
    seen = []

    class FakePopen:
        def __init__(self, command, *, env, **kwargs):
            seen.append(env)
            self.stdout = io.StringIO("round 1/1 [ok] sites 1/1 | mean Dice ...\n")

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(simulate.subprocess, "Popen", FakePopen)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert simulate.run_flower(tmp_path, tmp_path / name, 2, cpus_per_site=1, gpus_per_site=0, rounds=1) == 0
    ports = {(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"]) for env in seen}
    assert len(ports) == 2 and all(env["FLWR_TELEMETRY_ENABLED"] == "0" for env in seen)
    assert seen[0]["FLWR_HOME"] != seen[1]["FLWR_HOME"]
