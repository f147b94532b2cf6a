"""The run report of `fedbrats simulate`: summary numbers, per-site table and pictures from a history."""

import json

import pytest

from fedbrats.simulations.report import site_order, write_report
from tests.test_compare import record, write_run


def test_report_from_a_history(tmp_path):
    history = [record(1, {"2": 0.3, "10": 0.5}), record(2, {"2": 0.6, "10": 0.4}), record(3, {"2": 0.5, "10": 0.4})]
    history[1]["train"][0]["dropped"] = "array 'w' has non-finite values"
    write_run(tmp_path, history, {"strategy": "fedavg", "model": "resunet", "model-width": 16})
    report = write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["worst_site"] == "10"
    assert summary["final_mean_dice"]["TC"] == pytest.approx(0.45)
    assert summary["best_mean_dice"]["TC"] == pytest.approx(0.5)  # round 2
    assert (summary["bytes_sent"], summary["bytes_received"], summary["wall_seconds"]) == (3000, 1500, 6.0)
    assert summary["dropped"] == [[2, "2", "array 'w' has non-finite values"]]
    text = report.read_text()
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
