"""Case- and site-weighted means, bootstrap intervals, small-site labels, and where reports show them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedbrats.shared.evaluation.intervals import (
    bootstrap_means,
    case_weighted,
    few_cases_label,
    interval_rows,
)
from fedbrats.simulations.report import write_report
from fedbrats.simulations.run_summary import summarise_run
from tests.test_compare import record, write_run

#: A big site of 8 cases at 0.9 and three small sites at 0.3, 0.5 (2 cases) and 0.1.
VALUES = [0.9] * 8 + [0.3, 0.5, 0.5, 0.1]
SITES = ["big"] * 8 + ["a", "b", "b", "c"]


def test_case_and_site_weighted_means_differ_as_computed_by_hand():
    by_case, by_site = bootstrap_means(VALUES, SITES, resamples=500, seed=1)
    assert by_case.mean == pytest.approx((8 * 0.9 + 0.3 + 1.0 + 0.1) / 12)
    assert by_site.mean == pytest.approx((0.9 + 0.3 + 0.5 + 0.1) / 4)
    assert by_case.low < by_case.mean < by_case.high and by_site.low < by_site.mean < by_site.high
    assert case_weighted([0.9, 0.3, 0.5, 0.1], [8, 1, 2, 1]) == pytest.approx(by_case.mean)
    assert case_weighted([0.9, math.nan], [8, 3]) == pytest.approx(0.9)  # a site without Dice is left out


def test_intervals_are_seeded_and_shrink_with_more_cases():
    a = bootstrap_means(VALUES, SITES, seed=3)
    assert a == bootstrap_means(VALUES, SITES, seed=3) and a != bootstrap_means(VALUES, SITES, seed=4)
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 500):
        values = rng.uniform(0, 1, n)
        case, _ = bootstrap_means(values, ["s"] * n, seed=0)
        widths.append(case.high - case.low)
    # the 95% interval of a mean of U(0, 1) is about 2 x 1.96 x 0.289 / sqrt(n) wide
    assert widths[1] == pytest.approx(2 * 1.96 * 0.2887 / math.sqrt(500), rel=0.15)
    assert widths[0] > 4 * widths[1]


def test_constant_values_give_a_zero_width_interval_and_bad_input_is_named():
    case, site = bootstrap_means([0.7] * 5, ["1", "1", "2", "2", "3"], resamples=50)
    assert (case.low, case.high, site.low, site.high) == pytest.approx((0.7, 0.7, 0.7, 0.7))
    with pytest.raises(ValueError, match="finite"):
        bootstrap_means([0.5, math.nan], ["1", "2"])
    with pytest.raises(ValueError, match="one site per value"):
        bootstrap_means([0.5, 0.6], ["1"])


def test_interval_rows_per_column():
    rows = [{"site": s, "dice_ET": v, "hd95_ET": 10 * v} for s, v in zip(SITES, VALUES, strict=True)]
    out = interval_rows(rows, ["dice_ET", "hd95_ET"], resamples=200, seed=2)
    assert [r["metric"] for r in out] == ["dice_ET", "hd95_ET"]
    assert out[0]["cases"] == 12 and out[0]["sites"] == 4 and out[0]["resamples"] == 200
    assert out[1]["case_weighted"] == pytest.approx(10 * out[0]["case_weighted"])


def test_few_cases_label():
    assert [few_cases_label(n) for n in (0, 1, 3, 4, 5)] == ["", "n=1 case", "n=3 cases", "n=4 cases", ""]


def _history_with_case_counts():
    history = [record(1, {"1": 0.8, "2": 0.4}), record(2, {"1": 0.9, "2": 0.3})]
    for h in history:
        for entry, n in zip(h["evaluate"], (20, 3), strict=True):
            entry["num-examples"] = n
    return history


def test_run_report_labels_small_sites_and_shows_both_means(tmp_path):
    write_run(tmp_path, _history_with_case_counts(), {"strategy": "fedavg", "hd95-definition": "pooled"})
    text = write_report(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    # final round: site 1 WT 1.0 on 20 cases, site 2 WT 0.4 on 3 cases
    assert summary["final_case_weighted_dice"]["WT"] == pytest.approx((20 * 1.0 + 3 * 0.4) / 23)
    assert summary["final_mean_dice"]["WT"] == pytest.approx(0.7) and summary["few_case_sites"] == ["2"]
    assert "| 2 (n=3 cases) | 0.200 |" in text and "| 1 | 0.800 |" in text
    assert "| **mean (case-weighted)** |" in text and "| **mean (site-weighted)** |" in text
    assert "HD95 pooled: 95th percentile of both directions" in text and "Sites marked n=K" in text


def test_run_report_of_an_older_run_names_monais_definition(tmp_path):
    write_run(tmp_path, _history_with_case_counts(), {"strategy": "fedavg"})
    assert "HD95 max: max of the two directed" in write_report(tmp_path).read_text()


def test_run_summary_has_case_weighted_final_dice():
    s = summarise_run(_history_with_case_counts())
    assert s["final_case_dice_ET"] == pytest.approx((20 * 0.8 + 3 * 0.2) / 23)
    assert s["final_dice_ET"] == pytest.approx(0.5)
    assert s["final_case_dice_mean"] == pytest.approx(
        np.mean([s[f"final_case_dice_{r}"] for r in ("ET", "TC", "WT")])
    )
