"""Resume never loses a round: missing or damaged state, torn history lines, damaged checkpoints, changed configs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord
from safetensors.numpy import save_file

from fedbrats.server.federation import Federation
from fedbrats.server.history import RunHistory, read_events, read_history, scan_history
from fedbrats.server.state import (
    META,
    ResumeError,
    ServerState,
    checkpoint_rounds,
    config_changes,
    load_state,
    read_run_config,
    save_state,
)
from fedbrats.shared.config import RunConfig
from fedbrats.shared.records import record_digest
from fedbrats.strategies import build_strategy
from tests.test_federation import FakeGrid, _arrays


def _federation(out, rounds, strategy="fedavg", **config):
    run_config = RunConfig(rounds=rounds, min_sites=2, out_dir=str(out), strategy=strategy, **config)
    return Federation(FakeGrid(), run_config, build_strategy(strategy), _arrays(), out_dir=out)


def _run(out, rounds, **config) -> ArrayRecord:
    return _federation(out, rounds, **config).run()


def _rounds(out) -> list[int]:
    return [h["round"] for h in read_history(out / "history.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Digests of an uninterrupted run after each round."""
    out = tmp_path_factory.mktemp("reference")
    return {rnd: record_digest(_run(out / f"r{rnd}", rnd)) for rnd in (2, 3, 4)}


# --- a missing or damaged server state -------------------------------------------------------
def test_a_fresh_run_commits_round_0_and_its_configuration(tmp_path):
    federation = _federation(tmp_path, 2)
    assert load_state(tmp_path / "server").round == 0
    assert read_run_config(tmp_path)["strategy"] == "fedavg"
    federation.run()
    assert checkpoint_rounds(tmp_path / "server") == [2, 1]  # the newest and one to fall back to


def test_missing_server_state_with_history_stops_instead_of_restarting(tmp_path):
    _run(tmp_path, 2)
    (tmp_path / "server" / META).unlink()
    history_before = (tmp_path / "history.jsonl").read_text()
    with pytest.raises(ResumeError, match="no .*server_state.json") as err:
        _federation(tmp_path, 3)
    assert "history.jsonl (2 lines)" in str(err.value)
    assert f"remove {tmp_path} or choose another --out" in str(err.value)
    assert (tmp_path / "history.jsonl").read_text() == history_before  # nothing wiped


def test_damaged_server_state_stops_with_what_to_do(tmp_path):
    _run(tmp_path, 2)
    (tmp_path / "server" / META).write_text('{"round": 2, "weig')
    with pytest.raises(ResumeError, match="server_state.json is damaged.*choose another --out"):
        _federation(tmp_path, 3)
    assert _rounds(tmp_path) == [1, 2]


def test_round_files_without_server_state_also_stop(tmp_path):
    _run(tmp_path, 1)
    (tmp_path / "server" / META).unlink()
    (tmp_path / "history.jsonl").unlink()
    with pytest.raises(ResumeError, match=r"checkpoints of rounds \[1, 0\]"):
        _federation(tmp_path, 2)


# --- the history ----------------------------------------------------------------------------
def test_a_torn_middle_line_keeps_every_other_round_and_names_the_line(tmp_path, caplog):
    _run(tmp_path, 3)
    path = tmp_path / "history.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # round 2's line damaged, not by a crash
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="fedbrats.server"):
        assert _rounds(tmp_path) == [1, 3]
    assert f"{path} line 2 is damaged" in caplog.text and "after round 1 and before round 3" in caplog.text
    scan = scan_history(path)
    assert [n for n, _ in scan.damaged] == [2] and scan.torn_tail is None
    _run(tmp_path, 4)  # resuming keeps the damaged line (it can still be repaired) and every intact round
    assert _rounds(tmp_path) == [1, 3, 4]
    assert path.read_text().splitlines()[1] == lines[1]


def test_a_torn_last_line_is_cut_and_its_round_runs_again(tmp_path, reference, caplog):
    _run(tmp_path, 2)
    with open(tmp_path / "history.jsonl", "a") as handle:
        handle.write('{"round": 3, "sta')  # crash while appending round 3: no checkpoint of round 3 yet
    assert scan_history(tmp_path / "history.jsonl").torn_tail[0] == 3
    with caplog.at_level(logging.WARNING, logger="fedbrats.server"):
        resumed = _run(tmp_path, 3)
    assert "line 3 was cut by a crash" in caplog.text
    assert _rounds(tmp_path) == [1, 2, 3]
    assert scan_history(tmp_path / "history.jsonl").torn_tail is None
    assert record_digest(resumed) == reference[3]


