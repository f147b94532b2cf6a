"""Aggregation strategies: hand-computed results on tiny arrays, equality with Flower, resume equality."""

from __future__ import annotations

import copy
import gc
import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedbrats.strategies import available_strategies, build_strategy
from fedbrats.strategies.arithmetic import array_view, mix, record_views, to_record, weighted_average
from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.fedbn import keep_local_norms, norm_param_names, split_norm_params
from fedbrats.strategies.hooks import hooks_of
from fedbrats.strategies.scaffold import client_control_update, gradient_correction

COMMON = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def reply(node, arrays, metrics, *, site=None, control_delta=None) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 1, **metrics}),
            "site": ConfigRecord({"name": site or f"s{node}"}),
        }
    )
    if control_delta is not None:
        content["control-delta"] = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in control_delta.items()})
    return Message(content=content, reply_to=sent)


def record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})


def round_of(strategy, rnd, global_arrays, replies) -> dict[str, np.ndarray]:
    nodes = [r.metadata.src_node_id for r in replies]
    list(strategy.configure_train(rnd, global_arrays, ConfigRecord({}), Grid(nodes)))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return {k: v.numpy() for k, v in arrays.items()}


# --- shared arithmetic ---------------------------------------------------------------------
def test_array_view_reads_without_copying():
    for values in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((2, 3))),
                   np.array(2.5, np.float32), np.arange(4, dtype=np.int64)):
        view = array_view(Array(values))
        assert view.dtype == values.dtype and view.shape == values.shape
        np.testing.assert_array_equal(view, values)
        assert not view.flags.writeable  # a view into the message's bytes, not a copy


def assert_float32_close(got, expected):
    """Equal to float32 rounding: our weighted mean adds each update with one fused BLAS axpy, Flower
    multiplies and adds (two roundings), so the last bits may differ (a few ulp at most)."""
    expected = np.asarray(expected)
    assert np.asarray(got).dtype == expected.dtype
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * scale)


def test_weighted_average_matches_flower_to_float32_rounding():
    rng = np.random.default_rng(0)
    contents = [
        RecordDict({"arrays": record(w=rng.normal(size=(5, 7)), b=rng.normal(size=3), big=rng.normal(size=200_003)),
                    "metrics": MetricRecord({"num-examples": n})})
        for n in (3, 11, 5)
    ]
    flower = aggregate_arrayrecords(contents, "num-examples")
    ours = weighted_average([record_views(c["arrays"]) for c in contents], [3, 11, 5])
    for name in ("w", "b", "big"):  # "big": several blocks of the kernel, the last one partial
        assert_float32_close(ours[name], flower[name].numpy())
        exact = sum(c["arrays"][name].numpy().astype(np.float64) * n for c, n in zip(contents, (3, 11, 5), strict=True)) / 19
        assert np.abs(ours[name] - exact).max() <= np.abs(flower[name].numpy() - exact).max() * 2 + 1e-7
    mixed_order = [{"w": np.asfortranarray(c["arrays"]["w"].numpy())} if i == 1 else {"w": c["arrays"]["w"].numpy()}
                   for i, c in enumerate(contents)]
    assert np.array_equal(weighted_average(mixed_order, [3, 11, 5])["w"], ours["w"])  # deterministic, any layout
    half = [{"h": c["arrays"]["w"].numpy().astype(np.float16)} for c in contents]  # no BLAS axpy: numpy's path
    got = weighted_average(half, [3, 11, 5])["h"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, ours["w"], rtol=4e-3, atol=4e-3)


def test_mix_drops_a_term_without_information():
    assert mix([(0.5, [1, 3]), (0.5, [2, 2])]) == pytest.approx([0.375, 0.625])
    assert mix([(0.45, [1, 3]), (0.45, [0, 0]), (0.1, [1, 1])]) == pytest.approx(
        [(0.45 * 0.25 + 0.05) / 0.55, (0.45 * 0.75 + 0.05) / 0.55])
    with pytest.raises(ValueError, match=">= 0"):
        mix([(1.0, [1, -1])])


