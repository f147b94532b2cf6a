"""Experiment tracking: round records to TensorBoard and MLflow, read back with each tool's own reader."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fedbrats.server.tracking import (
    TRACKERS,
    MLflowTracker,
    NullTracker,
    TensorBoardTracker,
    TrackingError,
    local_store_uri,
    round_metrics,
    run_name,
    start_tracker,
)
from fedbrats.shared.config import CHOICES, RunConfig
from tests.test_compare import class_record, history_of, record


def fake_history():
    """Three rounds of fedprox seed 0 with site epsilons and client epsilon (tests.test_compare.record)."""
    history = history_of("fedprox", 0)
    history[1]["train"].append({"site": "3", "dropped": "no reply before timeout"})  # a late site: no metrics
    history[1]["evaluate"][0]["hd95-WT"] = math.inf  # non-finite: left out
    return history


def test_round_metrics_come_from_the_record():
    rec = fake_history()[1]
    metrics = round_metrics(rec)
    assert metrics["global/dice-WT"] == pytest.approx(rec["mean_dice"]["WT"])
    assert metrics["global/bytes-sent"] == 1000 and metrics["global/bytes-received"] == 500
    assert metrics["global/simulated-seconds"] == 2 * 3600.0 and metrics["global/client-epsilon"] == 2.0
    assert metrics["global/delivered"] == 2 and metrics["global/selected"] == 2
    assert metrics["train/2/epsilon"] == 1.4 and metrics["evaluate/1/dice-ET"] == pytest.approx(0.2)
    assert not any(k.startswith(("train/3/", "evaluate/3/")) for k in metrics)  # the late site
    assert "evaluate/1/hd95-WT" not in metrics
    classified = round_metrics(class_record(1, {"1": 0.75, "2": 0.5}))
    assert classified["global/pooled-auc"] == pytest.approx(classified["global/headline-auc"])
    assert classified["evaluate/1/auc"] == 0.75
    assert not any("histograms" in k for k in classified)


def test_config_names_a_bad_tracking_value():
    assert CHOICES["tracking"] == TRACKERS
    with pytest.raises(ValueError, match="tracking must be one of none, tensorboard, mlflow, got 'wandb'"):
        RunConfig(tracking="wandb")
    with pytest.raises(ValueError, match="tracking-uri applies to tracking = mlflow only"):
        RunConfig(tracking="tensorboard", tracking_uri="http://127.0.0.1:5000")
    assert (
        RunConfig.from_flower({"tracking": "mlflow", "tracking-uri": "http://x:5000"}).tracking_uri
        == "http://x:5000"
    )


@pytest.mark.slow  # a fresh interpreter imports flwr and torch
def test_tracking_none_imports_and_writes_nothing(tmp_path):
    code = (
        "import sys\nfrom pathlib import Path\n"
        "import fedbrats.server.federation\n"
        "from fedbrats.server.tracking import start_tracker\nfrom fedbrats.shared.config import RunConfig\n"
        f"t = start_tracker(RunConfig(), Path({str(tmp_path)!r}), [{{'round': 1, 'mean_dice': {{'WT': 0.5}}}}])\n"
        "t.log_round({'round': 2, 'mean_dice': {'WT': 0.6}}); t.close()\n"
        "print(type(t).__name__, sorted(m for m in sys.modules if 'mlflow' in m or 'tensorboard' in m))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NullTracker", "[]"]
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_event_file_holds_each_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = fake_history()
    tracker = start_tracker(RunConfig(tracking="tensorboard", strategy="fedprox"), tmp_path, history[:2])
    assert isinstance(tracker, TensorBoardTracker)
    tracker.log_round(history[2])
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {
        "global/dice-WT",
        "global/bytes-sent",
        "global/simulated-seconds",
        "train/1/epsilon",
        "evaluate/2/dice-TC",
    } <= set(tags)
    wt = events.Scalars("global/dice-WT")
    assert [e.step for e in wt] == [1, 2, 3]
    assert [e.value for e in wt] == pytest.approx([r["mean_dice"]["WT"] for r in history])
    assert [e.value for e in events.Scalars("train/2/epsilon")] == pytest.approx([0.7, 1.4, 2.1])
    assert events.Tags()["tensors"] == ["run-configuration/text_summary"]  # the configuration, once


def test_a_failing_tracker_warns_and_the_round_goes_on(caplog):
    class Broken(NullTracker):
        name = "broken"

        def _log(self, rnd, metrics, timestamp):
            raise ConnectionError("tracking server down")

    with caplog.at_level(logging.WARNING, logger="fedbrats.server"):
        Broken().log_round(record(4, {"1": 0.5}))
    assert "round 4 was not logged to broken: ConnectionError: tracking server down" in caplog.text


# ---- MLflow: a local store inside the run folder, read back with MlflowClient --------------------------
# `import mlflow` alone takes 10-30 s on a loaded 2-core machine: these tests are marked slow.


def _client(out):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=local_store_uri(out))


@pytest.mark.slow
def test_mlflow_run_holds_each_round_and_the_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow would write ./mlruns here if it wrote outside the run folder
    out = tmp_path / "run"
    history = fake_history()
    config = RunConfig(tracking="mlflow", strategy="fedprox", seed=0, strategy_params={"proximal_mu": 0.01})
    tracker = start_tracker(config, out, history[:1])  # round 1 was run before tracking was turned on
    assert isinstance(tracker, MLflowTracker) and tracker.uri == local_store_uri(out)
    tracker.log_round(history[1])
    tracker.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in out.iterdir()) == ["mlflow.db", "tracking.json"]
    run = _client(out).get_run(tracker.run_id)
    assert run.info.run_name == "fedprox-proximal_mu0.01-seed0" == run_name(config)
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["strategy"] == "fedprox"
        and run.data.tags["seed"] == "0"
    )
    assert run.data.params["rounds"] == "20" and run.data.params["strategy-proximal-mu"] == "0.01"
    wt = _client(out).get_metric_history(tracker.run_id, "global/dice-WT")
    assert [(m.step, m.value) for m in wt] == [
        (r["round"], pytest.approx(r["mean_dice"]["WT"])) for r in history[:2]
    ]
    epsilon = _client(out).get_metric_history(tracker.run_id, "train/2/epsilon")
    assert [(m.step, m.value) for m in epsilon] == [(1, 0.7), (2, 1.4)]

    # resumed: the same MLflow run goes on, past rounds are not logged twice
    again = start_tracker(config, out, history[:2])
    assert again.run_id == tracker.run_id
    again.log_round(history[2])
    again.close()
    assert [m.step for m in _client(out).get_metric_history(tracker.run_id, "global/dice-WT")] == [1, 2, 3]
    assert json.loads((out / "tracking.json").read_text())["run_id"] == tracker.run_id


@pytest.mark.slow
def test_mlflow_store_that_cannot_open_fails_before_round_one(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    config = RunConfig(tracking="mlflow", tracking_uri=f"sqlite:///{tmp_path}/file/mlflow.db")
    with pytest.raises(
        TrackingError, match="MLflow tracking at 'sqlite:///.*/file/mlflow.db' could not start"
    ):
        start_tracker(config, tmp_path / "run", [])


@pytest.mark.slow
def test_a_comparison_is_one_mlflow_run_per_strategy_and_seed(tmp_path, monkeypatch):
    """compare points every run at one store in its folder; each run's tracker names itself strategy-seed."""
    from fedbrats.shared.config import DEMO
    from fedbrats.simulations import compare as compare_module

    def fake_simulate(config, data, partition, out, **options):
        history = history_of(config.strategy, config.seed)
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        (out / "run_config.json").write_text(json.dumps(config.replace(out_dir=str(out)).to_flower()))
        (out / "server").mkdir(exist_ok=True)
        (out / "server" / "server_state.json").write_text(json.dumps({"round": 3}))
        start_tracker(config, out, history).close()  # what the ServerApp's Federation does
        return True

    monkeypatch.setattr(compare_module, "simulate", fake_simulate)
    config = RunConfig().replace(**{**DEMO, "rounds": 3, "tracking": "mlflow"})
    out = tmp_path / "cmp"
    specs = compare_module.parse_strategies("fedavg,fedprox")
    assert compare_module.compare(config, specs, [0, 1], tmp_path, tmp_path / "p.csv", out)
    runs = _client(out).search_runs([_client(out).get_experiment_by_name("fedbrats").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == [
        "fedavg-seed0",
        "fedavg-seed1",
        "fedprox-proximal_mu0.01-seed0",
        "fedprox-proximal_mu0.01-seed1",
    ]
    assert not (out / "runs" / "fedavg-seed0" / "mlflow.db").exists()


# ---- the live dashboard: a real `mlflow ui` on 127.0.0.1, its run page loaded by headless Chromium -------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _wait_for_health(ui: subprocess.Popen, port: int, log: Path, seconds: float = 300.0) -> None:
    """Until the MLflow server answers /health (its start-up imports take a minute on a busy CPU)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ui.poll() is not None:
            pytest.fail(f"mlflow ui exited with {ui.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"mlflow ui did not answer within {seconds:.0f} s: {log.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it)"
)
def test_mlflow_ui_run_page_shows_the_round_metrics(tmp_path):
    from fedbrats.simulations.simulate import free_port

    out, cwd = tmp_path / "run", tmp_path / "ui"
    cwd.mkdir()
    history = fake_history()
    tracker = start_tracker(RunConfig(tracking="mlflow", strategy="fedprox"), out, history)
    tracker.close()
    experiment = _client(out).get_run(tracker.run_id).info.experiment_id
    port, log = free_port(), tmp_path / "ui.log"
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    command = [
        mlflow,
        "ui",
        "--backend-store-uri",
        tracker.uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]  # one worker: uvicorn's 4 kill each other when their start is slow
    with open(log, "w") as handle:
        ui = subprocess.Popen(
            command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_health(ui, port, log)
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{tracker.run_id}"
        browser = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ]  # the page is a JS app: give its scripts time to fill it
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}  # no D-Bus here: do not wait for one
        dom = subprocess.run(browser, capture_output=True, text=True, timeout=300, env=env).stdout
        assert "fedprox-seed0" in dom  # the run's name, at the top of its page
        missing = sorted(name for name in round_metrics(history[-1]) if name not in dom)
        assert not missing, f"the run page lacks metrics {missing}"
        # the charts' source: the same server gives each metric's history per round
        query = urllib.parse.urlencode({"run_id": tracker.run_id, "metric_key": "train/2/epsilon"})
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/metrics/get-history?{query}"
        ) as reply:
            points = json.load(reply)["metrics"]
        assert [(p["step"], p["value"]) for p in points] == [(1, 0.7), (2, 1.4), (3, 2.1)]
    finally:  # the server's own session: `mlflow ui` and its uvicorn worker (it may ignore SIGTERM for long)
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)
    assert list(cwd.iterdir()) == []  # the server wrote nothing beside the run folder's store
