"""A real deployment on 127.0.0.1, as docs/deploy.md sets it up: TLS SuperLink, hospital SuperNodes, `flwr run`.

The two deployment tests are slow (real processes, a fresh ClientApp process per message) but
run by default: they are the only check that certificates, ports, node config and a crashed
hospital behave outside the simulation engine.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import urllib.error
import urllib.request

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedbrats.server.federation import Federation
from fedbrats.server.history import read_history
from fedbrats.server.state import load_state
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.records import record_digest
from fedbrats.simulations.report import write_report
from fedbrats.strategies import build_strategy
from tests.deployment import Deployment, is_alive, missing_flower, process_tree, site_folders

SITES = ("hospital-a", "hospital-b")
#: two sites train at once on a 2-core machine: one thread each avoids oversubscription
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: upper bound on one `flwr run`; only reached when something is broken
RUN_LIMIT = 300.0
#: longer than the SuperLink takes to declare a silent node gone (heartbeat 30 s x patience 2 = 60 s), and
#: than a healthy reply under load (~35 s measured with the CPU shared), so the drop cannot hit a live site
DROP_TIMEOUT = 90.0
#: how `fedbrats deploy log` starts every line of a service's log file
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A two-site phantom at 5 mm, three cases per site (generated once for the module)."""
    reason = missing_flower()
    if reason and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the deployment tests, but: {reason}")  # never a silent skip in CI
    if reason:
        pytest.skip(f"a real deployment needs the Flower commands: {reason}")
    from fedbrats.shared.data.phantom import generate_phantom

    return generate_phantom(
        tmp_path_factory.mktemp("phantom") / "phantom", sites=2, cases_per_site=3, voxel_size=5.0, seed=0, progress=False
    )


def tiny_config(out, **changes) -> RunConfig:
    """A model and schedule small enough that the Flower plumbing, not training, is what gets timed."""
    config = RunConfig(
        rounds=2, model_width=8, model_depth=2, patch_size=24, batch_size=1, local_steps=1, cache="none",
        eval_every=2, min_sites=2, timeout=120.0, out_dir=str(out),
    )  # fmt: skip
    return config.replace(**changes)


def _live(deployment: Deployment) -> list[int]:
    return [pid for managed in deployment.processes for pid in process_tree(managed.proc.pid)]


def _gone(pids: list[int]) -> bool:
    return not any(is_alive(p) for p in pids)


def _start(deployment: Deployment, folders) -> None:
    deployment.start_superlink()
    deployment.start_supernodes(folders)
    deployment.wait_connected()


