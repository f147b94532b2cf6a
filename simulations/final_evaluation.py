"""The federation's final score through the pipeline of `fedbrats evaluate`, not the sites' round metrics.

A site's round metrics track training: brain-cropped volume, no post-processing, 1-4 validation cases
at a small site. The numbers a consortium quotes come from here instead: the global model scored on
every site's validation cases (the split training drew, or the fixed `TrainOrVal` held-out cases) on
the original grid with post-processing (segmentation) or the classifier's own preprocessing, with
case- and site-weighted means and bootstrap 95% intervals. In a simulation every site's cases are on
this machine, so the server-side run can do what each hospital would do with `fedbrats evaluate`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedbrats.shared.atomic import atomic_write_json
from fedbrats.shared.config import RunConfig

log = logging.getLogger(__name__)

#: What `final_evaluation` writes into the run folder by default (per-case rows beside it as CSV files).
RESULT_FILE = "final_evaluation.json"
CSV_FILE = "final_evaluation.csv"
#: The name of a left-out institution's evaluation (`simulations.holdout`).
EXTERNAL = "external_evaluation"


def final_evaluation(
    run_dir: Path, config: RunConfig, *, split: str = "val", name: str = "final_evaluation", title: str = ""
) -> dict[str, Any] | None:
    """Score the run's `global_model.safetensors` on the `split` of every site of `config.partition`; write
    `<name>.json` and `<name>.csv` and return the result (None, with a warning, when there is no model or
    no case to score; a failure here never fails the finished federation). An external site
    (`simulations.holdout`) is scored with split "all" under its own name and `title`."""
    from fedbrats.shared.checkpoint import read_metadata
    from fedbrats.shared.evaluation.predict_class import is_case_classifier

    run_dir = Path(run_dir)
    checkpoint = run_dir / "global_model.safetensors"
    if not checkpoint.is_file():
        log.warning("final evaluation skipped: %s does not exist", checkpoint)
        return None
    try:
        score = _classification if is_case_classifier(read_metadata(checkpoint)) else _segmentation
        result = {"title": title or "Final evaluation", **score(checkpoint, run_dir / f"{name}.csv", config, split)}
    except Exception as err:  # e.g. no validation case at any site; the finished federation stands
        log.warning("%s skipped: %s: %s", name.replace("_", " "), type(err).__name__, err)
        return None
    atomic_write_json(run_dir / f"{name}.json", result)
    return result


def _segmentation(checkpoint: Path, out_csv: Path, config: RunConfig, split: str) -> dict[str, Any]:
    from fedbrats.shared.evaluation.evaluate import evaluate_checkpoint

    found = evaluate_checkpoint(
        checkpoint, config.data_dir, config.partition or None, out_csv=out_csv, split=split,
        seed=config.seed, val_fraction=config.val_fraction, hd95_definition=config.hd95_definition,
    )  # fmt: skip
    return {
        "task": "segmentation",
        "pipeline": f"fedbrats evaluate --split {split}: full volume, post-processing, original grid",
        "hd95_definition": found.hd95_definition,
        "cases": len(found.rows),
        "sites": {site: s.get("cases", 0) for site, s in found.summary.items() if site != "all"},
        "skipped": found.skipped,
        "intervals": [_finite(r) for r in found.intervals],
    }


def _classification(checkpoint: Path, out_csv: Path, config: RunConfig, split: str) -> dict[str, Any]:
    from fedbrats.shared.evaluation.predict_class import evaluate_class_checkpoint

    found = evaluate_class_checkpoint(
        checkpoint, config.data_dir, config.partition or None, config=config, out_csv=out_csv, split=split
    )
    interval = found.interval
    return {
        "task": "classification",
        "pipeline": f"fedbrats evaluate --split {split}: the classifier's preprocessing, exact per-case AUC",
        "cases": len(found.rows),
        "sites": {site: s.get("cases", 0) for site, s in found.summary.items() if site != "all"},
        "skipped": found.skipped,
        "auc": {"value": interval.auc, "low": interval.low, "high": interval.high, "level": interval.level,
                "resamples": interval.n_boot, "reason": interval.reason},  # fmt: skip
    }


def read_final_evaluation(run_dir: Path, name: str = "final_evaluation") -> dict[str, Any] | None:
    """The run's final evaluation (or another `name`d one), if it ran (an unreadable file is reported as
    absent, with a warning)."""
    path = Path(run_dir) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring %s: %s", path, err)
        return None


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: an undefined mean is written as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def final_evaluation_lines(result: dict[str, Any] | None) -> list[str]:
    """The report's section on the final evaluation (Markdown lines; none without a result)."""
    if not result:
        return []
    sites = result["sites"]
    lines = [f"## {result.get('title', 'Final evaluation')}", "", f"The global model through `{result['pipeline']}`: "
             f"{result['cases']} case(s) at {len(sites)} site(s). Case-weighted means count each case once, "
             "site-weighted means each site once; bootstrap 95% intervals resample the cases.", ""]  # fmt: skip
    if result["task"] == "classification":
        auc = result["auc"]
        if auc["value"] is None:
            lines.append(f"AUC undefined: {auc['reason']}")
        else:
            lines.append(f"AUC {auc['value']:.3f} (95% CI {auc['low']:.3f}-{auc['high']:.3f}, {auc['resamples']} resamples)")
    else:
        from fedbrats.shared.evaluation.metrics import hd95_note

        lines += [f"{hd95_note(result['hd95_definition'])}.", "", "| metric | case-weighted (95% CI) | site-weighted (95% CI) |",
                  "|---|---|---|"]  # fmt: skip
        for row in (r for r in result["intervals"] if r["metric"].startswith(("dice", "hd95"))):
            fmt = "{:.1f}" if row["metric"].startswith("hd95") else "{:.3f}"
            cells = [_cell(fmt, row, w) for w in ("case", "site")]
            lines.append(f"| {row['metric']} | {cells[0]} | {cells[1]} |")
    if result["skipped"]:
        lines += ["", f"Skipped {len(result['skipped'])} case(s): " + "; ".join(result["skipped"])]
    return [*lines, ""]


def _cell(fmt: str, row: dict[str, Any], weighting: str) -> str:
    value, low, high = (row.get(f"{weighting}_{k}") for k in ("weighted", "low", "high"))
    if value is None:
        return "-"
    return f"{fmt.format(value)} ({fmt.format(low)}-{fmt.format(high)})" if low is not None else fmt.format(value)
