"""`fedbrats compare`: numbers of the comparison table from fake run folders, and resumable runs (no Flower)."""

import csv
import json
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from fedbrats.shared.config import DEMO, RunConfig
from fedbrats.shared.evaluation.classification import auc
from fedbrats.shared.tasks import class_metrics, pooled_auc
from fedbrats.simulations import compare as compare_module
from fedbrats.simulations.compare import compare, parse_seeds, parse_strategies, plan_runs, rounds_done
from fedbrats.simulations.compare_report import (
    ONE_WEEK,
    Run,
    attack_settings,
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


#: Class-1 scores of two positive cases against negatives scored 0.2 and 0.6 -> the site's AUC.
POSITIVES = {0.25: (0.1, 0.4), 0.5: (0.4, 0.4), 0.75: (0.4, 0.7), 1.0: (0.7, 0.7)}


def class_cases(site_auc):
    """(scores, labels) of a site's 4 validation cases with the given AUC; None: 2 negatives only (no AUC)."""
    if site_auc is None:
        return [0.2, 0.6], [0, 0]
    return [0.2, 0.6, *POSITIVES[site_auc]], [0, 0, 1, 1]


def class_record(rnd, site_aucs, *, seconds=HOUR, dice=None):
    """One classification round as the server records it (shared.tasks' site reply and round summary);
    `dice` makes it a multitask round with the segmentation record of `record`."""
    rec = record(rnd, dice or dict.fromkeys(site_aucs, 0.5), seconds=seconds)
    if dice is None:
        rec["mean_dice"] = {}
    histograms, evaluate = [], []
    for entry, (site, site_auc) in zip(rec["evaluate"], site_aucs.items(), strict=True):
        scores, labels = class_cases(site_auc)
        metrics = class_metrics(np.asarray(scores), np.asarray(labels), 2)
        metrics.pop("reasons")
        histograms.append(metrics.pop("histograms"))
        base = entry if dice else {"site": site, "dropped": None}
        evaluate.append({**base, **metrics, "num-examples": float(len(labels)), "histograms": histograms[-1].tolist()})
    pooled = pooled_auc(histograms)
    rec.update(evaluate=evaluate, headline={"name": "auc", "value": pooled.auc}, pooled_auc=pooled.auc,
               pooled_auc_bound=pooled.error_bound)  # fmt: skip
    return rec


def pooled_of(site_aucs):
    """The exact AUC over the cases of every site (what the pooled histograms must give here)."""
    cases = [class_cases(a) for a in site_aucs.values()]
    return auc([s for c in cases for s in c[0]], [y for c in cases for y in c[1]])[0]


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
    variants = parse_strategies("fedavg,fedavg:update-dtype=float16,fedavg:local_epochs=2:eta=0.5")
    assert [v.label for v in variants] == ["fedavg", "fedavg-update-dtype-float16", "fedavg-eta0.5-local-epochs-2"]
    runs, _ = plan_runs(RunConfig(), variants[:2], [0])
    assert [(r.config.update_dtype, r.config.strategy) for r in runs] == [("float32", "fedavg"), ("float16", "fedavg")]
    with pytest.raises(ValueError, match="update-dtype"):
        plan_runs(RunConfig(), parse_strategies("fedavg:update-dtype=float8"), [0])
    with pytest.raises(ValueError, match="holdout-site applies to `fedbrats simulate`"):
        plan_runs(RunConfig(), parse_strategies("fedavg:holdout-site=2"), [0])
    with pytest.raises(ValueError, match="seed is set by compare itself"):
        parse_strategies("fedavg:seed=3")
    assert parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds("1,1")


def test_finished_runs_are_skipped_and_partial_ones_resumed(tmp_path, monkeypatch):
    calls: list[tuple[str, int]] = []
    stop_after: dict[str, int] = {"fedprox-seed0": 1}
    notes: list[str] = []

    def fake_simulate(config, data, partition, out, *, engine=None, round_note=None):
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
    assert settings["seeds"] == [0, 1] and settings["versions"]["flwr"] == metadata.version("flwr")
    assert settings["runs"]["fedprox-seed1"]["strategy-proximal-mu"] == 0.01
    rows = summarise_runs(out)
    assert [r["runs_complete"] for r in rows] == ["2/2", "2/2"]
    with pytest.raises(ValueError, match="another configuration.*lr"):
        compare(config.replace(lr=0.5), specs, [0], *args)


# ---- classification: the headline is the pooled AUC ------------------------------------------------------

CLASS_RUNS = {  # site -> its own AUC in rounds 1..3; site 3 holds one class (no AUC of its own)
    ("fedavg", 0): {"1": [0.5, 0.75, 0.75], "2": [0.25, 0.5, 0.75], "3": [None] * 3},
    ("fedavg", 1): {"1": [0.5, 0.5, 0.75], "2": [0.5, 0.5, 0.5], "3": [None] * 3},
    ("fedprox", 0): {"1": [0.75, 1.0, 1.0], "2": [0.5, 0.75, 1.0], "3": [None] * 3},
    ("fedprox", 1): {"1": [0.75, 1.0, 1.0], "2": [0.75, 1.0, 0.75], "3": [None] * 3},
}


def class_history(strategy, seed):
    runs = CLASS_RUNS[(strategy, seed)]
    return [class_record(rnd, {site: v[rnd - 1] for site, v in runs.items()}) for rnd in (1, 2, 3)]


@pytest.fixture
def class_out(tmp_path):
    for strategy, seed in CLASS_RUNS:
        config = {"rounds": 3, "strategy": strategy, "seed": seed, "model": "resclassifier", "task": "classification"}
        write_run(tmp_path / "runs" / f"{strategy}-seed{seed}", class_history(strategy, seed), config)
    return tmp_path


def test_classification_run_summary_uses_the_pooled_auc():
    history = class_history("fedavg", 0)
    final_sites = {"1": 0.75, "2": 0.75, "3": None}
    assert history[-1]["headline"]["value"] == pytest.approx(pooled_of(final_sites))  # the histograms are exact here
    s = summarise_run(history, target=0.6)
    assert s["headline"] == "auc" and s["final_auc"] == pytest.approx(pooled_of(final_sites))
    pooled = [pooled_of({k: v[i] for k, v in CLASS_RUNS[("fedavg", 0)].items()}) for i in range(3)]
    assert s["best_auc"] == pytest.approx(max(pooled))
    assert s["site_values"]["3"] != s["site_values"]["3"]  # NaN: one class only
    assert (s["worst_site"], s["worst_site_auc"]) == ("1", 0.75)  # ties: the first site; site 3 has no AUC
    first = next(i for i, p in enumerate(pooled) if p >= 0.6)
    assert s["rounds_to_target"] == first + 1 and s["hours_to_target"] == pytest.approx(first + 1)
    # balanced accuracy at 0.5: sites 1 and 2 each call one of two positives (0.4 < 0.5 <= 0.7) and one
    # of two negatives (0.6) positive -> 0.5; site 3 holds one class: undefined, left out of the mean
    assert s["balanced_accuracy"] == pytest.approx(0.5) and s["sensitivity"] == pytest.approx(0.5)
    best = 0.0
    area = 0.0
    for p in pooled:  # the FeTS score of the pooled AUC over three one-hour rounds
        best = max(best, p)
        area += best * HOUR
    assert s["convergence_score"] == pytest.approx(((ONE_WEEK - 3 * HOUR) * best + area) / ONE_WEEK)
    assert s["curve"] == [(r, pytest.approx(r), pytest.approx(p)) for r, p in zip((1, 2, 3), pooled, strict=True)]
    assert summarise_run(history)["target"] == 0.8  # the AUC's default target
    with pytest.raises(ValueError, match="--target-dice applies to segmentation"):
        summarise_run(history, target_dice=0.7)
    with pytest.raises(ValueError, match="applies to Dice"):
        summarise_run(history, target_region="WT")


def test_classification_comparison_ranks_by_auc(class_out):
    rows = summarise_runs(class_out, target=0.7)
    ranked = [(r["strategy"], r["rank"], r["headline"]) for r in rows]
    assert ranked == [("fedprox", 1, "auc"), ("fedavg", 2, "auc")]
    prox, avg = rows
    finals = {(k, s): pooled_of({site: v[2] for site, v in runs.items()}) for (k, s), runs in CLASS_RUNS.items()}
    assert prox["final_auc_mean"] == pytest.approx((finals[("fedprox", 0)] + finals[("fedprox", 1)]) / 2)
    assert avg["worst_site_auc_mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert avg["worst_site"] == "1"  # seed 0: sites 1 and 2 tie at 0.75 (the first counts); seed 1: site 2
    assert "final_dice_mean_mean" not in prox and "balanced_accuracy_mean" in prox
    report = write_comparison(class_out, target=0.7)
    text = report.read_text()
    assert "## AUC" in text and "final AUC (pooled)" in text and "worst site AUC (final)" in text
    assert "balanced accuracy" in text and "AUC pooled over sites >= 0.7" in text
    assert text.index("| 1 | fedprox") < text.index("| 2 | fedavg")
    with open(class_out / "comparison.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["strategy"] for r in table] == ["fedprox", "fedavg"] and table[0]["target"] == "0.7"
    assert "target_dice" not in table[0] and table[0]["headline"] == "auc"
    for png in ("comparison_curves.png", "comparison_sites.png", "comparison_fairness.png"):
        assert (class_out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histories_without_a_headline_rank_by_mean_dice_and_tasks_do_not_mix(runs_out):
    rows = summarise_runs(runs_out, target=0.45)  # older runs: no headline in their records
    ranked = [(r["strategy"], r["rank"], r["headline"]) for r in rows]
    assert ranked == [("fedavg", 1, "mean-dice"), ("fedprox", 2, "mean-dice")]
    assert rows[0]["target_reached"] == "2/2"
    assert summarise_runs(runs_out, target_dice=0.45)[0]["target_reached"] == "2/2"  # the segmentation alias
    write_run(runs_out / "runs" / "fedadam-seed0", class_history("fedavg", 0), {"rounds": 3})
    with pytest.raises(ValueError, match="runs of different tasks cannot be ranked together"):
        summarise_runs(runs_out)


# --- comparisons under a simulated attack ------------------------------------------------------------
#: (strategy, seed) -> the rounds in which site 2's (the attacker's) update was dropped, and honest drops.
ATTACKED = {
    ("fedavg", 0): ((), ()), ("fedavg", 1): ((), ()),
    ("fedmedian", 0): ((2, 3), ()), ("fedmedian", 1): ((1, 2, 3), (1,)),
}  # fmt: skip


def attacked_history(strategy, seed):
    """Three rounds in which the server marked site 2's train entries as a labelflip attacker's."""
    attacker_drops, honest_drops = ATTACKED[(strategy, seed)]
    history = history_of("fedavg", seed)
    for rec in history:
        for entry in rec["train"]:
            if entry["site"] == "2":
                entry["attack"] = "labelflip"
                if rec["round"] in attacker_drops:
                    entry["dropped"] = "screened: update cosine -0.5 to the round's median update is below 0"
            elif rec["round"] in honest_drops:
                entry["dropped"] = "screened: update norm 30 is 12 x the round's median 2.5 (limit 10 x)"
    return history


def test_a_comparison_under_attack_counts_the_attackers_updates(tmp_path, runs_out):
    out = tmp_path / "attacked"
    for strategy, seed in ATTACKED:
        config = {"rounds": 3, "strategy": strategy, "seed": seed, "attack": "labelflip", "attack-sites": "2",
                  "attack-scale": 0.0}  # fmt: skip
        write_run(out / "runs" / f"{strategy}-seed{seed}", attacked_history(strategy, seed), config)
    assert attack_settings([Run("fedavg", 0, out, {"attack": "scale", "attack-sites": "2,3", "attack-scale": 0.0}),
                            Run("fedavg", 1, out, {"attack": "noise", "attack-sites": "2", "attack-scale": 5.0})]) == [
        "`scale` by site(s) 2,3 (attack-scale 0: its default)", "`noise` by site(s) 2 (attack-scale 5)"]  # fmt: skip
    s = summarise_run(attacked_history("fedmedian", 1), target_dice=0.45)
    assert (s["attacker_updates"], s["attacker_dropped"], s["honest_updates"], s["honest_dropped"]) == (3, 3, 3, 1)
    rows = {r["strategy"]: r for r in summarise_runs(out, target_dice=0.45)}
    assert rows["fedavg"]["attack"] == rows["fedmedian"]["attack"] == "labelflip"
    assert (rows["fedavg"]["attacker_dropped"], rows["fedavg"]["attacker_updates"]) == (0, 6)
    assert (rows["fedmedian"]["attacker_dropped"], rows["fedmedian"]["honest_dropped"]) == (5, 1)
    text = write_comparison(out, target_dice=0.45).read_text()
    assert "**Simulated attack**: `labelflip` by site(s) 2 (docs/reliability.md)" in text
    assert text.count("| attack |") == 3  # the accuracy, cost and runs tables
    assert "| labelflip | 5 / 6 | 1 / 6 |" in text and "| labelflip | 0 / 6 | 0 / 6 |" in text
    assert "| `runs/fedmedian-seed0` | labelflip | 2 / 3 |" in text
    per_run = {(r["strategy"], r["seed"]): r for r in csv.DictReader(open(out / "comparison_runs.csv"))}
    assert (per_run[("fedmedian", "1")]["attack"], per_run[("fedmedian", "1")]["attacker_dropped"]) == ("labelflip", "3")
    assert next(csv.DictReader(open(out / "comparison.csv")))["attack"] == "labelflip"
    # a comparison without an attack says nothing about one
    honest = write_comparison(runs_out, target_dice=0.45).read_text()
    assert "Simulated attack" not in honest and "| attack |" not in honest and "attacker updates" not in honest
    assert summarise_runs(runs_out, target_dice=0.45)[0]["attack"] == "none"
