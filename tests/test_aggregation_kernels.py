"""Blockwise robust aggregation kernels: equal to numpy's and Flower's results, any block size."""

from __future__ import annotations

import gc
import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedbrats.strategies import build_strategy
from fedbrats.strategies.robust import (
    _sorted_rows,
    closest_to_median_mean,
    comparator_network,
    coordinate_median,
    multikrum_selection,
    squared_distances,
    trimmed_mean,
)

COMMON = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}


def updates(rng, n, shape=(7, 33)):
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("n", range(1, 11))
def test_networks_sort_every_zero_one_input(n):
    """0-1 principle: a comparator network that sorts every 0/1 input sorts every input."""
    columns = np.array(list(itertools.product([0, 1], repeat=n)), np.float32).T  # (n, 2^n)
    rows = _sorted_rows(list(columns), 0, n, [])
    assert np.array_equal(np.stack(rows), np.sort(columns, axis=0))
    assert len(comparator_network(n, n // 2, n // 2 + 1)) <= len(comparator_network(n, 0, n))


@pytest.mark.parametrize("n", [1, 2, 5, 12, 16, 17, 19])
@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 13])
def test_median_equals_numpys(n, chunk):
    arrays = updates(np.random.default_rng(n), n)
    arrays[0][0, :3] = arrays[-1][0, :3]  # ties
    got = coordinate_median(arrays, chunk)
    assert got.dtype == np.float32 and got.shape == (7, 33)
    assert np.array_equal(got, np.median(np.stack(arrays), axis=0))


@pytest.mark.parametrize("n", [3, 5, 12, 17])
@pytest.mark.parametrize("cut", [0.0, 0.1, 0.2, 0.4])
def test_trimmed_mean_equals_flowers(n, cut):
    arrays = updates(np.random.default_rng(100 + n), n)
    got, flower = trimmed_mean(arrays, cut, chunk=50), trim_mean(np.stack(arrays), cut)
    kept = n - 2 * int(cut * n)
    if kept <= 3:  # Flower sums in np.partition's order, which is ascending for so few values
        assert np.array_equal(got, flower)
    np.testing.assert_allclose(got, flower, rtol=1e-6, atol=1e-6)


def assert_float32_close(got, expected):
    """Equal to float32 rounding (values summed in another order)."""
    assert got.dtype == np.asarray(expected).dtype
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * scale)