def test_our_fedavg_equals_flowers_in_any_arrival_order():
    rng = np.random.default_rng(1)
    replies = [reply(n, {"w": rng.normal(size=6)}, {"num-examples": n * 2}) for n in (1, 2, 3)]
    start = record(w=np.zeros(6))
    ours = round_of(ReweightedFedAvg(**COMMON), 1, start, list(reversed(replies)))
    in_order = round_of(ReweightedFedAvg(**COMMON), 1, start, replies)
    flower = round_of(FedAvg(**COMMON), 1, start, replies)
    assert np.array_equal(ours["w"], in_order["w"])  # replies are put in site order: same bits
    assert_float32_close(ours["w"], flower["w"])


def test_to_record_holds_the_bytes_flower_would_write():
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array(2.5, np.float32),
              "f": np.asfortranarray(np.ones((2, 3))), "i": np.arange(4)}
    ours = to_record(arrays)
    for name, value in arrays.items():
        assert ours[name].data == Array(np.ascontiguousarray(value)).data
        np.testing.assert_array_equal(record_views(ours)[name], value)


# --- FeTS aggregations ---------------------------------------------------------------------
def test_fets_clipped_clips_each_change_to_the_pooled_80th_percentile():
    start = record(w=[0, 0, 0, 0], b=[1, 1])
    replies = [
        reply(1, {"w": [1, 2, 3, 4], "b": [1, 1]}, {"num-examples": 1}),
        reply(2, {"w": [-1, 0, 10, 2], "b": [1, 1]}, {"num-examples": 3}),
    ]
    # |changes| pooled: 0 1 1 2 2 3 4 10 -> 80th percentile (linear) = 3.6
    # clipped: s1 [1 2 3 3.6], s2 [-1 0 3.6 2]; weights 1/4, 3/4
    got = round_of(build_strategy("fets_clipped", {"pooled": 1}), 1, start, replies)  # FeTS's own rule
    np.testing.assert_allclose(got["w"], [-0.5, 0.5, 3.45, 2.4], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [1, 1])
    assert got["w"].dtype == np.float32


def test_fedcostwavg_weights_by_size_and_cost_ratio():
    start = record(w=[0, 0])
    replies = [
        reply(1, {"w": [4, 4]}, {"num-examples": 1, "loss-before": 1.0, "loss-after": 0.5}),  # k = 2
        reply(2, {"w": [0, 0]}, {"num-examples": 3, "loss-before": 0.9, "loss-after": 0.9}),  # k = 1
    ]
    strategy = build_strategy("fedcostwavg")
    got = round_of(strategy, 1, start, replies)
    w1 = 0.5 * 1 / 4 + 0.5 * 2 / 3
    assert strategy.last_weights == pytest.approx({"s1": w1, "s2": 1 - w1})
    np.testing.assert_allclose(got["w"], [4 * w1] * 2, rtol=1e-6)


def _pid_replies(losses):
    """losses: {node: (size, before, after)}; site n's model is all n."""
    return [reply(n, {"w": [n, n]}, {"num-examples": s, "loss-before": b, "loss-after": a})
            for n, (s, b, a) in losses.items()]


def test_fedpidavg_hand_computed_over_two_rounds():
    strategy = build_strategy("fedpidavg")
    start = record(w=[0, 0])
    # round 1: k = 0.4, 0.1 (K 0.5); m = 0.6, 0.9 (I 1.5); s = 1, 3
    round_of(strategy, 1, start, _pid_replies({1: (1, 1.0, 0.6), 2: (3, 1.0, 0.9)}))
    w1 = 0.45 * 0.25 + 0.45 * 0.8 + 0.1 * 0.4
    assert strategy.last_weights == pytest.approx({"s1": w1, "s2": 1 - w1})
    # round 2: site 1's loss rose -> k = 0, 0.1; m = 1.2, 1.6 (I 2.8)
    got = round_of(strategy, 2, start, _pid_replies({1: (1, 0.5, 0.6), 2: (3, 0.8, 0.7)}))
    w1 = 0.45 * 0.25 + 0.0 + 0.1 * 1.2 / 2.8
    assert strategy.last_weights == pytest.approx({"s1": w1, "s2": 1 - w1})
    np.testing.assert_allclose(got["w"], [w1 * 1 + (1 - w1) * 2] * 2, rtol=1e-6)
    assert strategy.history == {"s1": pytest.approx([0.6, 0.6]), "s2": pytest.approx([0.9, 0.7])}


