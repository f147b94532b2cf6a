"""The real ServerApp loop and ClientApp handlers on a tiny phantom, in process."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedbrats.client.site import run_key
from fedbrats.server.app import run_server
from fedbrats.server.history import read_history
from fedbrats.server.state import load_state
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.strategies import available_strategies

from .local_grid import LocalGrid, tiny_phantom

TINY = dict(model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=2, local_epochs=1, cache="memory")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), cases_per_site=3)


def _config(phantom, out, **changes):
    values = dict(rounds=2, min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"), out_dir=str(out))
    return RunConfig(**{**values, **TINY, **changes})


def _site_run(out) -> str:
    """The folder name a site keeps this run's state in: the server's run key (kept in its checkpoint)."""
    return run_key(1, RunConfig(), load_state(out / "server").meta["run_key"])


def test_two_rounds_end_to_end_and_nothing_private_leaves_a_site(phantom, tmp_path):
    config = _config(phantom, tmp_path)
    grid = LocalGrid(config.to_flower(), sites=2)
    checkpoint = run_server(grid, config)
    history = read_history(tmp_path / "history.jsonl")
    assert [h["status"] for h in history] == ["ok", "ok"]
    assert {e["site"] for e in history[-1]["evaluate"]} == {"1", "2"}
    assert all(0.0 <= e["dice-WT"] <= 1.0 for e in history[-1]["evaluate"])
    model, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == config.model == "selfensemble" and meta["round"] == 2  # the default network
    # Every reply: weights, numbers and the site's name only.
    case_ids = [p.name for p in phantom.iterdir() if p.is_dir()]
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "site"}
        assert set(content.config_records["site"].keys()) == {"name"}
        for value in content.metric_records["metrics"].values():
            assert isinstance(value, int | float)
        text = repr(dict(content.config_records["site"])) + repr(dict(content.metric_records["metrics"]))
        assert not any(case in text for case in case_ids) and str(phantom) not in text
        if "arrays" in content:
            model_names = set(model.state_dict())
            assert set(content["arrays"].keys()) == model_names  # parameters only, no voxels
            assert all(np.isfinite(a.numpy()).all() for a in content["arrays"].values())


def test_schedule_position_follows_the_rounds_in_the_runs_own_folder(phantom, tmp_path):
    import json

    config = _config(phantom, tmp_path)
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    state = json.loads((tmp_path / "sites" / "1" / "runs" / _site_run(tmp_path) / "state.json").read_text())
    assert [state["rounds"][r]["start-step"] for r in ("1", "2")] == [0, config.local_steps]
    assert state["rounds"]["2"]["end-step"] == 2 * config.local_steps
    assert not (tmp_path / "sites" / "1" / "site_state.json").exists()  # nothing outside a run's folder


def test_site_without_usable_cases_replies_with_an_error(phantom, tmp_path):
    config = _config(phantom, tmp_path, rounds=1)
    nodes = {1: {"partition-id": 0}, 2: {"site-name": "ghost", "data-dir": str(tmp_path / "missing")}}
    grid = LocalGrid(config.to_flower(), sites=2, node_configs=nodes)
    run_server(grid, config)
    record = read_history(tmp_path / "history.jsonl")[0]
    assert record["status"] == "ok"
    dropped = [t["dropped"] for t in record["train"] if t["dropped"]]
    assert len(dropped) == 1 and "data folder does not exist" in dropped[0]
    assert not re.search(r"/tmp|missing", dropped[0])  # no path leaves the site


@pytest.mark.parametrize("strategy", ["fedpidavg", "fedbn", "scaffold"])
def test_strategies_with_site_side_parts_run(phantom, tmp_path, strategy):
    config = _config(phantom, tmp_path, strategy=strategy)
    grid = LocalGrid(config.to_flower(), sites=2)
    run_server(grid, config)
    history = read_history(tmp_path / "history.jsonl")
    assert [h["status"] for h in history] == ["ok", "ok"], history[-1]["train"]
    if strategy == "fedpidavg":
        assert all("loss-before" in t and "loss-after" in t for t in history[0]["train"])
    run = _site_run(tmp_path)
    if strategy == "fedbn":
        assert (tmp_path / "sites" / "1" / "runs" / run / "fedbn_norms.r0002.safetensors").is_file()
    if strategy == "scaffold":
        assert (tmp_path / "sites" / "2" / "runs" / run / "scaffold_control.r0002.safetensors").is_file()


def test_dp_sites_keep_a_ledger_and_stop_at_their_budget(phantom, tmp_path):
    from fedbrats.client.audit import audit_run
    from fedbrats.client.ledger import PrivacyLedger

    # sigma fixed: with q = 1 rounds cost about 11.8, 18.3, 23.8 in total, so round 3 exceeds 20
    config = _config(phantom, tmp_path, rounds=3, dp=True, dp_noise_multiplier=0.8, dp_epsilon=20.0, local_steps=3)
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    history = read_history(tmp_path / "history.jsonl")
    first = {t["site"]: t for t in history[0]["train"]}
    assert all(t["dropped"] is None and 0 < t["epsilon"] <= 20.0 for t in first.values())
    assert all("train-loss" not in t for t in first.values())  # raw losses stay at the site under DP
    exhausted = [t for t in history[2]["train"] if t["dropped"] and "budget exhausted" in t["dropped"]]
    assert len(exhausted) == 2, "a site whose next round exceeds its budget must refuse to train"
    assert history[2]["status"].startswith("failed")  # no site left to train: the model is kept
    for site in ("1", "2"):
        rows = PrivacyLedger.at(tmp_path / "sites" / site).rows()
        assert rows and max(r.epsilon for r in rows) <= 20.0
    audit = audit_run(tmp_path)
    assert audit.ok, audit.failures()


def test_client_level_dp_reports_epsilon(phantom, tmp_path):
    config = _config(phantom, tmp_path, rounds=2, client_dp_noise_multiplier=1.0, client_dp_clipping_norm=5.0)
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    history = read_history(tmp_path / "history.jsonl")
    assert [h["status"] for h in history] == ["ok", "ok"]
    assert 0 < history[0]["client_epsilon"] < history[1]["client_epsilon"]


@pytest.mark.parametrize("strategy", sorted(set(available_strategies()) - {"fedpidavg", "fedbn", "scaffold"}))
def test_every_strategy_runs_rounds_with_the_real_sites(phantom, tmp_path, strategy):
    """Unit tests check each strategy's arithmetic; this checks that its output stays a usable model."""
    config = _config(phantom, tmp_path, strategy=strategy, rounds=3)
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    history = read_history(tmp_path / "history.jsonl")
    assert all(t["dropped"] is None for h in history for t in h["train"]), history[-1]["train"]
    if strategy == "bulyan":  # 4f + 3 = 3 updates needed, 2 sites: every round fails, saying why
        assert [h["status"] for h in history] == ["failed: 2 usable updates, fewer than the 3 bulyan needs"] * 3
    else:
        assert [h["status"] for h in history] == ["ok"] * 3, history[-1]["status"]
