"""`fedbrats compare`: numbers of the comparison table from fake run folders, and resumable runs (no Flower)."""

import csv
import json
import math
from pathlib import Path

import pytest

from fedbrats.shared.config import DEMO, RunConfig
from fedbrats.simulations import compare as compare_module
from fedbrats.simulations.compare import compare, parse_seeds, parse_strategies, plan_runs, rounds_done
from fedbrats.simulations.compare_report import (
    ONE_WEEK,
    convergence_scores,
    mean_std,
    summarise_run,
    summarise_runs,
    write_comparison,
)

HOUR = 3600.0


def record(rnd, site_values, *, seconds=HOUR, epsilon=None, client_epsilon=None):
    """One history line; a site's Dice is (v - 0.1, v, v + 0.1) for ET, TC, WT, so its region mean is v."""
    evaluate = [
        {"site": site, "dropped": None, "dice-ET": v - 0.1, "dice-TC": v, "dice-WT": v + 0.1, "num-val": 2.0}
        for site, v in site_values.items()
    ]
    mean_dice = {r: sum(e[f"dice-{r}"] for e in evaluate) / len(evaluate) for r in ("ET", "TC", "WT")}
    train = [{"site": site, "dropped": None, "num-examples": 4.0} for site in site_values]
    for t in train:
        if epsilon:
            t["epsilon"] = epsilon[t["site"]][rnd - 1]
    rec = {
        "round": rnd, "status": "ok", "selected": 2, "available": 2, "wall_seconds": 2.0,
        "simulated_round_seconds": seconds, "simulated_seconds": rnd * seconds,
        "bytes_sent": 1000, "bytes_received": 500, "train": train, "evaluate": evaluate, "mean_dice": mean_dice,
    }  # fmt: skip
    if client_epsilon is not None:
        rec["client_epsilon"] = client_epsilon[rnd - 1]
    return rec


# site -> region-mean Dice in rounds 1..3
RUNS = {
    ("fedavg", 0): {"1": [0.4, 0.6, 0.7], "2": [0.2, 0.4, 0.5]},  # mean 0.3, 0.5, 0.6
    ("fedavg", 1): {"1": [0.6, 0.6, 0.8], "2": [0.4, 0.4, 0.3]},  # mean 0.5, 0.5, 0.55
    ("fedprox", 0): {"1": [0.2, 0.3, 0.4], "2": [0.2, 0.3, 0.4]},
    ("fedprox", 1): {"1": [0.3, 0.3, 0.3], "2": [0.1, 0.1, 0.1]},
}
EPSILON = {0: {"1": [0.5, 1.0, 1.5], "2": [0.7, 1.4, 2.1]}, 1: {"1": [0.5, 1.0, 1.5], "2": [0.7, 1.4, 2.5]}}
CLIENT_EPSILON = {0: [1.0, 2.0, 3.0], 1: [1.5, 2.5, 4.0]}