def stacked_closest_to_median_mean(arrays, beta):
    """Bulyan's second step the straightforward way: stack, sort each column, merge outwards from the
    median by distance (the value below first on a tie, as Flower's argpartition takes it here)."""
    stack = np.sort(np.stack(arrays), axis=0)
    n = len(arrays)
    median = np.median(stack, axis=0)
    distance = np.abs(stack - median)
    columns = np.arange(stack.shape[1:][0]) if stack.ndim == 2 else None
    assert columns is not None, "flat arrays only"
    below, above = np.full(columns.size, n // 2 - 1), np.full(columns.size, n // 2)
    kept = []
    for _ in range(beta):
        d_below = np.where(below >= 0, distance[np.maximum(below, 0), columns], np.inf)
        d_above = np.where(above < n, distance[np.minimum(above, n - 1), columns], np.inf)
        take_above = d_above < d_below
        kept.append(stack[np.where(take_above, above, below), columns])
        above += take_above
        below -= ~take_above
    return np.mean(np.stack(kept), axis=0).astype(stack.dtype)


@pytest.mark.parametrize("n", [3, 4, 7, 12, 17])
def test_bulyan_step_equals_flowers(n):
    arrays = updates(np.random.default_rng(200 + n), n)
    for beta in range(1 + (n % 2 == 0), n + 1):  # beta 1 of an even count: the two middle values tie, and
        # Flower keeps whichever argpartition meets first (site order); we keep the lower one
        flower = aggregate_n_closest_weights([np.median(np.stack(arrays), axis=0)], [[a] for a in arrays], beta)[0]
        assert_float32_close(closest_to_median_mean(arrays, beta, chunk=64), flower)


@pytest.mark.parametrize("n", [3, 4, 8, 9, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bulyan_window_keeps_the_stacked_references_values_on_ties_zeros_and_extremes(n, dtype):
    rng = np.random.default_rng(300 + n)
    arrays = updates(rng, n, shape=(5000,))
    arrays[1][:800] = arrays[2][:800]  # equal values
    arrays[2][800:1600] = -arrays[0][800:1600]  # equal distances on both sides of a zero median
    arrays[0][1600:1700], arrays[2][1650:1750] = 0.0, -0.0
    arrays[1][2000:2100], arrays[0][2050:2150] = 1e30, -3e-38  # distances that round alike
    arrays = [a.astype(dtype) for a in arrays]
    for beta in range(1, n + 1):
        expected = stacked_closest_to_median_mean(arrays, beta)
        assert_float32_close(closest_to_median_mean(arrays, beta, chunk=64), expected)
    flower = aggregate_n_closest_weights([np.median(np.stack(arrays), axis=0)], [[a] for a in arrays], 3)[0]
    assert_float32_close(closest_to_median_mean(arrays, 3, chunk=64), flower)


def test_distances_are_accurate_where_flowers_cancel():
    rng = np.random.default_rng(3)
    base = rng.standard_normal(50_000).astype(np.float32) * 100
    models = [{"w": base + rng.standard_normal(base.size).astype(np.float32) * 1e-3} for _ in range(5)]
    exact = np.array([[np.sum((a["w"].astype(np.float64) - b["w"]) ** 2) for b in models] for a in models])
    got = squared_distances(models, chunk=4096)
    np.testing.assert_allclose(got, exact, rtol=1e-4)
    assert np.all(np.diag(got) == 0)


def test_selection_equals_flowers_select_multikrum():
    rng = np.random.default_rng(4)
    for n, f, k in [(5, 1, 1), (7, 1, 3), (9, 2, 4)]:
        arrays = [{"w": rng.standard_normal((4, 5)).astype(np.float32) * (1 + 5 * (j == 0)),
                   "b": rng.standard_normal(3).astype(np.float32)} for j in range(n)]
        contents = [RecordDict({"arrays": ArrayRecord({k2: Array(v) for k2, v in a.items()})}) for a in arrays]
        expected = select_multikrum(contents, f, k)
        got = multikrum_selection(squared_distances(arrays, chunk=3), f, k)
        assert [contents[i] for i in got] == expected


def test_bad_input_is_an_error_naming_it():
    with pytest.raises(ValueError, match="update 1 is float32\\(3,\\), expected float32\\(2,\\)"):
        coordinate_median([np.zeros(2, np.float32), np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        trimmed_mean([np.zeros(2, np.float32)], 0.1, chunk=0)
    with pytest.raises(ValueError, match="beta must be in \\[1, 2\\]"):
        closest_to_median_mean([np.zeros(2, np.float32)] * 2, 3)


def test_integer_arrays_take_flowers_path_and_nan_spreads_like_numpys():
    counters = [np.array([3, 5], np.int64), np.array([4, 9], np.int64), np.array([1, 1], np.int64)]
    assert np.array_equal(coordinate_median(counters), np.median(np.stack(counters), axis=0))
    with_nan = [np.array([1.0, np.nan], np.float32), np.array([2.0, 0.0], np.float32), np.array([3.0, 1.0], np.float32)]
    got = coordinate_median(with_nan)
    assert got[0] == 2.0 and np.isnan(got[1])


# --- the registered strategies against Flower's classes ------------------------------------
def _replies(rng, n, start):
    out = []
    for node in range(1, n + 1):
        scale = 50.0 if node == n else 0.1  # one outlier
        arrays = {k: v + rng.normal(scale=scale, size=v.shape).astype(np.float32) for k, v in start.items()}
        sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": int(rng.integers(1, 40))}),
            "site": ConfigRecord({"name": f"s{node:02d}"}),
        })
        out.append(Message(content=content, reply_to=sent))
    return out


@pytest.mark.parametrize(
    ("name", "params", "flower"),
    [
        ("fedmedian", {}, lambda: FedMedian(**COMMON)),
        ("fedtrimmedavg", {"beta": 0.2}, lambda: FedTrimmedAvg(beta=0.2, **COMMON)),
        ("krum", {"num_malicious_nodes": 2.0}, lambda: Krum(num_malicious_nodes=2, **COMMON)),
        ("multikrum", {"num_malicious_nodes": 1.0, "num_nodes_to_select": 3.0},
         lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3, **COMMON)),
        ("bulyan", {"num_malicious_nodes": 1.0}, lambda: Bulyan(num_malicious_nodes=1, **COMMON)),
        ("bulyan", {"num_malicious_nodes": 0.0}, lambda: Bulyan(**COMMON)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_registered_robust_strategies_equal_flowers(name, params, flower, seed, monkeypatch):
    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # Flower's Bulyan collects garbage every round
    rng = np.random.default_rng(seed)
    start = {"conv": rng.standard_normal((4, 3, 3)).astype(np.float32), "bias": rng.standard_normal(4).astype(np.float32)}
    n = 7 + seed
    replies = _replies(rng, n, start)
    ours, _ = build_strategy(name, params).aggregate_train(1, replies)  # reads the replies, never empties them
    theirs, _ = flower().aggregate_train(1, replies)
    for key in start:
        a, b = ours[key].numpy(), theirs[key].numpy()
        assert a.dtype == b.dtype
        if name in ("fedtrimmedavg", "multikrum", "bulyan"):  # summed in another order, or our weighted mean
            assert_float32_close(a, b)
        else:
            assert np.array_equal(a, b), (name, key)


# --- FeTS clipped: percentile by one selection, clipped mean block by block --------------------
@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 1001])
def test_linear_percentile_equals_numpys(n):
    from fedbrats.strategies.fets_clipped import linear_percentile

    values = np.abs(np.random.default_rng(n).standard_normal(n).astype(np.float32))
    values[: n // 3] = values[-1]  # ties
    for q in (0.5, 33.3, 50.0, 80.0, 99.9, 100.0):
        assert linear_percentile(values.copy(), q) == np.percentile(values, q), q


def round_of_fets(strategy, start, models, sizes):
    sent = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=j + 1, message_type=MessageType.TRAIN)
            for j in range(len(models))]
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(m)}),
                                           "metrics": MetricRecord({"num-examples": n}),
                                           "site": ConfigRecord({"name": f"s{j}"})}), reply_to=sent[j])
               for j, (m, n) in enumerate(zip(models, sizes, strict=True))]
    strategy.global_arrays = ArrayRecord({"w": Array(start)})
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy()