def _final_model_matches_checkpoint(out) -> None:
    model, meta = load_checkpoint(out / "global_model.safetensors")
    assert meta["model_config"]["width"] == 8 and meta["round"] == 2
    state = load_state(out / "server")
    assert state.round == 2
    assert meta["digest"] == record_digest(state.arrays)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_tls_deployment_with_two_authenticated_hospitals(dataset, tmp_path):
    """The documented topology end to end: units' ExecStart lines, Fleet proxy, node keys, app gates."""
    folders = site_folders(dataset, tmp_path / "hospitals", SITES)
    out = tmp_path / "coordinator" / "run"
    with Deployment(tmp_path / "deploy", node_env=ONE_THREAD, documented=True) as deployment:
        _start(deployment, folders)
        result = deployment.run(tiny_config(out), timeout=RUN_LIMIT)
        logs = deployment.logs()
        link_log = (deployment.coordinator.logs / "superlink.log").read_text()
        pids = _live(deployment)
    assert _gone(pids), "processes survived the deployment context"
    assert not result.timed_out and result.returncode == 0, logs
    assert "Uvicorn running on https://127.0.0.1" in link_log  # TLS, bound to 127.0.0.1, readiness line in the file
    assert all(TIMESTAMP.match(line) for line in link_log.splitlines()), link_log[:2000]
    assert "round 2/2 [ok] delivered 2/2 (hospital-a, hospital-b" in result.log, result.log[-3000:]
    history = read_history(out / "history.jsonl")
    assert [h["round"] for h in history] == [1, 2], logs
    assert all("simulated_seconds" not in h and h["wall_seconds"] > 0 for h in history)  # real sites, real time
    report = write_report(out).read_text()
    assert "| hospital-a | 2 | 0 | 0 | 2 |" in report and "Simulated time" not in report, report
    for name in SITES:  # each site's log: timestamped lines, the gate let FedBraTS run
        site_log = (tmp_path / "deploy" / name / "log" / "site.log").read_text()
        assert "app gate" in site_log and "refused the run's app" not in site_log, site_log[-2000:]
        assert "ClientApps fork from a server that imported fedbrats.client.preload" in site_log  # the default
        assert f"train round 2: site {name}, cases used 2, skipped 0, train loss" in site_log, site_log[-2000:]
        assert "httpx" not in site_log  # no line per poll of the SuperNode
        assert all(TIMESTAMP.match(line) for line in site_log.splitlines())
    for record in history:
        assert record["status"] == "ok"
        assert sorted(t["site"] for t in record["train"] if t["dropped"] is None) == list(SITES)
        assert all(t["num-examples"] == 2 and t["local-steps"] == 1 for t in record["train"])
    evaluated = {e["site"]: e for e in history[-1]["evaluate"]}
    assert sorted(evaluated) == list(SITES) and all(e["dropped"] is None for e in evaluated.values())
    assert all(0.0 <= e["dice-WT"] <= 1.0 for e in evaluated.values())
    _final_model_matches_checkpoint(out)
    for name in SITES:  # each site kept its own state in the work-dir of its node config
        kept = list((tmp_path / "deploy" / name / "work" / "runs").glob("run-*/state.json"))
        assert len(kept) == 1, kept  # one run, keyed by the server's run key


@pytest.mark.slow
def test_a_hospital_that_crashes_mid_run_is_dropped_and_the_run_completes(dataset, tmp_path):
    folders = site_folders(dataset, tmp_path / "hospitals", SITES)
    out = tmp_path / "coordinator" / "run"
    crashed: list[int] = []
    with Deployment(tmp_path / "deploy", node_env=ONE_THREAD) as deployment:
        _start(deployment, folders)

        def crash_after_round_one() -> None:
            if not crashed and read_history(out / "history.jsonl"):
                deployment.kill_supernode("hospital-b")  # SIGKILL: no goodbye to the SuperLink
                crashed.append(len(read_history(out / "history.jsonl")))

        config = tiny_config(out, min_sites=1, timeout=DROP_TIMEOUT)
        result = deployment.run(config, timeout=RUN_LIMIT, poll=crash_after_round_one)
        logs = deployment.logs()
    assert crashed == [1], logs
    assert not result.timed_out and result.returncode == 0, logs
    first, second = read_history(out / "history.jsonl")
    assert {t["site"]: t["dropped"] for t in first["train"]} == {"hospital-a": None, "hospital-b": None}
    trained = {t["site"]: t["dropped"] for t in second["train"]}
    assert set(trained) == set(SITES), f"a reply was charged to the wrong site: {trained}"
    assert trained["hospital-a"] is None
    # The SuperLink answers for a node that missed its heartbeats, well before our timeout
    assert trained["hospital-b"].startswith("site error:") and "Node Unavailable" in trained["hospital-b"]
    assert second["status"] == "ok" and second["selected"] == 2
    assert second["wall_seconds"] < DROP_TIMEOUT + 60
    assert {e["site"]: e["dropped"] for e in second["evaluate"]} == {"hospital-a": None}  # gone by then
    _final_model_matches_checkpoint(out)


PROBE_APP = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "anyone"

[tool.flwr.app.components]
serverapp = "probe:server"
clientapp = "probe:client"