def test_fedpidavg_keeps_only_the_window_and_survives_no_improvement():
    strategy = build_strategy("fedpidavg", {"window": 2.0})
    start = record(w=[0, 0])
    for rnd, after in enumerate((0.9, 0.8, 0.7), start=1):
        round_of(strategy, rnd, start, _pid_replies({1: (1, 0.5, after), 2: (1, 0.5, 1.0)}))  # nobody improves
    assert strategy.history["s1"] == pytest.approx([0.8, 0.7])
    m1, m2 = 1.5, 2.0  # k term dropped, alpha and gamma rescaled
    expected = (0.45 * 0.5 + 0.1 * m1 / (m1 + m2)) / 0.55
    assert strategy.last_weights["s1"] == pytest.approx(expected)


def test_unusable_loss_metrics_leave_a_site_out_with_a_reason(caplog):
    strategy = build_strategy("fedcostwavg")
    missing = reply(2, {"w": [9, 9]}, {"num-examples": 1, "loss-before": 0.0, "loss-afterwards": 1.0})
    assert "no metric 'loss-after'" in strategy.reply_problem(missing)
    good = reply(1, {"w": [1, 1]}, {"num-examples": 1, "loss-before": 1.0, "loss-after": 0.5})
    broken = reply(2, {"w": [9, 9]}, {"num-examples": 1, "loss-before": 1.0, "loss-after": float("nan")})
    with caplog.at_level(logging.WARNING, logger="fedbrats.strategies"):
        got = round_of(build_strategy("fedpidavg"), 1, record(w=[0, 0]), [good, broken])
    np.testing.assert_allclose(got["w"], [1, 1])
    assert "leaves out s2" in caplog.text and "nan" in caplog.text


def test_fets_fedavgm_starts_its_velocity_after_round_one():
    start = record(w=[0.0])
    fets, flower = build_strategy("fets_fedavgm"), FedAvgM(server_momentum=0.9, **COMMON)
    x_fets, x_flower = start, start
    results = []
    for rnd, value in enumerate((1.0, 3.0, 4.0), start=1):
        a = round_of(fets, rnd, x_fets, [reply(1, {"w": [value]}, {})])
        b = round_of(flower, rnd, x_flower, [reply(1, {"w": [value]}, {})])
        x_fets, x_flower = record(**a), record(**b)
        results.append((float(a["w"][0]), float(b["w"][0])))
    # round 1: both FedAvg. round 2: FeTS v = pg2 = -2 -> 3; Flower v = 0.9 * -1 - 2 -> 3.9
    # round 3: FeTS v = 0.9 * -2 - 1 = -2.8 -> 5.8
    assert results[0] == pytest.approx((1.0, 1.0))
    assert results[1] == pytest.approx((3.0, 3.9))
    assert results[2][0] == pytest.approx(5.8)


def test_fednova_normalises_by_local_steps():
    start = record(w=[0, 0])
    replies = [reply(1, {"w": [1, 1]}, {"local-steps": 1}), reply(2, {"w": [2, 2]}, {"local-steps": 4})]
    # d = -1, -0.5; sum p d = -0.75; tau_eff = 2.5 -> 1.875 (FedAvg: 1.5)
    np.testing.assert_allclose(round_of(build_strategy("fednova"), 1, start, replies)["w"], [1.875] * 2)
    equal = [reply(1, {"w": [1, 3]}, {"local-steps": 7}), reply(2, {"w": [2, 5]}, {"local-steps": 7})]
    np.testing.assert_allclose(round_of(build_strategy("fednova"), 1, start, equal)["w"], [1.5, 4.0], rtol=1e-6)
    assert "local-steps must be > 0" in build_strategy("fednova").reply_problem(reply(3, {"w": [0, 0]}, {"local-steps": 0}))


