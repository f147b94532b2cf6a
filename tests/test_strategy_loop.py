"""Strategies inside the server's round loop: resume equality, the hooks the loop calls, per-round instructions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedbrats.strategies import available_strategies, build_strategy
from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.hooks import RoundHooks, StrategyHooks, hooks_of
from tests.test_strategies import COMMON, Grid, _through_disk, record, reply


# --- through the server's round loop ---------------------------------------------------------
class LossGrid(Grid):
    """Sites that add node/10 to every weight, report losses that depend on round and site, and
    answer SCAFFOLD's control variate; replies come back in a different order every round."""

    def __init__(self, nodes=(1, 2, 3)):
        super().__init__(nodes)
        self.calls = 0

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            rnd = msg.content["config"]["server-round"]
            content = RecordDict({"metrics": MetricRecord({"num-examples": node, "num-val": 1,
                                                           "loss-before": 1.0 / rnd, "loss-after": 0.9 / rnd - 0.05 * node}),
                                  "site": ConfigRecord({"name": f"s{node}"})})
            if msg.metadata.message_type == MessageType.TRAIN:
                new = {k: v.numpy() + node / 10 for k, v in msg.content["arrays"].items()}
                if "control" in msg.content.array_records:  # the control variate steers local training
                    control = {k: v.numpy() for k, v in msg.content["control"].items()}
                    new = {k: v - 0.5 * control[k] for k, v in new.items()}
                    content["control-delta"] = ArrayRecord({k: Array(v * 0 + node / 100) for k, v in control.items()})
                content["arrays"] = ArrayRecord({k: Array(v) for k, v in new.items()})
            replies.append(Message(content=content, reply_to=msg))
        return replies[self.calls % 2:] + replies[: self.calls % 2]


@pytest.mark.parametrize("name", ["fedpidavg", "scaffold", "fets_clipped"])
def test_server_resume_gives_identical_weights(tmp_path, name):
    from fedbrats.server.federation import Federation
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.records import record_digest

    def run(out, rounds):
        config = RunConfig(rounds=rounds, min_sites=2, out_dir=str(out))
        start = record(w=np.linspace(0, 1, 6).reshape(2, 3), b=[0.5, -0.5, 0.0])
        return Federation(LossGrid(), config, build_strategy(name), start, out_dir=out).run()

    full = run(tmp_path / "full", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4)
    assert record_digest(resumed) == record_digest(full)


# --- the round loop's hooks (strategies/hooks.py) ----------------------------------------------
def _defined_here(strategy) -> bool:
    return type(strategy).__module__.startswith("fedbrats.")


@pytest.mark.parametrize("name", available_strategies())
def test_every_registered_strategy_gives_the_round_loop_its_hooks(name):
    strategy = build_strategy(name)
    hooks = hooks_of(strategy)
    assert isinstance(hooks, RoundHooks)
    if _defined_here(strategy):  # ours implement the hooks themselves; Flower's classes get the defaults
        assert hooks is strategy and isinstance(strategy, StrategyHooks)
    else:
        assert type(strategy).__module__.startswith("flwr.") and hooks is not strategy
    assert hooks.min_replies >= 1 and all(isinstance(m, str) for m in hooks.required_metrics)
    config = hooks.train_config(3, ConfigRecord({"server-round": 3, "lr": 0.5}))
    assert config["server-round"] == 3 and config["lr"] == 0.5  # a strategy adds, never overrides the loop's keys
    arrays, meta = hooks.state_dict()
    assert isinstance(arrays, dict) and json.loads(json.dumps(meta)) == meta  # meta goes to JSON as it is
    good = reply(1, {"w": [1.0]}, {"num-examples": 2, "train-loss": 0.5, "local-steps": 3, "loss-before": 1.0,
                                   "loss-after": 0.5}, control_delta={"w": [0.0]})
    if name == "scaffold":
        list(strategy.configure_train(1, record(w=[0.0]), ConfigRecord({}), Grid([1])))  # sets the control variate
    assert hooks.reply_problem(good) is None, name


def test_the_round_loop_calls_hooks_instead_of_probing_the_strategy():
    import inspect

    from fedbrats.server import federation

    source = inspect.getsource(federation)
    probes = re.findall(r"(?:hasattr|getattr)\(\s*self\.strategy", source)
    assert probes == [], "the round loop must call fedbrats.strategies.hooks.hooks_of(strategy), not probe it"
    assert "hooks_of(strategy)" in source


def test_partial_hooks_are_an_error_and_stateless_strategies_refuse_state():
    class HalfDone(FedAvg):
        def state_dict(self):
            return {"m": np.zeros(1)}, {}

    with pytest.raises(TypeError, match="inherit fedbrats.strategies.hooks.StrategyHooks"):
        hooks_of(HalfDone(**COMMON))
    for strategy in (build_strategy("fedavg"), build_strategy("fedbn")):
        hooks_of(strategy).load_state_dict({}, {})  # nothing to restore: fine
        with pytest.raises(ValueError, match="keeps none"):
            hooks_of(strategy).load_state_dict({}, {"history": {"s1": [0.5]}})


