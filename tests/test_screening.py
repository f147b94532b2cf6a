"""Update screening and the robust FeTS clipping: one site cannot steer the aggregate."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedbrats.server.history import read_history
from fedbrats.server.screening import screen_updates
from fedbrats.strategies import build_strategy
from fedbrats.strategies.arithmetic import record_views

from .fake_sites import Sites, federation
from .test_strategies import record, reply, round_of

HONEST = [np.array([1.0, 2.0, 0.5]), np.array([1.2, 1.8, 0.4]), np.array([0.9, 2.1, 0.6]), np.array([1.1, 1.9, 0.5])]
START = {"w": np.zeros(3, np.float32)}


def _models(*changes) -> list[dict[str, np.ndarray]]:
    return [{"w": np.asarray(c, np.float32)} for c in changes]


def test_a_scaled_update_is_dropped_naming_its_norm_and_the_median():
    verdict = screen_updates(_models(*HONEST, HONEST[0] * 1e6), START)
    assert list(verdict.dropped) == [4]
    assert verdict.dropped[4] == "screened: update norm 2.291e+06 is 1e+06 x the round's median 2.291 (limit 10 x)"
    assert verdict.median_norm == pytest.approx(np.linalg.norm(HONEST[0]), rel=1e-6)


def test_a_sign_flipped_update_is_dropped_by_its_cosine():
    verdict = screen_updates(_models(*HONEST, -HONEST[0]), START)
    assert list(verdict.dropped) == [4]
    assert verdict.dropped[4] == (
        "screened: update cosine -1.000 to the round's median update is below 0 (norm 2.291, median norm 2.291)"
    )
    assert all(c > 0.99 for c in verdict.cosines[:4])


def test_small_and_honest_updates_are_kept():
    verdict = screen_updates(_models(*HONEST, HONEST[0] * 1e-3, np.zeros(3)), START)
    assert verdict.dropped == {} and verdict.cosines[5] is None  # a zero update has no direction


def test_fewer_than_three_updates_cannot_be_judged():
    verdict = screen_updates(_models(HONEST[0], HONEST[0] * 1e6), START)
    assert verdict.dropped == {} and verdict.note == "screening needs at least 3 updates, got 2; skipped"


def test_a_zero_median_skips_the_norm_test():
    verdict = screen_updates(_models(np.zeros(3), np.zeros(3), [1e6, 0, 0]), START)
    assert verdict.dropped == {} and "median update is zero" in verdict.note


def test_screening_parameters_are_checked():
    with pytest.raises(ValueError, match="norm_factor must be > 1"):
        screen_updates(_models(*HONEST), START, norm_factor=0.5)
    with pytest.raises(ValueError, match=r"min_cosine must be in \[-1, 1\]"):
        screen_updates(_models(*HONEST), START, min_cosine=2)


def test_screening_works_block_by_block_on_large_arrays():
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=600_000).astype(np.float32)}
    common = rng.normal(size=600_000) * 0.01
    updates = [{"w": (start["w"] + common + rng.normal(size=600_000) * 0.005).astype(np.float32)} for _ in range(4)]
    updates.append({"w": (start["w"] - 3 * common).astype(np.float32)})
    verdict = screen_updates(updates, start)
    assert list(verdict.dropped) == [4] and "cosine" in verdict.dropped[4]


def _scaled(factor: float):
    def edit(msg: Message) -> None:
        arrays = record_views(msg.content["arrays"])
        msg.content["arrays"] = ArrayRecord({k: Array(np.asarray(v * factor, np.float32)) for k, v in arrays.items()})

    return edit


def test_the_round_loop_screens_a_scaled_update(tmp_path):
    # the global model is 0, so scaling the model scales the update
    fed = federation(tmp_path, Sites(nodes=(1, 2, 3, 4, 5), train={5: _scaled(1e6)}))
    arrays = fed.run()
    np.testing.assert_allclose(arrays["w"].numpy(), 0.25, atol=1e-6)  # mean of 0.1 .. 0.4: node 5 left out
    (record_,) = read_history(tmp_path / "history.jsonl")
    dropped = {t["site"]: t["dropped"] for t in record_["train"]}
    assert dropped["s5"].startswith("screened: update norm") and "x the round's median" in dropped["s5"]
    screening = record_["screening"]
    assert screening["dropped"] == ["s5"] and set(screening["norms"]) == {f"s{n}" for n in range(1, 6)}
    assert screening["median_norm"] == pytest.approx(0.3 * 3)  # node 3's change: 0.3 on 9 weights


def test_screening_can_be_switched_off(tmp_path):
    fed = federation(tmp_path, Sites(nodes=(1, 2, 3, 4, 5), train={5: _scaled(1e6)}), screen_updates=False)
    arrays = fed.run()
    assert arrays["w"].numpy().mean() > 1e4  # one site decides FedAvg's aggregate
    assert read_history(tmp_path / "history.jsonl")[0]["screening"] == {"note": "off (screen-updates = false)"}


def test_the_history_says_when_screening_cannot_judge(tmp_path):
    federation(tmp_path, Sites(nodes=(1, 2))).run()
    note = read_history(tmp_path / "history.jsonl")[0]["screening"]["note"]
    assert note == "screening needs at least 3 updates, got 2; skipped"


def test_screening_stands_aside_for_client_level_dp(tmp_path):
    from fedbrats.server.federation import Federation
    from fedbrats.shared.config import RunConfig
    from fedbrats.strategies.client_dp import with_client_dp

    from .fake_sites import model

    config = RunConfig(rounds=1, min_sites=2, out_dir=str(tmp_path), client_dp_noise_multiplier=0.01)
    strategy = with_client_dp(build_strategy("fedavg"), noise_multiplier=0.01, clipping_norm=0.5,
                              num_sampled_sites=4, total_sites=4)  # fmt: skip
    Federation(Sites(train={4: _scaled(1e6)}), config, strategy, model(), out_dir=tmp_path).run()
    (record_,) = read_history(tmp_path / "history.jsonl")
    assert record_["screening"]["note"].startswith("skipped: client-level DP clips every update")
    assert record_["status"] == "ok"


# --- sites of very different size (FeTS partitioning_1: 511 cases next to 2) --------------------
def test_a_large_site_taking_more_local_steps_is_kept_when_norms_are_compared_per_step():
    big = HONEST[0] * 15  # 15 local steps, each as large as a small site's one step
    assert list(screen_updates(_models(*HONEST, big), START).dropped) == [4]  # per update: the big hospital is lost
    verdict = screen_updates(_models(*HONEST, big), START, steps=[1, 1, 1, 1, 15])
    assert verdict.dropped == {} and verdict.steps == [1, 1, 1, 1, 15]
    attacked = screen_updates(_models(*HONEST, big * 1e3), START, steps=[1, 1, 1, 1, 15])
    assert attacked.dropped[4].startswith("screened: update norm 3.437e+04 over 15 plain steps, 2291 a step, is 1e+03 x")


def test_claimed_steps_are_bounded_by_what_the_round_asked_for():
    from fedbrats.server.screening import momentum_steps, site_steps
    from fedbrats.shared.config import RunConfig

    claims = [{"local-steps": 1e6, "num-examples": 10}, {"local-steps": 0, "num-examples": 4}, {"local-steps": 3, "num-examples": 4}]
    assert site_steps(claims, RunConfig(local_steps=0), epochs=2) == [20, 1, 3]  # at most one step per case and epoch
    assert site_steps(claims, RunConfig(local_steps=5), epochs=2) == [5, 1, 3]
    assert site_steps([{"num-examples": 10}], RunConfig(local_steps=0), epochs=1) is None
    # SGD with momentum: K steps move as far as the sum of (1 - m^k) / (1 - m) plain ones (Adam's: K)
    sgd = RunConfig(local_steps=5, local_optimizer="sgd", sgd_momentum=0.9)
    assert site_steps(claims, sgd, epochs=2) == pytest.approx([momentum_steps(5, 0.9), 1, 1 + 1.9 + 2.71])
    assert site_steps(claims, RunConfig(local_steps=5, sgd_momentum=0.9), epochs=2) == [5, 1, 3]  # Adam: momentum unused
    with pytest.raises(ValueError, match="steps must give each of the 2 updates a count >= 1"):
        screen_updates(_models(*HONEST[:2]), START, steps=[1, 0])


def _site_size(steps: float, factor: float = 1.0):
    def edit(msg: Message) -> None:
        _scaled(factor)(msg)
        msg.content["metrics"]["local-steps"] = steps

    return edit


def test_the_round_loop_keeps_a_large_hospital_and_drops_an_attacker_who_claims_its_steps(tmp_path):
    small = {n: _site_size(1) for n in (1, 2, 3, 4)}  # updates 0.1 .. 0.4 a weight, one step each
    fed = federation(tmp_path / "big", Sites(nodes=(1, 2, 3, 4, 5), train={**small, 5: _site_size(10, 10)}))
    np.testing.assert_allclose(fed.run()["w"].numpy(), (0.1 + 0.2 + 0.3 + 0.4 + 5.0) / 5, atol=1e-6)  # 16.7 x, kept
    (record_,) = read_history(tmp_path / "big" / "history.jsonl")
    assert record_["screening"]["dropped"] == [] and record_["screening"]["steps"]["s5"] == 10
    # claiming a million steps buys no more than one per training case (10 here)
    fed = federation(tmp_path / "liar", Sites(nodes=(1, 2, 3, 4, 5), train={**small, 5: _site_size(1e6, 1e4)}))
    np.testing.assert_allclose(fed.run()["w"].numpy(), 0.25, atol=1e-6)
    (record_,) = read_history(tmp_path / "liar" / "history.jsonl")
    assert record_["screening"]["dropped"] == ["s5"] and record_["screening"]["steps"]["s5"] == 10


# --- FeTS clipped ------------------------------------------------------------------------------
def test_fets_clipped_clips_to_the_median_of_per_site_percentiles():
    start = record(w=[0, 0, 0, 0])
    replies = [
        reply(1, {"w": [1, 2, 3, 4]}, {"num-examples": 1}),
        reply(2, {"w": [-1, 0, 10, 2]}, {"num-examples": 1}),
        reply(3, {"w": [0, 1, 1, 1]}, {"num-examples": 2}),
    ]
    # per-site 80th percentiles of |change|: 3.4, 5.2, 1.0 -> bound = median = 3.4
    # clipped: s1 [1 2 3 3.4], s2 [-1 0 3.4 2], s3 [0 1 1 1]; shares 1/4, 1/4, 1/2
    got = round_of(build_strategy("fets_clipped"), 1, start, replies)
    np.testing.assert_allclose(got["w"], [0.0, 1.0, 2.1, 1.85], rtol=1e-6)


def _attacked_round(strategy, scale=1e6):
    rng = np.random.default_rng(0)
    start = record(w=np.zeros(200))
    honest = [rng.normal(1.0, 0.1, 200) for _ in range(4)]
    replies = [reply(n + 1, {"w": h}, {"num-examples": 10}) for n, h in enumerate(honest)]
    replies.append(reply(5, {"w": honest[0] * scale}, {"num-examples": 10}))
    got = round_of(strategy, 1, start, replies)["w"]
    mean = np.mean(honest + [honest[0]], axis=0)
    return np.linalg.norm(got - mean) / np.linalg.norm(mean)


def test_one_attacker_in_five_cannot_set_the_clipping_bound():
    assert _attacked_round(build_strategy("fets_clipped", {"pooled": 1})) > 1e4  # FeTS's rule: the attacker's own percentile
    assert _attacked_round(build_strategy("fets_clipped")) < 0.5


def test_fets_clipped_rejects_a_bad_pooled_flag():
    with pytest.raises(ValueError, match="pooled must be 0"):
        build_strategy("fets_clipped", {"pooled": 2})