[tool.flwr.app.config]
marker = "MARKER"
result = "RESULT"
""",
    "probe.py": """import json, pathlib
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def query(msg, context):
    pathlib.Path(context.run_config["marker"]).write_text(str(sorted(context.node_config)))
    return Message(RecordDict({"c": ConfigRecord({"ran": "yes"})}), reply_to=msg)


@server.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(messages, timeout=90)
    out = [r.error.reason if r.has_error() else "ran" for r in replies]
    pathlib.Path(context.run_config["result"]).write_text(json.dumps(out))
""",
}


PROTOBUF = {"Content-Type": "application/protobuf"}  # what Flower's HTTP APIs accept


def _post(url: str, ca) -> int:
    """The HTTP status of an empty POST (what `curl --cacert ca.pem -X POST URL` prints)."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST", headers=PROTOBUF), context=context, timeout=10):
            return 200
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_the_documented_topology_refuses_control_requests_and_foreign_apps(dataset, tmp_path):
    folders = site_folders(dataset, tmp_path / "hospitals", SITES[:1])
    marker, result_file = tmp_path / "probe-ran-at-the-hospital", tmp_path / "probe-result.json"
    app = tmp_path / "probe-app"
    app.mkdir()
    for name, text in PROBE_APP.items():
        (app / name).write_text(text.replace("MARKER", str(marker)).replace("RESULT", str(result_file)))
    with Deployment(tmp_path / "deploy", documented=True) as deployment:
        _start(deployment, folders)
        ca = deployment.tls.ca
        # what a hospital (or anyone) reaches: the proxy; the Control API answers only on 127.0.0.1
        hospital_side = _post(f"https://localhost:{deployment.public_port}/v1/control/list-runs", ca)
        coordinator_side = _post(f"https://127.0.0.1:{deployment.port}/v1/control/list-runs", ca)
        fleet = _post(f"https://localhost:{deployment.public_port}/v1/fleet/get-run", ca)
        result = deployment.run_app(app, timeout=RUN_LIMIT)
        logs = deployment.logs()
        gate_log = (tmp_path / "deploy" / SITES[0] / "log" / "site.log").read_text()
    assert hospital_side == 403 and fleet == 401, (hospital_side, fleet)  # the Fleet API wants a node signature
    assert coordinator_side != 403, coordinator_side
    assert not result.timed_out, logs
    assert not marker.exists(), "the hospital ran a probe app"
    assert result_file.is_file(), logs
    (reason,) = json.loads(result_file.read_text())
    assert "AppRefused" in reason and "other than pyproject.toml" in reason, reason
    assert "refused the run's app" in gate_log, gate_log[-2000:]


# --- the round loop's side of a vanished node (fast, no processes) ------------------------------
class SuperLinkAnswersForALostNode:
    """Node 12 is gone: like Flower's SuperLink, answer its message with an error whose source is the SuperLink."""

    def get_node_ids(self):
        return [11, 12]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}-{msg.metadata.message_type}"
            if msg.metadata.dst_node_id == 12:
                reply = Message(Error(code=3, reason="node unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own node id
                replies.append(reply)
                continue
            metrics = {"num-examples": 4, "num-val": 1, "dice-ET": 0.1, "dice-TC": 0.2, "dice-WT": 0.3}
            content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": "hospital-a"})})
            if msg.metadata.message_type.startswith("train"):
                content["arrays"] = msg.content["arrays"]
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_a_superlink_error_reply_is_charged_to_the_lost_site(tmp_path):
    arrays = ArrayRecord({"w": Array(np.ones((2, 2), np.float32))})
    config = RunConfig(rounds=1, min_sites=1, out_dir=str(tmp_path))
    Federation(SuperLinkAnswersForALostNode(), config, build_strategy("fedavg"), arrays, out_dir=tmp_path).run()
    (record,) = read_history(tmp_path / "history.jsonl")
    assert {t["site"]: t["dropped"] for t in record["train"]} == {
        "hospital-a": None, "node-12": "site error: node unavailable",
    }  # fmt: skip
    assert {e["site"] for e in record["evaluate"]} == {"hospital-a", "node-12"}
