"""The simulation driver: config precedence, the generated Flower app, isolated local SuperLinks."""

from __future__ import annotations

import argparse
import io
import json
import re
import tomllib
from pathlib import Path

from fedbrats.shared.config import DEMO, RunConfig
from fedbrats.simulations import simulate


def _args(**overrides):
    values = dict(preset="demo", config=None, set=[], rounds=None, strategy=None, seed=None)
    return argparse.Namespace(**{**values, **overrides})


def test_generated_app_carries_exactly_the_run_config():
    config = RunConfig(rounds=4, out_dir='/tmp/a "quoted" dir', strategy_params={"proximal_mu": 0.01})
    app = tomllib.loads(simulate.app_pyproject(config))
    assert app["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedbrats.server.app:app"
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


def test_every_start_of_a_run_records_its_code(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate, "run_flower", lambda *args, **kwargs: 1)  # Flower is not started here
    partition = tmp_path / "partitioning_1.csv"
    partition.write_text("Partition_ID,Subject_ID\n1,A_001\n2,B_001\n")
    for _ in range(2):
        assert simulate.simulate(RunConfig(rounds=1), tmp_path, partition, tmp_path / "run") is False
    starts = [json.loads(line) for line in (tmp_path / "run" / "sources.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and starts[0]["from_round"] == 0
    versions = starts[0]["versions"]
    assert versions["flwr"].startswith("1.41") and versions["torch"] != "not installed"
    if (Path(simulate.__file__).parents[1] / ".git").exists():  # a git checkout, as in development and CI
        assert re.fullmatch(r"[0-9a-f]{7}(\+changes)?", versions["fedbrats-commit"])
