"""The comparison report on FeTS-shaped sites: most sites validate on one or two cases."""

from __future__ import annotations

from pathlib import Path

from fedbrats.simulations.compare_report import write_comparison
from fedbrats.simulations.run_summary import summarise_run

from .test_compare import history_of, write_run


def test_sites_with_few_validation_cases_are_named_and_the_case_weighted_mean_is_shown(tmp_path):
    history = history_of("fedavg", 0)
    for rec in history:  # FeTS-shaped: site 1 validates on 20 cases, site 2 on 2
        for entry in rec["evaluate"]:
            entry["num-examples"] = 20.0 if entry["site"] == "1" else 2.0
    write_run(tmp_path / "runs" / "fedavg-seed0", history, {"rounds": 3, "strategy": "fedavg", "seed": 0})
    text = write_comparison(tmp_path, target_dice=0.45).read_text()
    assert "1 of the 2 sites are scored on 1-4 validation cases" in text
    # final round: site 1 mean 0.7, site 2 mean 0.5 -> by cases (20 x 0.7 + 2 x 0.5) / 22; by sites 0.6
    header = next(line for line in text.splitlines() if line.startswith("| rank |"))
    assert "| final mean | final mean, case-weighted |" in header
    assert f"| 0.600 | {(20 * 0.7 + 2 * 0.5) / 22:.3f} |" in text
    summary = summarise_run(history, target_dice=0.45)
    assert (summary["sites_evaluated"], summary["few_case_sites"]) == (2, 1)
    assert "validation cases:" not in write_comparison(_without_counts(tmp_path), target_dice=0.45).read_text()


def _without_counts(tmp_path: Path) -> Path:
    out = tmp_path / "plain"
    write_run(out / "runs" / "fedavg-seed0", history_of("fedavg", 0), {"rounds": 3, "strategy": "fedavg", "seed": 0})
    return out