def test_a_round_recorded_but_not_checkpointed_is_run_once_more(tmp_path, reference):
    _run(tmp_path, 2)
    path = tmp_path / "history.jsonl"
    round_2 = json.loads(path.read_text().splitlines()[1])
    RunHistory(path).append({**round_2, "round": 3})  # crash between the history append and the checkpoint
    assert record_digest(_run(tmp_path, 3)) == reference[3]
    assert _rounds(tmp_path) == [1, 2, 3]


# --- damaged checkpoints fall back to the previous one ---------------------------------------
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: the file still parses, only the digest can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda s: _truncate(s / "global.safetensors.r3"), "unreadable"),
        (lambda s: _flip_last_byte(s / "global.safetensors.r3"), "does not match its stored digest"),
        (lambda s: _truncate(s / "strategy.safetensors.r3", 0.0), "strategy.safetensors.r3"),
        (lambda s: (s / "global.safetensors.r3").unlink(), "global.safetensors.r3 is missing"),
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_round(tmp_path, reference, caplog, damage, why):
    _run(tmp_path, 3)
    damage(tmp_path / "server")
    with caplog.at_level(logging.WARNING, logger="fedbrats.server"):
        federation = _federation(tmp_path, 4)
    assert federation.start_round == 2
    assert record_digest(federation.arrays) == reference[2]
    assert "checkpoint of round 3" in caplog.text and why in caplog.text
    assert "instead of round 3" in caplog.text
    assert _rounds(tmp_path) == [1, 2]  # history follows the checkpoint
    (event,) = read_events(tmp_path / "history.jsonl")
    assert event["event"] == "checkpoint-fallback" and event["after_round"] == 2 and why in event["skipped"][0]
    assert record_digest(federation.run()) == reference[4]
    assert _rounds(tmp_path) == [1, 2, 3, 4]
    assert checkpoint_rounds(tmp_path / "server") == [4, 3]


def test_no_intact_checkpoint_is_an_error_not_a_restart(tmp_path):
    _run(tmp_path, 3)
    _flip_last_byte(tmp_path / "server" / "global.safetensors.r3")
    _truncate(tmp_path / "server" / "global.safetensors.r2")
    with pytest.raises(ResumeError, match="no intact checkpoint.*round 3.*round 2"):
        _federation(tmp_path, 4)


def test_a_checkpoint_that_does_not_verify_is_never_committed(tmp_path, monkeypatch):
    import fedbrats.server.state as state_module

    arrays = _arrays(1.0)
    save_state(tmp_path, ServerState(1, arrays))
    real = state_module.atomic_write

    def torn_write(path, data):  # the write "succeeds" but the bytes on disk are short
        return real(path, data[:-8] if path.name.startswith("global") else data)

    monkeypatch.setattr(state_module, "atomic_write", torn_write)
    with pytest.raises(RuntimeError, match="round 2 .* did not verify"):
        save_state(tmp_path, ServerState(2, _arrays(2.0)))
    assert json.loads((tmp_path / META).read_text())["round"] == 1
    monkeypatch.undo()
    state = load_state(tmp_path)
    assert state.round == 1 and record_digest(state.arrays) == record_digest(arrays)


def test_a_checkpoint_of_an_older_fedbrats_still_loads_and_is_checked(tmp_path):
    arrays = _arrays(0.5)
    weights = {k: v.numpy() for k, v in arrays.items()}
    save_file(weights, str(tmp_path / "global.safetensors.r2"), metadata={"round": "2"})
    save_file({"_empty": np.zeros(0, np.float32)}, str(tmp_path / "strategy.safetensors.r2"))
    meta = {"round": 2, "weights": "global.safetensors.r2", "strategy": "strategy.safetensors.r2",
            "strategy_meta": {}, "array_order": ["w", "b"], "simulated_seconds": 7.0,
            "digest": record_digest(arrays)}
    (tmp_path / META).write_text(json.dumps(meta))
    state = load_state(tmp_path)
    assert state.round == 2 and list(state.arrays.keys()) == ["w", "b"] and state.meta["simulated_seconds"] == 7.0
    (tmp_path / META).write_text(json.dumps({**meta, "digest": "0" * 64}))
    with pytest.raises(ResumeError, match="does not match its stored digest"):
        load_state(tmp_path)


