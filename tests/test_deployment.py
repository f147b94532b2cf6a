"""A real deployment on 127.0.0.1, as docs/deploy.md sets it up: TLS SuperLink, hospital SuperNodes, `flwr run`.

The two deployment tests are slow (real processes, a fresh ClientApp process per message) but
run by default: they are the only check that certificates, ports, node config and a crashed
hospital behave outside the simulation engine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedbrats.server.federation import Federation
from fedbrats.server.history import read_history
from fedbrats.server.state import load_state
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.records import record_digest
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
    folders = site_folders(dataset, tmp_path / "hospitals", SITES)
    out = tmp_path / "coordinator" / "run"
    with Deployment(tmp_path / "deploy", node_auth=True, node_env=ONE_THREAD) as deployment:
        _start(deployment, folders)
        result = deployment.run(tiny_config(out), timeout=RUN_LIMIT)
        logs = deployment.logs()
        link_log = deployment.processes[0].log_text()
        pids = _live(deployment)
    assert _gone(pids), "processes survived the deployment context"
    assert not result.timed_out and result.returncode == 0, logs
    assert "https://127.0.0.1" in link_log  # TLS, not --insecure
    history = read_history(out / "history.jsonl")
    assert [h["round"] for h in history] == [1, 2], logs
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
