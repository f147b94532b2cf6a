"""The server's round loop with an in-process grid: update checks, drops, history, checkpoint and resume."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedbrats.server.federation import Federation
from fedbrats.server.history import RunHistory, read_history
from fedbrats.server.state import load_state
from fedbrats.shared.config import RunConfig
from fedbrats.shared.records import record_digest, record_nbytes
from fedbrats.shared.wallclock import MEDIAN, SiteTiming
from fedbrats.strategies import build_strategy


def _arrays(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 3), value, np.float32)), "b": Array(np.zeros(3, np.float32))})


class FakeGrid:
    """Nodes that 'train' by adding their node id / 10 to every weight; `behaviour` breaks some on purpose."""

    def __init__(self, nodes=(1, 2, 3), behaviour=None):
        self.nodes = list(nodes)
        self.behaviour = behaviour or {}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            kind = self.behaviour.get(node)
            if kind == "silent":
                continue
            if kind == "error":
                replies.append(Message(Error(code=1, reason="no usable cases"), reply_to=msg))
                continue
            arrays = msg.content["arrays"]
            new = {k: Array(v.numpy() + node / 10) for k, v in arrays.items()}
            if kind == "nan":
                new["w"] = Array(np.full((2, 3), np.nan, np.float32))
            if kind == "shape":
                new["w"] = Array(np.zeros((3, 3), np.float32))
            metrics = {"num-examples": 10, "num-val": 2}
            if kind == "steps":  # claims far more local steps than the server asks for
                metrics["local-steps"] = 1000
            if msg.metadata.message_type.startswith("evaluate"):
                metrics.update({"dice-ET": 0.5, "dice-TC": 0.6, "dice-WT": 0.1 * node})
            content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": f"s{node}"})})
            if msg.metadata.message_type.startswith("train"):
                content["arrays"] = ArrayRecord(new)
            replies.append(Message(content=content, reply_to=msg))
        return replies


def _run(tmp_path, grid, rounds=2, min_sites=2, strategy="fedavg"):
    config = RunConfig(rounds=rounds, min_sites=min_sites, out_dir=str(tmp_path))
    federation = Federation(grid, config, build_strategy(strategy), _arrays(), out_dir=tmp_path)
    return federation, federation.run()


def test_fedavg_rounds_are_recorded_and_checkpointed(tmp_path):
    federation, arrays = _run(tmp_path, FakeGrid())
    # equal weights: each round adds mean(0.1, 0.2, 0.3) = 0.2
    np.testing.assert_allclose(arrays["w"].numpy(), 0.4, atol=1e-6)
    history = read_history(tmp_path / "history.jsonl")
    assert [h["round"] for h in history] == [1, 2]
    assert history[0]["mean_dice"]["WT"] == pytest.approx(0.2)
    assert history[0]["bytes_sent"] == record_nbytes(_arrays()) * 6  # 3 train + 3 evaluate messages
    assert record_nbytes(_arrays()) >= (6 + 3) * 4
    # the FeTS medians with the transfers priced by the bytes moved (a tiny model: the 1 s floors)
    median = SiteTiming(**MEDIAN)
    assert history[0]["simulated_round_seconds"] == pytest.approx(1 + 2 * 2 * median.val_seconds_per_case + 10 * median.train_seconds_per_case + 1)
    assert load_state(tmp_path / "server").round == 2


def test_the_simulated_clock_counts_no_more_steps_than_were_asked_for(tmp_path):
    config = RunConfig(rounds=1, min_sites=2, local_steps=3, batch_size=2, out_dir=str(tmp_path))
    liars = FakeGrid(behaviour=dict.fromkeys((1, 2, 3), "steps"))
    Federation(liars, config, build_strategy("fedavg"), _arrays(), out_dir=tmp_path).run()
    median = SiteTiming(**MEDIAN)  # every site reports 1000 steps: counted as the 3 asked for, x batch 2
    expected = 1 + 2 * 2 * median.val_seconds_per_case + 3 * 2 * median.train_seconds_per_case + 1
    assert read_history(tmp_path / "history.jsonl")[0]["simulated_round_seconds"] == pytest.approx(expected)


def test_bad_updates_are_dropped_with_a_reason(tmp_path):
    grid = FakeGrid(nodes=(1, 2, 3, 4, 5), behaviour={2: "nan", 3: "shape", 4: "error", 5: "silent"})
    _, arrays = _run(tmp_path, grid, rounds=1, min_sites=1)
    np.testing.assert_allclose(arrays["w"].numpy(), 0.1, atol=1e-6)  # only node 1 was aggregated
    dropped = {t["site"]: t["dropped"] for t in read_history(tmp_path / "history.jsonl")[0]["train"]}
    assert "non-finite" in dropped["s2"]
    assert "shape (3, 3), expected (2, 3)" in dropped["s3"]
    assert "no usable cases" in dropped["node-4"]
    assert "no reply" in dropped["node-5"]
    assert dropped["s1"] is None


def test_round_fails_without_enough_sites_and_keeps_the_model(tmp_path):
    _, arrays = _run(tmp_path, FakeGrid(behaviour={2: "nan", 3: "error"}), rounds=1)
    np.testing.assert_allclose(arrays["w"].numpy(), 0.0)
    assert read_history(tmp_path / "history.jsonl")[0]["status"].startswith("failed: 1 usable")


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimisers_keep_the_model_dtype(tmp_path, strategy):
    # Flower's FedAdam returns float64 (its bias-corrected step is a NumPy float64): uncast, every update
    # of round 2 was dropped for its dtype and the model stayed at round 1's
    _, arrays = _run(tmp_path, FakeGrid(), rounds=3, strategy=strategy)
    assert {a.dtype for a in arrays.values()} == {"float32"}
    history = read_history(tmp_path / "history.jsonl")
    assert [h["status"] for h in history] == ["ok"] * 3
    assert all(t["dropped"] is None for h in history for t in h["train"])
    assert float(arrays["w"].numpy().mean()) > 0.0  # every site moved the weights up


def test_a_non_finite_aggregate_fails_the_round(tmp_path):
    strategy = build_strategy("fedavg")
    infinite = ArrayRecord({"w": Array(np.full((2, 3), np.inf, np.float32)), "b": Array(np.zeros(3, np.float32))})
    strategy.aggregate_train = lambda rnd, replies: (infinite, None)  # a diverged server optimiser
    config = RunConfig(rounds=1, min_sites=1, out_dir=str(tmp_path))
    federation = Federation(FakeGrid(), config, strategy, _arrays(), out_dir=tmp_path)
    np.testing.assert_array_equal(federation.run()["w"].numpy(), 0.0)
    assert "'w' has non-finite values" in read_history(tmp_path / "history.jsonl")[0]["status"]


def test_resume_gives_identical_weights(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    _, full = _run(full_dir, FakeGrid(), rounds=3)
    _run(part_dir, FakeGrid(), rounds=2)  # "crash" after round 2
    assert record_digest(load_state(part_dir / "server").arrays) != record_digest(full)
    grid = FakeGrid()
    federation, resumed = _run(part_dir, grid, rounds=3)
    assert federation.start_round == 2
    assert record_digest(resumed) == record_digest(full)
    assert [h["round"] for h in read_history(part_dir / "history.jsonl")] == [1, 2, 3]
    assert {m.content["config"]["server-round"] for m in grid.sent} == {3}


def test_history_ignores_a_torn_last_line(tmp_path):
    history = RunHistory(tmp_path / "h.jsonl")
    history.append({"round": 1})
    with open(tmp_path / "h.jsonl", "a") as handle:
        handle.write('{"round": 2, "sta')
    assert history.records() == [{"round": 1}]
    history.truncate_after(0)
    assert history.records() == []


def test_checkpoint_keeps_the_model_array_order(tmp_path):
    from fedbrats.server.state import ServerState, save_state

    arrays = ArrayRecord({"z": Array(np.ones(2, np.float32)), "a": Array(np.zeros(2, np.float32))})
    save_state(tmp_path, ServerState(1, arrays))
    assert list(load_state(tmp_path).arrays.keys()) == ["z", "a"]


def test_fastest_selection_uses_reported_sizes(tmp_path):
    grid = FakeGrid(nodes=(1, 2, 3, 4))
    config = RunConfig(rounds=2, min_sites=1, out_dir=str(tmp_path), selection="fastest", select_k=2)
    federation = Federation(grid, config, build_strategy("fedavg"), _arrays(), out_dir=tmp_path)
    federation.run()
    rounds = read_history(tmp_path / "history.jsonl")
    assert rounds[0]["selected"] == 2 and rounds[1]["selected"] == 2
    trained = [{t["site"] for t in r["train"]} for r in rounds]
    assert trained[0] == {"s1", "s2"}  # unmeasured sites count as 0 s: lowest ids first
    assert trained[1] == {"s3", "s4"}  # s1, s2 are now measured (> 0 s); s3, s4 are not yet


def test_mean_dice_leaves_out_sites_that_released_no_dice():
    """Under DP with suppressed evaluation metrics a site sends only its case count: never a Dice of 0."""
    from fedbrats.server.federation import SiteResult, mean_dice

    results = [
        SiteResult(1, "a", {"dice-ET": 0.5, "dice-TC": 0.6, "dice-WT": 0.8, "num-examples": 3}),
        SiteResult(2, "b", {"num-examples": 12}),
        SiteResult(3, "c", {"dice-ET": 0.9}, dropped="site error"),
    ]
    assert mean_dice(results) == {"ET": 0.5, "TC": 0.6, "WT": 0.8}
    assert mean_dice(results[1:]) == {}
