"""The simulation driver: config precedence, the generated Flower app, isolated local SuperLinks."""

from __future__ import annotations

import argparse
import io
import json
import re
import tomllib
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedbrats.run_options import build_run_config, run_config_from_args
from fedbrats.server import state as server_state
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
    args = _args(config=toml, set=["lr=0.02", "local_epochs=3"])
    config = run_config_from_args(args, {"strategy": "fedprox", "seed": None}, federated=True)
    assert config.model_width == DEMO["model_width"]  # preset
    assert config.rounds == 7  # file over preset
    assert (config.lr, config.local_epochs) == (0.02, 3)  # --set over file (underscores accepted)
    assert (config.strategy, config.seed) == ("fedprox", 0)  # flags last; a flag left out changes nothing
    assert build_run_config("full").model_width == RunConfig().model_width


def test_bad_strategy_or_set_fails_before_anything_starts():
    with pytest.raises(ValueError, match="unknown strategy 'nosuch'; known: .*fedavg"):
        run_config_from_args(_args(preset="auto", set=["strategy=nosuch"]), federated=True)
    with pytest.raises(ValueError, match="strategy 'fets_fedavgm': bad parameters .*'eta'"):  # the default strategy
        run_config_from_args(_args(set=["strategy-eta=0.1"]), federated=True)
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        run_config_from_args(_args(set=["rounds"]))


def test_a_federation_that_never_aggregated_did_not_train():
    failed = {"round": 1, "status": "failed: 0 usable updates, fewer than min_sites=2",
              "train": [{"site": "3", "dropped": "site error: site 3 has no usable training case"}, {"site": "4"}]}
    reason = simulate.untrained([failed, {**failed, "round": 2}])
    assert reason.startswith("all 2 round(s) failed, round 1: failed: 0 usable updates")
    assert "3: site error: site 3 has no usable training case" in reason
    assert simulate.untrained([failed, {"round": 2, "status": "ok"}]) is None
    assert simulate.untrained([]) == "no round was recorded"


def test_simulate_fails_when_every_round_failed(tmp_path, monkeypatch):
    partition = tmp_path / "partitioning_1.csv"
    partition.write_text("Partition_ID,Subject_ID\n1,A_001\n2,B_001\n")
    out = tmp_path / "run"

    def finished_without_training(app_dir, out_dir, sites, **kwargs):
        (out_dir / "history.jsonl").write_text(json.dumps({"round": 1, "status": "failed: no update"}) + "\n")
        return 0

    monkeypatch.setattr(simulate, "run_flower", finished_without_training)
    # Every round completed (and checkpointed), as the round loop does even when a round fails.
    monkeypatch.setattr(server_state, "load_state", lambda folder: SimpleNamespace(round=1))
    assert simulate.run_simulate(RunConfig(rounds=1), tmp_path, partition, out) == 1


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
    monkeypatch.setattr(simulate, "start_local_superlink", lambda env, cwd: "")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert simulate.run_flower(tmp_path, tmp_path / name, 2, cpus_per_site=1, engine=simulate.LOCAL, rounds=1) == 0
    ports = {(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"]) for env in seen}
    assert len(ports) == 2 and all(env["FLWR_TELEMETRY_ENABLED"] == "0" for env in seen)
    assert seen[0]["FLWR_HOME"] != seen[1]["FLWR_HOME"]
    # never a cluster `ray start` left running on this machine, nor an inherited RAY_ADDRESS
    assert all(env["RAY_ADDRESS"] == "local" for env in seen)
    # --ray-address: Flower's Ray backend calls ray.init(), which joins the cluster named by RAY_ADDRESS
    (tmp_path / "c").mkdir()
    cluster = simulate.Engine(gpus_per_site=0.5, ray_address="10.0.0.7:6379")
    assert simulate.run_flower(tmp_path, tmp_path / "c", 2, cpus_per_site=1, engine=cluster, rounds=1) == 0
    assert seen[-1]["RAY_ADDRESS"] == "10.0.0.7:6379"


@pytest.mark.parametrize("bad", [{"ray_address": "head"}, {"ray_address": "h:1;x"}, {"gpus_per_site": 2.0}])
def test_engine_refuses_a_bad_address_or_gpu_share(bad):
    with pytest.raises(ValueError, match="ray-address|gpus-per-site"):
        simulate.Engine(**bad)


def test_every_start_of_a_run_records_its_code(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate, "run_flower", lambda *args, **kwargs: 1)  # Flower is not started here
    partition = tmp_path / "partitioning_1.csv"
    partition.write_text("Partition_ID,Subject_ID\n1,A_001\n2,B_001\n")
    for _ in range(2):
        assert simulate.simulate(RunConfig(rounds=1), tmp_path, partition, tmp_path / "run") is False
    starts = [json.loads(line) for line in (tmp_path / "run" / "sources.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and starts[0]["from_round"] == 0
    versions = starts[0]["versions"]
    assert versions["flwr"] == metadata.version("flwr") and versions["torch"] != "not installed"
    if (Path(simulate.__file__).parents[1] / ".git").exists():  # a git checkout, as in development and CI
        assert re.fullmatch(r"[0-9a-f]{7}(\+changes)?", versions["fedbrats-commit"])


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_preset_is_demo_on_a_cpu_and_full_on_a_gpu(monkeypatch, cuda):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = run_config_from_args(_args(preset="auto"), {"model": None})
    assert config.model_width == (RunConfig().model_width if cuda else DEMO["model_width"])
    assert config.patch_size == (RunConfig().patch_size if cuda else DEMO["patch_size"])


#: An "executor" with a "federation" child (as flower-superexec runs flwr-simulation and its Ray
#: instance); both inherit the run's FLWR_HOME and hold the test's pipe open while they live. The
#: child ignores SIGTERM, as a process busy in native code or with its own handler may.
_FEDERATION = "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(os.getpid(), flush=True); time.sleep(300)"
_EXECUTOR = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {_FEDERATION!r}]); time.sleep(300)"


def test_stopping_the_local_superlink_stops_the_federation_its_executor_runs(tmp_path):
    """Flower may declare a run over while its federation still runs (missed task heartbeats on an
    overloaded machine): the federation must not live on, writing into the run folder."""
    import os
    import select
    import subprocess
    import sys
    import time

    home = tmp_path / ".flwr"
    env = {**os.environ, "FLWR_HOME": str(home)}
    executor = subprocess.Popen([sys.executable, "-c", _EXECUTOR], env=env, stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             env={**os.environ, "FLWR_HOME": str(tmp_path / "another-run")})  # fmt: skip
    try:
        assert int(executor.stdout.readline())  # the federation has started
        simulate.stop_local_superlink(home)
        # the pipe reaches end-of-file only when the executor and the federation have both exited
        # (no pid is polled: on a busy machine a pid can be reused within seconds)
        deadline, ended = time.monotonic() + 60, False
        while not ended and time.monotonic() < deadline:
            if select.select([executor.stdout], [], [], 0.5)[0]:
                ended = os.read(executor.stdout.fileno(), 4096) == b""
        assert ended, "a process of the run outlived stop_local_superlink"
        assert other.poll() is None  # another run's processes are left alone
    finally:
        for proc in (executor, other):
            if proc.poll() is None:
                proc.kill()
