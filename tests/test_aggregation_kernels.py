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


@pytest.mark.parametrize("n", [3, 4, 7, 12, 17])
def test_bulyan_step_equals_flowers(n):
    arrays = updates(np.random.default_rng(200 + n), n)
    for beta in range(3, n + 1):
        flower = aggregate_n_closest_weights([np.median(np.stack(arrays), axis=0)], [[a] for a in arrays], beta)[0]
        assert np.array_equal(closest_to_median_mean(arrays, beta, chunk=64), flower), beta


@pytest.mark.parametrize("n", [3, 4, 8, 9, 12])
def test_bulyan_keys_merge_like_the_outward_merge_on_ties_zeros_and_extremes(n):
    from fedbrats.strategies.robust import _closest_to_median_mean_merge

    rng = np.random.default_rng(300 + n)
    arrays = updates(rng, n, shape=(5000,))
    arrays[1][:800] = arrays[2][:800]  # equal values
    arrays[2][800:1600] = -arrays[0][800:1600]  # equal distances on both sides of a zero median
    arrays[0][1600:1700], arrays[2][1650:1750] = 0.0, -0.0
    arrays[1][2000:2100], arrays[0][2050:2150] = 1e30, -3e-38  # distances that round alike
    for beta in range(1, n + 1):
        expected = _closest_to_median_mean_merge([a.copy() for a in arrays], beta, 64)
        assert np.array_equal(closest_to_median_mean(arrays, beta, chunk=64), expected), beta
    wide = [a.astype(np.float64) for a in arrays]  # not float32: the merge itself, against Flower
    flower = aggregate_n_closest_weights([np.median(np.stack(wide), axis=0)], [[a] for a in wide], 3)[0]
    assert np.array_equal(closest_to_median_mean(wide, 3, chunk=64), flower)


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
        if name == "fedtrimmedavg":  # Flower sums kept values in np.partition's order: last-bit differences
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
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


@pytest.mark.parametrize("pooled", [0, 1])
def test_fets_clipped_blockwise_equals_the_stacked_computation(pooled):
    from fedbrats.strategies.arithmetic import normalise, weighted_average
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
    expected = start + weighted_average([{"w": c} for c in np.clip(changes, -bound, bound)], shares)["w"]
    strategy = build_strategy("fets_clipped", {"pooled": float(pooled)})
    got = clipped_weighted_mean(start, models, shares, np.float32(strategy.bound(start, models)))
    assert np.array_equal(got, expected)
