"""The run report of `fedbrats simulate`: summary numbers, per-site table and pictures from a history."""

import json

import numpy as np
import pytest

from fedbrats.shared.evaluation.classification import histogram_auc, score_histograms
from fedbrats.simulations.headline import headline_value
from fedbrats.simulations.report import site_order, write_report
from fedbrats.simulations.roc import pooled_histograms, roc_curves
from tests.test_compare import class_record, pooled_of, record, write_run


def test_report_from_a_history(tmp_path):
    history = [record(1, {"2": 0.3, "10": 0.5}), record(2, {"2": 0.6, "10": 0.4}), record(3, {"2": 0.5, "10": 0.4})]
    history[1]["train"][0]["dropped"] = "array 'w' has non-finite values"
    write_run(tmp_path, history, {"strategy": "fedavg", "model": "resunet", "model-width": 16})
    final = {"task": "segmentation", "pipeline": "fedbrats evaluate --split val", "hd95_definition": "pooled",
             "cases": 3, "sites": {"2": 2, "10": 1}, "skipped": [],
             "intervals": [{"metric": "dice_ET", "case_weighted": 0.61, "case_low": 0.5, "case_high": 0.7,
                            "site_weighted": 0.6, "site_low": 0.4, "site_high": 0.8}]}  # fmt: skip
    (tmp_path / "final_evaluation.json").write_text(json.dumps(final))
    report = write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["worst_site"] == "10"
    assert summary["final_mean_dice"]["TC"] == pytest.approx(0.45)
    assert summary["best_mean_dice"]["TC"] == pytest.approx(0.5)  # round 2
    assert (summary["bytes_sent"], summary["bytes_received"], summary["wall_seconds"]) == (3000, 1500, 6.0)
    assert summary["dropped"] == [[2, "2", "array 'w' has non-finite values"]]
    best = np.maximum.accumulate([headline_value(h) for h in history])  # one simulated hour a round
    week, hour = 7 * 24 * 3600, 3600
    expected = ((week - 3 * hour) * best[-1] + hour * best.sum()) / week
    assert summary["convergence_score"] == pytest.approx(expected)
    text = report.read_text()
    assert f"convergence score {expected:.3f}" in text
    assert "## Final evaluation" in text and "| dice_ET | 0.610 (0.500-0.700) | 0.600 (0.400-0.800) |" in text
    assert text.index("| 2 | 0.400 | 0.500 | 0.600") < text.index("| 10 | 0.300 | 0.400 | 0.500")  # site order
    assert "round 2, site 2: array 'w' has non-finite values" in text
    for picture in ("learning_curves.png", "site_dice.png"):
        assert f"]({picture})" in text and (tmp_path / picture).stat().st_size > 10_000


def test_an_empty_history_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "history.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"history\.jsonl holds no completed round"):
        write_report(tmp_path)


def test_sites_sort_by_number_then_name():
    assert sorted(["10", "b", "2", "a"], key=site_order) == ["2", "10", "a", "b"]


def test_classification_report_shows_auc_over_rounds_and_roc_per_site(tmp_path):
    rounds = [{"1": 0.5, "2": 0.25, "3": None}, {"1": 0.75, "2": 0.5, "3": None}, {"1": 1.0, "2": 0.75, "3": None}]
    history = [class_record(i + 1, sites) for i, sites in enumerate(rounds)]
    history[2]["train"][1]["dropped"] = "num-examples is negative"
    write_run(tmp_path, history, {"strategy": "fedavg", "model": "resclassifier", "task": "classification",
                                  "class-input-size": 32, "label-column": "Grade"})  # fmt: skip
    report = write_report(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    final = pooled_of(rounds[-1])
    assert summary["headline"] == "auc" and summary["final_auc"] == pytest.approx(final)
    assert summary["best_auc"] == pytest.approx(final) and summary["best_round"] == 3
    assert (summary["worst_site"], summary["worst_site_auc"], summary["undefined_sites"]) == ("2", 0.75, ["3"])
    assert summary["sites"]["1"]["auc"] == 1.0 and summary["sites"]["1"]["num-examples"] == 4
    assert "| 1 | 1.000 | " in report and "| 3 | undefined | " in report  # site 3 holds one class only
    assert f"| **pooled** | **{final:.3f}**" in report and "label `Grade`" in report
    assert f"| 3 | ok | 2/2 | {final:.3f} |" in report and "round 3, site 2: num-examples is negative" in report
    for picture in ("auc_curves.png", "roc_curves.png"):
        assert f"]({picture})" in report and (tmp_path / picture).stat().st_size > 10_000
    assert "Dice" not in report and not (tmp_path / "learning_curves.png").exists()


def test_multitask_report_adds_the_dice_curves(tmp_path):
    history = [class_record(r, {"1": 0.75, "2": 0.5}, dice={"1": 0.3 * r, "2": 0.2 * r}) for r in (1, 2)]
    write_run(tmp_path, history, {"strategy": "fedavg", "task": "multitask"})
    report = write_report(tmp_path).read_text()
    assert "## Segmentation (multitask)" in report and (tmp_path / "learning_curves.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["final_auc"] == pytest.approx(
        pooled_of({"1": 0.75, "2": 0.5})
    )


def test_roc_curves_from_histograms_have_the_histogram_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, 300), 0, 1)
    h = score_histograms(scores, labels, 2)
    (curve,) = roc_curves(h)
    assert curve.positive == 1 and curve.auc == pytest.approx(histogram_auc(h).auc, abs=1e-12)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    three = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    probs[np.arange(200), three] += 0.3
    probs /= probs.sum(axis=1, keepdims=True)
    hm = score_histograms(probs, three, 3)
    curves = roc_curves(hm)
    assert [c.positive for c in curves] == [0, 1, 2]
    assert np.mean([c.auc for c in curves]) == pytest.approx(histogram_auc(hm).auc, abs=1e-12)
    assert roc_curves(score_histograms([0.2, 0.7], [0, 0], 2)) == []  # one class: no curve
    pooled = pooled_histograms([{"histograms": h.tolist()}, {"histograms": None}, {"histograms": h}])
    assert np.array_equal(pooled, 2 * h)
    with pytest.raises(ValueError, match="different shapes"):
        pooled_histograms([{"histograms": h}, {"histograms": hm}])
    with pytest.raises(ValueError, match=r"\[K, 1 or K, bins\]"):
        roc_curves(np.zeros((2, 3, 10)))


def test_a_deployed_classification_run_reports_wall_time_only(tmp_path):
    """A deployed run records no simulated time: its report must not need it."""
    rounds = [{"1": 0.5, "2": 0.75}, {"1": 0.75, "2": 1.0}]
    history = [class_record(i + 1, sites) for i, sites in enumerate(rounds)]
    for entry in history:
        for key in [k for k in entry if k.startswith("simulated")]:
            del entry[key]
    write_run(tmp_path, history, {"strategy": "fedavg", "model": "resclassifier", "task": "classification",
                                  "class-input-size": 32, "label-column": "Grade"})  # fmt: skip
    report = write_report(tmp_path).read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["simulated_hours"] is None
    assert "Simulated time" not in report and "| - |" in report
