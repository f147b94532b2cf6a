"""The tables the commands print: modules return data, only the command line turns it into tables."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.data.partition import Partition


def partition_table(partition: Partition, tumor_sizes: dict[str, float] | None = None, *, title: str = "") -> Table:
    """One row per site with its case count (and mean tumour size when known), then the total."""
    table = Table(title=title or None)
    table.add_column("site")
    table.add_column("cases", justify="right")
    if tumor_sizes is not None:
        table.add_column("mean tumour (voxels)", justify="right")
    for site, subjects in partition.sites.items():
        row = [site, str(len(subjects))]
        if tumor_sizes is not None:
            row.append(f"{np.mean([tumor_sizes[s] for s in subjects]):.0f}")
        table.add_row(*row)
    table.add_row("total", str(len(partition.subjects)), *([""] if tumor_sizes is not None else []), style="bold")
    return table


def evaluation_table(summary: dict[str, dict[str, Any]], title: str) -> Table:
    """One row per site, one column per metric with the ET / TC / WT values (shared.evaluation.evaluate)."""
    from fedbrats.shared.evaluation.evaluate import METRIC_NAMES
    from fedbrats.shared.evaluation.metrics import CONVENTION

    table = Table(title=title, caption=f"empty masks: {CONVENTION}", caption_justify="left")
    table.add_column("site")
    table.add_column("cases", justify="right")
    for metric in METRIC_NAMES:
        table.add_column(f"{metric} (ET / TC / WT)", justify="right")
    for site, values in summary.items():
        cells = []
        for metric in METRIC_NAMES:
            fmt = "{:.1f}" if metric == "hd95" else "{:.3f}"
            cells.append(" / ".join(fmt.format(values[f"{metric}_{r}"]) for r in REGIONS))
        table.add_row(site, str(values["cases"]), *cells, end_section=site == "all")
    return table


def class_evaluation_table(summary: dict[str, dict[str, Any]], title: str) -> Table:
    """One row per site (and "all"): cases, AUC with its 95% bootstrap interval, balanced accuracy, ...
    (shared.evaluation.predict_class); a metric the site's cases cannot define reads "undefined"."""

    def cell(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    table = Table(title=title)
    for header in ("site", "cases", "AUC (95% CI)", "balanced accuracy", "sensitivity", "specificity", "accuracy"):
        table.add_column(header, justify="left" if header == "site" else "right")
    for site, m in summary.items():
        auc = cell(m["auc"]) + ("" if m["auc_low"] is None else f" ({m['auc_low']:.3f}-{m['auc_high']:.3f})")
        table.add_row(site, str(m["cases"]), auc, *(cell(m[k]) for k in ("balanced_accuracy", "sensitivity",
                      "specificity", "accuracy")), end_section=site == "all")  # fmt: skip
    return table


def auc_line(interval) -> str:
    """'AUC 0.873 (95% CI 0.801-0.932)' over every case evaluated, or why the AUC is undefined."""
    if interval.auc is None:
        return f"AUC undefined: {interval.reason}"
    return f"AUC {interval.auc:.3f} ({interval.level:.0%} CI {interval.low:.3f}-{interval.high:.3f})"


def comparison_tables(rows: list[dict], target_region: str = "mean") -> list[Table]:
    """The comparison's accuracy table and its convergence-and-cost table (simulations.compare_report),
    best headline (mean Dice or AUC) first; the target is the one the rows were summarised with."""
    from fedbrats.simulations.compare_report import table_columns, table_titles

    if not rows:
        return []
    accuracy, cost = table_columns(rows)
    tables = []
    for title, columns in zip(table_titles(rows, rows[0]["target"], target_region), (accuracy, cost), strict=True):
        table = Table(title=title, header_style="bold")
        for header, _ in columns:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*(cell(row) for _, cell in columns))
        tables.append(table)
    return tables
