"""What a site keeps between messages belongs to one run, and the lr schedule follows the server round.

The deployment bug this guards against: ``work-dir/site_state.json`` held the schedule position
with no run identity, so a second run at a hospital started mid-schedule, and a round discarded by a
server restart still advanced the position. The handlers are driven directly with Flower messages.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedbrats.client.algorithms import CONTROL, CONTROL_DELTA, RoundFiles
from fedbrats.client.app import handle_evaluate, handle_train
from fedbrats.client.settings import model_for, schedule_steps, start_step, train_config
from fedbrats.client.site import RUNS_KEPT, Site, cached_site, run_key
from fedbrats.client.trainer import lr_at
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.records import model_to_record

TINY = dict(model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=2, cache="memory",
            rounds=3, warmup_steps=3, min_sites=1)  # fmt: skip
NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, sites=2, cases_per_site=3, voxel_size=5.0, seed=3, progress=False)
    return root


def _config(phantom, out, **changes) -> RunConfig:
    values = dict(data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"), out_dir=str(out))
    return RunConfig(**{**values, **TINY, **changes})


def _train(config: RunConfig, arrays: ArrayRecord, server_round: int, *, run_id: int = 1, control=None, **sent):
    """One train message of `server_round` in Flower run `run_id`, handled as a SuperNode would."""
    TaskIdentity.run_id = run_id
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round, "lr": config.lr, **sent})})
    if control is not None:
        content[CONTROL] = control
    msg = Message(content, dst_node_id=1, message_type="train")
    reply = handle_train(msg, Context(run_id, 1, NODE, RecordDict(), config.to_flower()))
    assert not reply.has_error(), reply.error.reason
    return reply


def _weights(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def _initial(config: RunConfig) -> ArrayRecord:
    import torch

    torch.manual_seed(0)
    return model_to_record(model_for(config))


def _zeros_like(record: ArrayRecord, scale: float = 0.0) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full_like(v.numpy(), scale)) for k, v in record.items()})


def test_two_runs_at_one_site_start_round_one_at_the_same_lr(phantom, tmp_path):
    config = _config(phantom, tmp_path)
    initial = _initial(config)
    first = _train(config, initial, 1, run_id=11)
    later = _train(config, first.content["arrays"], 2, run_id=11)
    second = _train(config, initial, 1, run_id=12)  # the hospital's next run, same work dir

    expected = lr_at(config.local_steps - 1, train_config(config, 3))  # last step of round 1 (warm-up)
    assert first.content["metrics"]["lr"] == pytest.approx(expected) == 2 * config.lr / 3
    assert second.content["metrics"]["lr"] == first.content["metrics"]["lr"]
    assert later.content["metrics"]["lr"] != first.content["metrics"]["lr"]
    # Same round, same start step, same seed: the second run's round 1 is the first run's, bit for bit.
    assert all(np.array_equal(a, _weights(second)[k]) for k, a in _weights(first).items())
    site = cached_site(NODE, config)
    runs = sorted(p.name for p in (site.work_dir / "runs").iterdir())
    assert runs == sorted([run_key(11, config), run_key(12, config)])
    assert sorted(site.load_state(run_key(11, config))["rounds"]) == ["1", "2"]
    assert list(site.load_state(run_key(12, config))["rounds"]) == ["1"]
    assert not (site.work_dir / "site_state.json").exists()


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn", "scaffold"])
def test_a_repeated_round_trains_at_the_same_lr_and_gives_identical_weights(phantom, tmp_path, strategy):
    """As after a server restart: round 2 is sent again; the site must not have moved on."""
    config = _config(phantom, tmp_path)
    sent = {"fedbn": True} if strategy == "fedbn" else {}
    initial = _initial(config)
    control = _zeros_like(initial) if strategy == "scaffold" else None
    one = _train(config, initial, 1, control=control, **sent)
    arrays = one.content["arrays"]
    control_2 = _zeros_like(initial, 1e-3) if strategy == "scaffold" else None
    two = _train(config, arrays, 2, control=control_2, **sent)
    again = _train(config, arrays, 2, control=control_2, **sent)

    assert again.content["metrics"]["lr"] == two.content["metrics"]["lr"]
    assert all(np.array_equal(a, _weights(again)[k]) for k, a in _weights(two).items())
    if strategy == "scaffold":
        deltas = [{k: v.numpy() for k, v in r.content[CONTROL_DELTA].items()} for r in (two, again)]
        assert all(np.array_equal(a, deltas[1][k]) for k, a in deltas[0].items())
    three = _train(config, two.content["arrays"], 3, control=control_2, **sent)
    state = cached_site(NODE, config).load_state(run_key(1, config))
    assert [state["rounds"][r]["start-step"] for r in ("1", "2", "3")] == [0, 2, 4]  # the repeat did not count
    assert three.content["metrics"]["lr"] == pytest.approx(lr_at(5, train_config(config, 3)))
    if strategy != "fedavg":
        stem = "fedbn_norms" if strategy == "fedbn" else "scaffold_control"
        files = RoundFiles(cached_site(NODE, config).run_dir(run_key(1, config)), stem)
        assert files.rounds() == [2, 3]  # the newest two versions


def test_a_run_with_other_settings_does_not_inherit_state(phantom, tmp_path):
    config = _config(phantom, tmp_path)
    initial = _initial(config)
    one = _train(config, initial, 1, fedbn=True)
    _train(config, one.content["arrays"], 2, fedbn=True)
    other = config.replace(lr=2e-3)  # same Flower run id (as a test harness or a reused id would give)
    assert run_key(1, other) != run_key(1, config)
    site = cached_site(NODE, other)
    assert site.load_state(run_key(1, other)) == {}
    assert RoundFiles(site.run_dir(run_key(1, other)), "fedbn_norms").rounds() == []
    reply = _train(other, initial, 1, fedbn=True)
    assert reply.content["metrics"]["lr"] == pytest.approx(2 * other.lr / 3)  # round 1, step 1 of warm-up
    assert list(site.load_state(run_key(1, other))["rounds"]) == ["1"]
    # FedBN evaluation reads the norms of its own run.
    TaskIdentity.run_id = 1
    evaluate = Message(RecordDict({"arrays": reply.content["arrays"], "config": ConfigRecord({"server-round": 1, "fedbn": True})}),
                       dst_node_id=1, message_type="evaluate")  # fmt: skip
    scored = handle_evaluate(evaluate, Context(1, 1, NODE, RecordDict(), other.to_flower()))
    assert not scored.has_error() and 0.0 <= scored.content["metrics"]["mean-dice"] <= 1.0


def test_a_site_keeps_the_folders_of_its_latest_runs_only(tmp_path):
    site = Site("7", None, None, tmp_path)  # the datasets play no part in the state
    keys = [f"{i}-abc" for i in range(RUNS_KEPT + 2)]
    for i, key in enumerate(keys):
        site.save_state(key, {"n": i})
        stamp = 1_000_000 + i
        os.utime(site.run_dir(key), (stamp, stamp))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(keys[-RUNS_KEPT:])
    assert site.load_state(keys[-1]) == {"n": RUNS_KEPT + 1} and site.load_state("unknown") == {}


def test_the_schedule_position_follows_the_round_with_epoch_decay():
    config = RunConfig(rounds=3, local_epochs=4, epoch_decay=0.5, batch_size=2, lr_schedule="poly")
    # 5 cases, batch 2: 3 steps an epoch; epochs 4, 2, 1 (strategies.selection.epochs_at)
    assert [start_step(config, 5, r) for r in (1, 2, 3)] == [0, 12, 18]
    assert schedule_steps(config, 5) == 21
    local = train_config(config, 5, {"server-round": 2, "local-epochs": 2, "lr": 5e-4, "proximal-mu": 0.1})
    assert (local.epochs, local.steps, local.lr, local.proximal_mu, local.total_steps) == (2, None, 5e-4, 0.1, 21)
    assert lr_at(schedule_steps(config, 5), local) == 0.0
    by_steps = train_config(RunConfig(rounds=4, local_steps=7), 5)
    assert (by_steps.steps, by_steps.epochs, by_steps.total_steps) == (7, None, 28)
    assert start_step(RunConfig(rounds=4, local_steps=7), 5, 3) == 14
    with pytest.raises(ValueError, match="counted from 1"):
        start_step(config, 5, 0)


def test_a_resumed_run_finds_its_state_under_a_new_flower_run_id(phantom, tmp_path):
    """The server's run key survives a resubmission (new Flower run id); a new run's key does not match."""
    config = _config(phantom, tmp_path)
    initial = _initial(config)
    one = _train(config, initial, 1, run_id=21, fedbn=True, **{"run-key": "0123456789abcdef"})
    site = cached_site(NODE, config)
    kept = site.run_dir(run_key(21, config, "0123456789abcdef"))
    assert RoundFiles(kept, "fedbn_norms").rounds() == [1]
    assert run_key(99, config, "0123456789abcdef") == run_key(21, config, "0123456789abcdef")
    assert run_key(99, config, "fedcba9876543210") != run_key(21, config, "0123456789abcdef")
    assert run_key(5, config, "../../etc") == run_key(5, config)  # not a key: ignored, never a path
    again = _train(config, one.content["arrays"], 2, run_id=22, fedbn=True, **{"run-key": "0123456789abcdef"})
    assert RoundFiles(kept, "fedbn_norms").rounds() == [1, 2]
    assert not again.has_error()