# --- FedBN -----------------------------------------------------------------------------
def test_fedbn_flags_sites_and_finds_norm_layers_by_type():
    import torch.nn as nn

    strategy = build_strategy("fedbn")  # the flag travels in the round's configs (hooks; through the loop below)
    assert strategy.train_config(1, ConfigRecord({"lr": 0.1}))["fedbn"] is True
    assert strategy.evaluate_config(1, ConfigRecord({}))["fedbn"] is True
    assert "fedbn" not in hooks_of(build_strategy("fedavg")).train_config(1, ConfigRecord({}))

    model = nn.Sequential(nn.Conv3d(1, 8, 3), nn.GroupNorm(2, 8), nn.Sequential(nn.Conv3d(8, 8, 1), nn.GroupNorm(2, 8)))
    names = list(model.state_dict())
    norms = norm_param_names(model)
    assert norms == ["1.bias", "1.weight", "2.1.bias", "2.1.weight"]
    norm, other = split_norm_params(names, norm_names=norms)
    assert norm == ["1.weight", "1.bias", "2.1.weight", "2.1.bias"] and other == ["0.weight", "0.bias", "2.0.weight", "2.0.bias"]
    by_name = split_norm_params(["enc.conv1.weight", "enc.norm1.weight", "gn.bias", "shortcut.1.weight"])
    assert by_name == (["enc.norm1.weight", "gn.bias"], ["enc.conv1.weight", "shortcut.1.weight"])
    assert keep_local_norms({"a": 1, "n": 2}, {"n": 5}) == {"a": 1, "n": 5}
    assert keep_local_norms({"a": 1, "n": 2}, None) == {"a": 1, "n": 2}
    with pytest.raises(ValueError, match="not in the global model"):
        keep_local_norms({"a": 1}, {"gone": 0})


# --- SCAFFOLD --------------------------------------------------------------------------
def test_scaffold_server_and_client_updates():
    strategy = build_strategy("scaffold", {"num_sites": 4.0})
    start = record(w=[0, 0])
    msgs = list(strategy.configure_train(1, start, ConfigRecord({}), Grid([1, 2])))
    np.testing.assert_array_equal(msgs[0].content["control"]["w"].numpy(), [0, 0])
    replies = [
        reply(1, {"w": [1, 1]}, {}, control_delta={"w": [0.5, 0.5]}),
        reply(2, {"w": [3, 3]}, {}, control_delta={"w": [1.5, 1.5]}),
        reply(3, {"w": [100, 100]}, {}),  # no control-delta: left out
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [2, 2])  # x + mean(y - x)
    np.testing.assert_allclose(strategy.control["w"], [0.5, 0.5])  # 0 + (2/4) * mean(0.5, 1.5)
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord({}), Grid([1])))
    np.testing.assert_allclose(msgs[0].content["control"]["w"].numpy(), [0.5, 0.5])
    assert "no 'control-delta'" in strategy.reply_problem(replies[2])

    c = {"w": np.array([0.5], np.float32)}
    new, delta = client_control_update(None, c, {"w": np.array([1.0], np.float32)}, {"w": np.array([0.8], np.float32)}, 2, 0.1)
    np.testing.assert_allclose(new["w"], [0.5], rtol=1e-6)  # 0 - 0.5 + 0.2 / (2 * 0.1)
    np.testing.assert_allclose(delta["w"], [0.5], rtol=1e-6)
    np.testing.assert_allclose(gradient_correction(c, new)["w"], [0.0], atol=1e-6)
    with pytest.raises(ValueError, match="steps > 0"):
        client_control_update(None, c, c, c, 0, 0.1)