def write_run(folder: Path, history: list[dict], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (folder / "run_config.json").write_text(json.dumps(config))


def history_of(strategy, seed):
    dp = strategy == "fedprox"
    return [
        record(rnd, {site: values[rnd - 1] for site, values in RUNS[(strategy, seed)].items()},
               epsilon=EPSILON[seed] if dp else None, client_epsilon=CLIENT_EPSILON[seed] if dp else None)
        for rnd in (1, 2, 3)
    ]  # fmt: skip


@pytest.fixture
def runs_out(tmp_path):
    for strategy, seed in RUNS:
        config = {"rounds": 3, "strategy": strategy, "seed": seed, "model": "resunet"}
        if strategy == "fedprox":
            config["strategy-proximal-mu"] = 0.01
        write_run(tmp_path / "runs" / f"{strategy}-seed{seed}", history_of(strategy, seed), config)
    return tmp_path


def test_convergence_score_matches_a_hand_computation():
    # W = 1000 s; rounds of 100, 200, 300, 400, 100 s; round 2 not evaluated (best carried); round 4 worse.
    scores = convergence_scores([0.2, None, 0.5, 0.4, 0.9], [100, 200, 300, 400, 100], window=1000)
    # r1: best .2, auc 20, T 100 -> (900*.2 + 20)/1000;  r2: auc 60, T 300 -> (700*.2 + 60)/1000
    # r3: best .5, auc 210, T 600 -> (400*.5 + 210)/1000; r4: auc 410, T 1000 -> 410/1000; r5 lies past the week
    assert scores == pytest.approx([0.2, 0.2, 0.41, 0.41, 0.41])
    assert convergence_scores([], []) == []
    with pytest.raises(ValueError, match="one headline value per round"):
        convergence_scores([0.5], [1.0, 2.0])


def test_one_run_summary():
    s = summarise_run(history_of("fedavg", 0), target_dice=0.45)
    assert s["final_dice_WT"] == pytest.approx((0.8 + 0.6) / 2)
    assert s["final_dice_ET"] == pytest.approx((0.6 + 0.4) / 2)
    assert s["best_dice_mean"] == pytest.approx(0.6)
    assert (s["worst_site"], s["worst_site_dice"]) == ("2", pytest.approx(0.5))
    assert (s["rounds_to_target"], s["hours_to_target"]) == (2, pytest.approx(2.0))
    # best .3, .5, .6 over three one-hour rounds
    auc = (0.3 + 0.5 + 0.6) * HOUR
    assert s["convergence_score"] == pytest.approx(((ONE_WEEK - 3 * HOUR) * 0.6 + auc) / ONE_WEEK)
    assert (s["bytes_sent"], s["bytes_received"], s["wall_seconds"]) == (3000, 1500, 6.0)
    assert math.isnan(s["max_site_epsilon"]) and math.isnan(s["client_epsilon"])
    on_wt = summarise_run(history_of("fedavg", 0), target_dice=0.65, target_region="WT")
    assert on_wt["rounds_to_target"] == 3  # mean WT per round: 0.4, 0.6, 0.7
    not_evaluated = [dict(r, evaluate=[], mean_dice={}) for r in history_of("fedavg", 0)]
    s = summarise_run(not_evaluated, target_dice=0.45)
    assert s["worst_site"] is None and math.isnan(s["final_dice_mean"]) and s["convergence_score"] == 0.0
    with pytest.raises(ValueError, match="target region"):
        summarise_run(history_of("fedavg", 0), target_dice=0.5, target_region="NCR")


def test_table_aggregates_over_seeds(runs_out):
    rows = {r["strategy"]: r for r in summarise_runs(runs_out, target_dice=0.45)}
    assert list(rows) == ["fedavg", "fedprox"]
    avg, prox = rows["fedavg"], rows["fedprox"]
    assert (avg["seeds"], avg["runs_complete"], avg["rounds"]) == ("0,1", "2/2", 3)
    # final WT: seed 0 (0.8 + 0.6)/2 = 0.7, seed 1 (0.9 + 0.4)/2 = 0.65
    assert avg["final_dice_WT_mean"] == pytest.approx(0.675)
    assert avg["final_dice_WT_std"] == pytest.approx(0.05 / math.sqrt(2))
    assert avg["best_dice_mean_mean"] == pytest.approx((0.6 + 0.55) / 2)
    # worst site: site 2 in both seeds, 0.5 and 0.3
    assert (avg["worst_site"], avg["worst_site_dice_mean"]) == ("2", pytest.approx(0.4))
    assert avg["worst_site_dice_std"] == pytest.approx(0.2 / math.sqrt(2))
    # target 0.45 on the mean of regions: seed 0 at round 2, seed 1 at round 1
    assert (avg["target_reached"], avg["rounds_to_target_mean"], avg["hours_to_target_mean"]) == (
        "2/2",
        1.5,
        1.5,
    )
    assert avg["rounds_to_target_std"] == pytest.approx(math.sqrt(0.5))
    score0 = ((ONE_WEEK - 3 * HOUR) * 0.6 + (0.3 + 0.5 + 0.6) * HOUR) / ONE_WEEK
    score1 = ((ONE_WEEK - 3 * HOUR) * 0.55 + (0.5 + 0.5 + 0.55) * HOUR) / ONE_WEEK
    assert avg["convergence_score_mean"] == pytest.approx((score0 + score1) / 2)
    assert prox["target_reached"] == "0/2" and math.isnan(prox["rounds_to_target_mean"])
    assert prox["params"] == "proximal-mu=0.01"
    assert (prox["max_site_epsilon_mean"], prox["client_epsilon_mean"]) == (
        pytest.approx(2.3),
        pytest.approx(3.5),
    )
    assert math.isnan(avg["max_site_epsilon_mean"])
    assert mean_std([0.5]) == (0.5, pytest.approx(math.nan, nan_ok=True))


def test_report_files(runs_out):
    report = write_comparison(runs_out, target_dice=0.45)
    with open(runs_out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["strategy"] for r in rows] == ["fedavg", "fedprox"]
    for column in ("final_dice_ET_mean", "final_dice_WT_std", "best_dice_TC_mean", "worst_site_dice_mean",
                   "rounds_to_target_mean", "hours_to_target_std", "convergence_score_mean", "bytes_sent_mean",
                   "bytes_received_mean", "wall_seconds_mean", "max_site_epsilon_mean", "client_epsilon_mean",
                   "target_reached", "target_dice", "target_region"):  # fmt: skip
        assert column in rows[0], column
    assert float(rows[0]["final_dice_WT_mean"]) == pytest.approx(0.675)
    assert rows[0]["max_site_epsilon_mean"] == "" and rows[1]["rounds_to_target_mean"] == ""
    assert len(list(csv.DictReader(open(runs_out / "comparison_runs.csv")))) == 4
    text = report.read_text()
    for png in ("comparison_curves.png", "comparison_sites.png", "comparison_fairness.png"):
        assert (runs_out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text
    assert "not reached" in text and "0.675 ± 0.035" in text and "max site ε" in text
    assert "mean Dice over sites >= 0.45, on the mean of ET, TC and WT" in text
    assert "Not every run" not in text and "| - | `runs/fedavg-seed0` |" in text  # no sources.jsonl: no code


def test_runs_name_the_code_of_each_start(runs_out):
    def start(commit):
        return json.dumps({"started": "now", "from_round": 0, "versions": {"fedbrats-commit": commit}}) + "\n"

    (runs_out / "runs/fedavg-seed0/sources.jsonl").write_text(start("aaaaaaa") + start("bbbbbbb") + '{"torn')
    (runs_out / "runs/fedavg-seed1/sources.jsonl").write_text(start("bbbbbbb"))
    text = write_comparison(runs_out, target_dice=0.45).read_text()
    assert "Not every run ran the same FedBraTS code" in text
    assert "| aaaaaaa -> bbbbbbb | `runs/fedavg-seed0` |" in text and "| bbbbbbb | `runs/fedavg-seed1` |" in text


def test_parse_and_plan():
    specs = parse_strategies("fedavg, fedprox ,fedprox:proximal-mu=0.1")
    assert [s.label for s in specs] == ["fedavg", "fedprox", "fedprox-proximal_mu0.1"]
    runs, notes = plan_runs(RunConfig(), specs, [0, 1])
    params = {(r.label, r.seed): r.config.strategy_params for r in runs}
    assert params[("fedprox", 1)] == {"proximal_mu": 0.01} and params[("fedavg", 0)] == {}
    assert params[("fedprox-proximal_mu0.1", 0)] == {"proximal_mu": 0.1}
    assert [r.config.seed for r in runs] == [0, 0, 0, 1, 1, 1]
    assert len(notes) == 1 and "proximal_mu = 0.01" in notes[0]
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        plan_runs(RunConfig(strategy_params={"eta": 0.001}), parse_strategies("fedavg"), [0])
    with pytest.raises(ValueError, match="unknown strategy 'fedfoo'"):
        parse_strategies("fedavg,fedfoo")
    with pytest.raises(ValueError, match="expected KEY=NUMBER"):
        parse_strategies("fedprox:mu")
    with pytest.raises(ValueError, match="twice"):
        parse_strategies("fedavg,fedavg")
    assert parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds("1,1")


def test_finished_runs_are_skipped_and_partial_ones_resumed(tmp_path, monkeypatch):
    calls: list[tuple[str, int]] = []
    stop_after: dict[str, int] = {"fedprox-seed0": 1}
    notes: list[str] = []

    def fake_simulate(config, data, partition, out, *, gpus_per_site=0.0, round_note=None):
        start = rounds_done(out)
        calls.append((out.name, start))
        last = min(config.rounds, stop_after.pop(out.name, config.rounds))
        notes.extend(round_note(r) for r in range(start + 1, last + 1))
        histories = history_of(config.strategy, config.seed)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "history.jsonl", "a") as handle:
            handle.writelines(json.dumps(h) + "\n" for h in histories[start:last])
        (out / "run_config.json").write_text(json.dumps(config.replace(out_dir=str(out)).to_flower()))
        (out / "server").mkdir(exist_ok=True)
        (out / "server" / "server_state.json").write_text(json.dumps({"round": last}))
        return last == config.rounds

    monkeypatch.setattr(compare_module, "simulate", fake_simulate)
    config = RunConfig().replace(**{**DEMO, "rounds": 3})  # the fake histories have 3 rounds
    specs, out = parse_strategies("fedavg,fedprox"), tmp_path / "cmp"
    args = (tmp_path / "data", tmp_path / "data" / "partitioning_1.csv", out)
    assert compare(config, specs, [0], *args, target_dice=0.45) is False  # fedprox stopped after round 1
    assert calls == [("fedavg-seed0", 0), ("fedprox-seed0", 0)]
    assert len(notes) == 3 + 1 and notes[0].startswith("run 1/2 fedavg seed 0 | comparison: ")
    calls.clear(), notes.clear()
    assert compare(config, specs, [0, 1], *args, target_dice=0.45) is True
    assert calls == [("fedprox-seed0", 1), ("fedavg-seed1", 0), ("fedprox-seed1", 0)]
    # one note per round run: which run of the comparison, and the time left of the 2 + 3 + 3 rounds
    assert len(notes) == 2 + 3 + 3
    assert notes[0].startswith("run 2/4 fedprox seed 0 | comparison: about ")
    assert notes[2].startswith("run 3/4 fedavg seed 1 | comparison: about ") and notes[4].endswith(" s left")
    assert notes[-1] == "run 4/4 fedprox seed 1 | comparison: last round"
    assert [
        h["round"]
        for h in map(json.loads, (out / "runs/fedprox-seed0/history.jsonl").read_text().splitlines())
    ] == [1, 2, 3]
    calls.clear()
    assert compare(config, specs, [0, 1], *args, target_dice=0.45) is True and calls == []
    settings = json.loads((out / "comparison_config.json").read_text())
    assert settings["seeds"] == [0, 1] and settings["versions"]["flwr"].startswith("1.41")
    assert settings["runs"]["fedprox-seed1"]["strategy-proximal-mu"] == 0.01
    rows = summarise_runs(out)
    assert [r["runs_complete"] for r in rows] == ["2/2", "2/2"]
    with pytest.raises(ValueError, match="another configuration.*lr"):
        compare(config.replace(lr=0.5), specs, [0], *args)