def test_bulyan_says_how_many_replies_it_needs():
    assert hooks_of(build_strategy("bulyan", {"num_malicious_nodes": 2.0})).min_replies == 11
    assert hooks_of(build_strategy("krum")).min_replies == 1


def test_client_dp_wrapper_passes_the_inner_strategys_hooks_through():
    from fedbrats.strategies.client_dp import with_client_dp

    def wrapped(name, params=None):
        return with_client_dp(build_strategy(name, params), noise_multiplier=1.0, num_sampled_sites=2, total_sites=2)

    assert isinstance(wrapped("fedavg"), RoundHooks)
    assert hooks_of(wrapped("bulyan", {"num_malicious_nodes": 1.0})).min_replies == 7
    assert wrapped("fedbn").train_config(1, ConfigRecord({}))["fedbn"] is True
    assert wrapped("fedpidavg").train_config(1, ConfigRecord({}))["report-loss"] is True
    missing = reply(1, {"w": [0.0]}, {"loss-before": 1.0})
    assert "no metric 'loss-after'" in wrapped("fedpidavg").reply_problem(missing)
    dp = wrapped("fedpidavg")
    dp.strategy.history = {"s1": [0.5, 0.4]}
    dp.releases = 3
    restored = wrapped("fedpidavg")
    restored.load_state_dict(*_through_disk(dp.state_dict()))
    assert restored.strategy.history == {"s1": [0.5, 0.4]} and restored.releases == 3
    with pytest.raises(ValueError, match="keeps none"):  # the DP wrapper's own state is not the inner one's
        wrapped("fedavg").load_state_dict({}, {"history": {}, "client_dp": {"releases": 1, "clipping_norm": 1.0}})


class ConfigGrid(LossGrid):
    """LossGrid that keeps the config of every message it sends, per message type."""

    def __init__(self, nodes=(1, 2, 3)):
        super().__init__(nodes)
        self.configs: dict[str, list[dict]] = {MessageType.TRAIN: [], MessageType.EVALUATE: []}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            self.configs[msg.metadata.message_type].append(dict(msg.content["config"]))
        return super().send_and_receive(messages, timeout=timeout)


def _run_loop(tmp_path, name, **config):
    from fedbrats.server.federation import Federation
    from fedbrats.shared.config import RunConfig

    grid = ConfigGrid()
    run_config = RunConfig(min_sites=2, selection="all", out_dir=str(tmp_path), **config)
    Federation(grid, run_config, build_strategy(name), record(w=[0.0, 1.0]), out_dir=tmp_path).run()
    return grid.configs


def test_the_loop_sends_each_strategys_instructions(tmp_path):
    fedbn = _run_loop(tmp_path / "fedbn", "fedbn", rounds=1)
    assert fedbn[MessageType.TRAIN] and all(c["fedbn"] is True for c in fedbn[MessageType.TRAIN])
    assert fedbn[MessageType.EVALUATE] and all(c["fedbn"] is True for c in fedbn[MessageType.EVALUATE])
    pid = _run_loop(tmp_path / "pid", "fedpidavg", rounds=1)
    assert all(c["report-loss"] is True for c in pid[MessageType.TRAIN])
    plain = _run_loop(tmp_path / "plain", "fedavg", rounds=1)
    assert not any("fedbn" in c or "report-loss" in c for c in plain[MessageType.TRAIN])


def test_the_loop_sends_the_lr_of_each_round(tmp_path):
    from fedbrats.server.federation import Federation
    from fedbrats.shared.config import RunConfig

    configs = _run_loop(tmp_path / "step", "fedavg", rounds=3, lr=0.01, lr_round_schedule="step:milestone=3,decay=0.1")
    by_round = {c["server-round"]: c["lr"] for c in configs[MessageType.TRAIN]}
    assert by_round == pytest.approx({1: 0.01, 2: 0.01, 3: 0.001})
    constant = _run_loop(tmp_path / "constant", "fedavg", rounds=2, lr=0.01)
    assert {c["lr"] for c in constant[MessageType.TRAIN]} == {0.01}
    bad = RunConfig(lr_round_schedule="exponential:decay=2", out_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="lr-round-schedule"):  # refused before any round runs
        Federation(ConfigGrid(), bad, build_strategy("fedavg"), record(w=[0.0]), out_dir=tmp_path / "bad")


def test_registering_a_second_strategy_under_a_taken_name_is_refused():
    from fedbrats.strategies import register_strategy

    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fedavg")(FedProx)
    assert build_strategy("fedavg").__class__ is ReweightedFedAvg  # the first registration stands