@pytest.mark.parametrize("pooled", [0, 1])
def test_fets_clipped_blockwise_equals_the_stacked_computation(pooled):
    from fedbrats.strategies.arithmetic import normalise
    from fedbrats.strategies.fets_clipped import clipped_weighted_mean

    rng = np.random.default_rng(pooled)
    start = rng.standard_normal(70_001).astype(np.float32)  # more than one block of the clipped sum
    models = [start + rng.standard_normal(start.size).astype(np.float32) * (10.0 if j == 0 else 0.1) for j in range(5)]
    shares = normalise([3, 1, 4, 1, 5])
    changes = np.stack([m - start for m in models])
    magnitudes = np.abs(changes)
    if pooled:
        bound = np.percentile(magnitudes, 80.0)
    else:
        bound = np.median(np.percentile(magnitudes, 80.0, axis=1))
    clipped = np.clip(changes, -bound, bound).astype(np.float64)  # the stacked reference, summed in float64
    expected = (start + (np.array(shares)[:, None] * clipped).sum(axis=0)).astype(np.float32)
    assert np.abs(changes).max() > 3 * bound  # the outlier is clipped
    strategy = build_strategy("fets_clipped", {"pooled": float(pooled)})
    got = clipped_weighted_mean(start, models, shares, np.float32(strategy.bound(start, models)))
    assert_float32_close(got, expected)
    registered = round_of_fets(strategy, start, models, [3, 1, 4, 1, 5])  # the strategy itself, from replies
    assert_float32_close(registered, expected)