def test_scaffold_weights_sites_by_cases_and_keeps_c_the_case_weighted_mean_of_the_sites_c_i():
    """Default: FedAvg's weights for the model, and c stays sum_i (n_i / n) c_i over rounds with partial
    participation; `uniform=1` gives the paper's plain means."""
    sizes = {"a": 1.0, "b": 3.0, "c": 6.0}
    c_local = {site: np.zeros(2) for site in sizes}
    strategy = build_strategy("scaffold", {})
    uniform = build_strategy("scaffold", {"uniform": 1.0, "num_sites": 3.0})
    x = record(w=[0, 0])
    rng = np.random.default_rng(3)
    for rnd, present in enumerate([("a", "b", "c"), ("b", "c"), ("a", "c"), ("a", "b", "c")], start=1):
        replies, ys = [], {}
        for node, site in enumerate(present, start=1):
            ys[site], dc = rng.normal(size=2), rng.normal(size=2)
            c_local[site] = c_local[site] + dc
            replies.append(reply(node, {"w": ys[site]}, {"num-examples": sizes[site]}, site=site, control_delta={"w": dc}))
        arrays = round_of(strategy, rnd, x, replies)
        n_s = sum(sizes[s] for s in present)
        np.testing.assert_allclose(arrays["w"], sum(sizes[s] / n_s * ys[s] for s in present), rtol=1e-5)
        weighted_c = sum(sizes[s] / sum(sizes.values()) * c_local[s] for s in sizes)
        np.testing.assert_allclose(strategy.control["w"], weighted_c, rtol=1e-5, atol=1e-6)
        plain = round_of(uniform, rnd, x, replies)
        np.testing.assert_allclose(plain["w"], np.mean([ys[s] for s in present], axis=0), rtol=1e-5)
        np.testing.assert_allclose(uniform.control["w"], np.mean(list(c_local.values()), axis=0), rtol=1e-5, atol=1e-6)
    arrays_meta = strategy.state_dict()
    resumed = build_strategy("scaffold", {})
    resumed.load_state_dict(*arrays_meta)
    assert resumed.site_sizes == sizes
    zero = reply(1, {"w": [1, 1]}, {"num-examples": 0}, control_delta={"w": [0, 0]})
    assert "expected > 0" in strategy.reply_problem(zero)  # a site with no case cannot steer c
    with pytest.raises(ValueError, match="uniform 0 or 1"):
        build_strategy("scaffold", {"uniform": 0.5})


# --- Flower equality and the registry ------------------------------------------------------
def _start(rng):
    w, b = rng.normal(size=(3, 4)), rng.normal(size=2)
    return record(b=b, w=w)  # the order the fake sites send (sorted), as real sites send their model's order


def _rounds(strategy, rounds=range(1, 4), arrays=None, rng=None, n_sites=5):
    """Rounds of random site updates (reproducible from `rng`); the global arrays after each round."""
    rng = rng or np.random.default_rng(0)
    arrays = arrays or _start(rng)
    scaffold = type(strategy).__name__ == "Scaffold"
    outputs = []
    for rnd in rounds:
        views = dict(sorted(record_views(arrays).items()))  # same draws whatever order the arrays come in
        replies = [
            reply(n, {k: v + rng.normal(scale=0.1 * n, size=v.shape) for k, v in views.items()},
                  {"num-examples": n + 1, "train-loss": 0.5 + 0.1 * n, "local-steps": 2 + n,
                   "loss-before": 1.0 - 0.02 * rnd, "loss-after": 0.9 - 0.03 * n - 0.01 * rnd * n},
                  control_delta={k: rng.normal(size=v.shape) for k, v in views.items()} if scaffold else None)
            for n in range(1, n_sites + 1)
        ]
        result = round_of(strategy, rnd, arrays, replies)
        arrays = record(**result)
        outputs.append(result)
    return outputs


# equal to Flower's to float32 rounding: our weighted mean (one fused axpy a term), Bulyan's kept values summed
# in ascending order; the others bit for bit
ROUNDED = ("fedavg", "fedprox", "fedavgm", "multikrum", "bulyan")


@pytest.mark.parametrize(
    ("name", "params", "flower"),
    [
        ("fedavg", {}, lambda: FedAvg(**COMMON)),
        ("fedprox", {"proximal_mu": 0.1}, lambda: FedProx(proximal_mu=0.1, **COMMON)),
        ("fedavgm", {"server_momentum": 0.9, "server_learning_rate": 0.5}, lambda: FedAvgM(server_momentum=0.9, server_learning_rate=0.5, **COMMON)),
        ("fedadam", {"eta": 0.01}, lambda: FedAdam(eta=0.01, **COMMON)),
        ("fedyogi", {}, lambda: FedYogi(**COMMON)),
        ("fedadagrad", {}, lambda: FedAdagrad(**COMMON)),
        ("fedmedian", {}, lambda: FedMedian(**COMMON)),
        ("fedtrimmedavg", {"beta": 0.2}, lambda: FedTrimmedAvg(beta=0.2, **COMMON)),
        ("krum", {"num_malicious_nodes": 1.0}, lambda: Krum(num_malicious_nodes=1, **COMMON)),
        ("multikrum", {"num_malicious_nodes": 1.0, "num_nodes_to_select": 2.0},
         lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=2, **COMMON)),
        ("bulyan", {"num_malicious_nodes": 0.0}, lambda: Bulyan(**COMMON)),
        ("qfedavg", {"client_learning_rate": 0.01}, lambda: QFedAvg(0.01, train_loss_key="train-loss", **COMMON)),
    ],
)
def test_registered_flower_strategies_equal_flowers_classes(name, params, flower, monkeypatch):
    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # Bulyan and QFedAvg force a 1 s gc every round
    ours, theirs = _rounds(build_strategy(name, params)), _rounds(flower())
    for a, b in zip(ours, theirs, strict=True):
        for key in a:
            if name in ROUNDED:
                assert_float32_close(a[key], b[key])
            else:
                assert np.array_equal(a[key], b[key]), (name, key)


