"""Site selection per round (fraction, fastest, deadline) and per-round epoch and learning-rate schedules."""

import pytest

from fedbrats.shared.wallclock import REFERENCE_PAYLOAD_MB, SiteTiming
from fedbrats.strategies.selection import (
    epochs_at,
    lr_at,
    parse_lr_round_schedule,
    predict_round_seconds,
    round_lr,
    select_by_deadline,
    select_fastest,
    select_fraction,
)


def test_selection_helpers():
    nodes = [5, 1, 4, 2, 3]
    picked = select_fraction(nodes, 0.4, min_sites=1, seed=0, server_round=3)
    assert len(picked) == 2 and picked == select_fraction(nodes, 0.4, min_sites=1, seed=0, server_round=3)
    assert select_fraction(nodes, 0.2, min_sites=3, seed=0, server_round=1).__len__() == 3
    seconds = {1: 50.0, 2: 10.0, 3: 30.0, 4: 500.0}  # node 5 never measured -> 0 s
    assert select_fastest(nodes, seconds, 2) == [2, 5]
    assert select_by_deadline(nodes, seconds, 40.0, min_sites=2) == [2, 3, 5]
    assert select_by_deadline(nodes, seconds, 5.0, min_sites=3) == [2, 3, 5]
    timing = SiteTiming(2.0, 3.0, 10.0, 20.0)
    predicted = predict_round_seconds([1, 2], {1: "a", 2: "b"}, {1: (4, 1)}, {"a": timing}, epochs=2)
    assert predicted == {1: pytest.approx(10 + 3 + 4 * 2 * 2 + 3 + 20)}
    priced = predict_round_seconds([1], {1: "a"}, {1: (4, 1)}, {"a": timing}, epochs=2, payload_bytes=200_000_000)
    assert priced == {1: pytest.approx(20 + 3 + 4 * 2 * 2 + 3 + 40)}  # twice the reference payload: twice the transfers


def test_the_simulated_clock_follows_bytes_and_steps():
    timing = SiteTiming(2.0, 3.0, 10.0, 20.0)  # transfers: seconds for REFERENCE_PAYLOAD_MB
    mb = REFERENCE_PAYLOAD_MB * 1e6
    assert timing.round_seconds(4, 1, 2) == pytest.approx(10 + 3 + 16 + 3 + 20)  # FeTS: fixed transfers
    assert timing.round_seconds(4, 1, 2, down_bytes=mb / 2, up_bytes=mb / 4) == pytest.approx(5 + 3 + 16 + 3 + 5)
    half_update = timing.round_seconds(4, 1, 2, down_bytes=mb, up_bytes=mb / 2)  # update-dtype float16
    assert half_update == pytest.approx(timing.round_seconds(4, 1, 2, down_bytes=mb, up_bytes=mb) - 10)
    assert timing.round_seconds(4, 1, 2, train_cases=6) == pytest.approx(10 + 3 + 6 * 2 + 3 + 20)  # steps x batch
    assert timing.round_seconds(4, 1, 2, down_bytes=1000, up_bytes=1000) == pytest.approx(1 + 3 + 16 + 3 + 1)  # floors


def test_schedules_per_round():
    assert [epochs_at(r, 4) for r in (1, 2, 3)] == [4, 4, 3]  # 4, 3.6, 3.24
    assert epochs_at(11, 4) == epochs_at(50, 4) == 1  # capped at 0.9 ** 10
    assert epochs_at(5, 1) == 1
    assert lr_at(1, 1e-3, "cosine", rounds=11) == pytest.approx(1e-3)
    assert lr_at(11, 1e-3, "cosine", rounds=11, min_lr=1e-5) == pytest.approx(1e-5)
    assert lr_at(3, 1.0, "exponential", decay=0.5) == pytest.approx(0.25)
    assert lr_at(4, 1.0, "step", milestone=5, decay=0.1) == 1.0 and lr_at(5, 1.0, "step", milestone=5, decay=0.1) == 0.1
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1, 1.0, "warm")


def test_lr_round_schedule_specs():
    """The run-config key lr-round-schedule ("NAME[:key=value,...]") and the lr each round sends."""
    assert parse_lr_round_schedule("constant") == ("constant", {})
    assert parse_lr_round_schedule(" step: milestone=10, decay=0.1 ") == ("step", {"milestone": 10, "decay": 0.1})
    assert parse_lr_round_schedule("cosine:min-lr=1e-5") == ("cosine", {"min_lr": 1e-5})
    assert [round_lr(r, 1e-3) for r in (1, 7)] == [1e-3, 1e-3]
    assert round_lr(3, 1.0, "exponential:decay=0.5") == pytest.approx(0.25)
    assert round_lr(3, 1.0, "exponential:decay=0.5,min_lr=0.3") == pytest.approx(0.3)
    assert [round_lr(r, 1.0, "step:milestone=3,decay=0.1") for r in (1, 2, 3, 9)] == pytest.approx([1, 1, 0.1, 0.1])
    cosine = [round_lr(r, 1.0, "cosine", rounds=5) for r in range(1, 6)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine[-1] == pytest.approx(0.0)
    for bad, says in [("warm", "must start with one of constant"), ("constant:decay=0.5", "takes no parameters"),
                      ("exponential:milestone=3", "takes decay, min_lr"), ("exponential:decay", "not key=value"),
                      ("exponential:decay=fast", "decay must be a number"), ("exponential:decay=1.5", "in (0, 1]"),
                      ("step:decay=0.1", "milestone=M"), ("step:milestone=2.5", "milestone=M"),
                      ("cosine:min_lr=-1", ">= 0")]:
        with pytest.raises(ValueError, match="lr-round-schedule") as err:
            parse_lr_round_schedule(bad)
        assert says in str(err.value), (bad, str(err.value))