# --- the run configuration --------------------------------------------------------------------
def test_resuming_with_another_configuration_is_refused_naming_the_keys(tmp_path):
    _run(tmp_path, 2)
    with pytest.raises(ResumeError) as err:
        _federation(tmp_path, 3, strategy="fedprox", seed=1)
    message = str(err.value)
    assert "strategy: 'fedavg' -> 'fedprox'" in message and "seed: 0 -> 1" in message
    assert "resume-override" in message and "rounds" not in message
    assert _rounds(tmp_path) == [1, 2] and read_run_config(tmp_path)["strategy"] == "fedavg"


def test_rounds_may_grow_but_not_shrink_below_the_completed_rounds(tmp_path, reference):
    _run(tmp_path, 3)
    with pytest.raises(ResumeError, match="rounds = 2, but .* already completed 3 rounds"):
        _federation(tmp_path, 2)
    assert record_digest(_run(tmp_path, 4, timeout=60.0)) == reference[4]  # timeout may differ too
    assert read_events(tmp_path / "history.jsonl") == []


def test_an_override_resumes_and_is_recorded_in_the_history(tmp_path):
    _run(tmp_path, 2)
    federation = _federation(tmp_path, 3, strategy="fedprox", resume_override=True)
    assert federation.start_round == 2
    (event,) = read_events(tmp_path / "history.jsonl")
    assert event == {"event": "resume-override", "after_round": 2, "changes": {"strategy": ["fedavg", "fedprox"]}}
    assert read_run_config(tmp_path)["strategy"] == "fedprox"  # the run now continues under the new configuration
    federation.run()
    assert _rounds(tmp_path) == [1, 2, 3]
    _federation(tmp_path, 3, strategy="fedprox")  # the override is not needed again


def test_a_run_without_a_completed_round_may_start_again_with_another_configuration(tmp_path):
    _federation(tmp_path, 2)  # crashed before round 1 finished
    federation = _federation(tmp_path, 2, strategy="fedprox")
    assert federation.start_round == 0 and read_run_config(tmp_path)["strategy"] == "fedprox"
    assert read_events(tmp_path / "history.jsonl") == []
    federation.run()
    assert _rounds(tmp_path) == [1, 2]


def test_the_run_key_sites_see_is_kept_across_a_resume_and_new_for_a_new_run(tmp_path):
    first = _federation(tmp_path / "a", 2)
    first.run()
    resumed = _federation(tmp_path / "a", 3)
    other = _federation(tmp_path / "b", 2)
    assert len(first.run_key) == 16 and resumed.run_key == first.run_key != other.run_key
    assert first._train_config(1)["run-key"] == first.run_key


def test_a_key_newer_than_the_stored_run_is_no_change_unless_it_changed_behaviour():
    """Resuming with newer code: keys the run predates ran as their default does (no change), except
    those listed with their old behaviour (HD95 was MONAI's max before `hd95-definition` existed)."""
    now = RunConfig(rounds=3).to_flower()
    old = {k: v for k, v in now.items() if k not in ("tracking", "update-dtype", "patch-pool", "hd95-definition")}
    assert config_changes(old, RunConfig(rounds=3)) == {"hd95-definition": ["max", "pooled"]}
    assert config_changes(old, RunConfig(rounds=3, hd95_definition="max")) == {}
    assert config_changes(old, RunConfig(rounds=3, hd95_definition="max", update_dtype="float16")) == {
        "update-dtype": ["float32", "float16"]}
    assert config_changes(now, RunConfig(rounds=5, tracking="mlflow")) == {}  # resumable: changes no result


def test_a_run_older_than_the_class_head_key_resumes_with_the_head_it_had():
    """A multitask run started before `model-class-head` had a bottleneck head; a segmentation run had none."""
    stored = {k: v for k, v in RunConfig(rounds=3, task="multitask").to_flower().items() if k != "model-class-head"}
    assert config_changes(stored, RunConfig(rounds=3, task="multitask")) == {
        "model-class-head": ["bottleneck", "profile"]}  # fmt: skip
    assert config_changes(stored, RunConfig(rounds=3, task="multitask", model_class_head="bottleneck")) == {}
    segmentation = {**stored, "task": "segmentation"}
    assert config_changes(segmentation, RunConfig(rounds=3)) == {}  # no head, so its kind changes nothing
    assert config_changes({**segmentation, "model-se": True}, RunConfig(rounds=3)) == {"model-se": [True, False]}