def test_fedavg_and_fedprox_run_on_our_aggregation_and_send_proximal_mu():
    fedavg, fedprox = build_strategy("fedavg"), build_strategy("fedprox", {"proximal_mu": 0.25})
    assert isinstance(fedavg, ReweightedFedAvg) and isinstance(fedprox, ReweightedFedAvg)
    messages = list(fedprox.configure_train(1, record(w=[0.0]), ConfigRecord({}), Grid([1, 2])))
    assert [m.content["config"]["proximal-mu"] for m in messages] == [0.25, 0.25]
    unweighted = reply(2, {"w": [9.0]}, {})
    del unweighted.content["metrics"]
    assert "num-examples" in fedavg.reply_problem(unweighted)  # left out with a reason, not a failed round


def test_qfedavg_pairs_arrays_by_name():
    replies = lambda: [reply(n, {"w": [n, 2 * n, 0], "b": [n]}, {"train-loss": 0.1 * n}) for n in (1, 2)]  # noqa: E731
    forward = round_of(build_strategy("qfedavg"), 1, record(w=[0, 0, 0], b=[1]), replies())
    backward = round_of(build_strategy("qfedavg"), 1, record(b=[1], w=[0, 0, 0]), replies())
    for key in forward:
        assert np.array_equal(forward[key], backward[key])


def test_every_registered_name_builds_and_summarises():
    names = available_strategies()
    for expected in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg",
                     "krum", "multikrum", "bulyan", "qfedavg", "fets_clipped", "fets_fedavgm", "fedcostwavg",
                     "fedpidavg", "fednova", "fedbn", "scaffold"):
        assert expected in names
    for name in names:
        build_strategy(name).summary()
    with pytest.raises(ValueError, match="whole number"):
        build_strategy("krum", {"num_malicious_nodes": 1.5})
    with pytest.raises(ValueError, match="bad parameters"):
        build_strategy("fedpidavg", {"kappa": 1.0})


# --- resume equality -------------------------------------------------------------------------
def _through_disk(state):
    """The strategy state as the server checkpoint stores it: safetensors arrays and JSON meta."""
    arrays, meta = state
    blob = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    return (st_load(blob) if blob else {}), json.loads(json.dumps(meta))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm", "fets_fedavgm", "fedpidavg", "scaffold"])
def test_a_resumed_strategy_continues_identically(name):
    params = {"server_momentum": 0.9} if name == "fedavgm" else {}
    full = build_strategy(name, params)
    uninterrupted = _rounds(full, range(1, 5))[-1]

    rng = np.random.default_rng(0)
    first = build_strategy(name, params)
    after_two = _rounds(first, range(1, 3), rng=rng)[-1]
    resumed, stateless = build_strategy(name, params), build_strategy(name, params)
    resumed.load_state_dict(*_through_disk(first.state_dict()))
    fresh_rng = copy.deepcopy(rng)
    # a checkpoint gives the model back with its arrays in another order (safetensors sorts names)
    from_disk = dict(reversed(list(after_two.items())))
    got = _rounds(resumed, range(3, 5), arrays=record(**from_disk), rng=rng)[-1]
    without = _rounds(stateless, range(3, 5), arrays=record(**from_disk), rng=fresh_rng)[-1]

    if name == "scaffold":  # its state steers the sites (control variate), not the model average
        got, without, uninterrupted = resumed.control, stateless.control, full.control
    for key in uninterrupted:
        assert np.array_equal(got[key], uninterrupted[key]), key
    # without its state the strategy would continue differently, so the equality above means something
    assert any(not np.array_equal(without[k], uninterrupted[k]) for k in uninterrupted)
