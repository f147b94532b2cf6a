"""Score a checkpoint on labelled cases: per case and per site Dice, HD95, sensitivity, specificity (ET, TC, WT).

The full inference pipeline runs (sliding window, optional TTA, post-processing) and predictions are
padded back to the original volume before scoring, so the numbers are comparable with BraTS (the
metrics' specificity and empty-mask HD95 depend on the whole image). Sites come from a FeTS
partition CSV, or everything is one site "all".
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedbrats.shared.constants import REGIONS

log = logging.getLogger(__name__)

METRIC_NAMES = ("dice", "hd95", "sensitivity", "specificity")
#: Per-case CSV columns after site and case_id: metric-major, regions in ET, TC, WT order.
METRIC_COLUMNS = tuple(f"{m}_{r}" for m in METRIC_NAMES for r in REGIONS)
SPLITS = ("all", "train", "val")


def _site_subjects(
    case_ids: list[str], partition_csv: Path | None, split: str, seed: int, val_fraction: float
) -> dict[str, list[str]]:
    """Site -> case ids to score; with split "train"/"val", the split `fedbrats train` and the clients use."""
    from fedbrats.shared.data.partition import check_on_disk, read_partition, split_train_val

    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if partition_csv is None:
        sites, fixed = {"all": list(case_ids)}, {}
    else:
        partition = read_partition(Path(partition_csv))
        check_on_disk(partition, case_ids)
        sites, fixed = partition.sites, partition.train_or_val
    if split == "all":
        return {site: list(subjects) for site, subjects in sites.items()}
    chosen = {}
    for site, subjects in sites.items():
        train, val = split_train_val(subjects, seed=seed, val_fraction=val_fraction, fixed=fixed)
        chosen[site] = val if split == "val" else train
    return chosen


def score_case(
    model: torch.nn.Module, case: Any, *, patch_size, tta: bool, device: Any, overlap: float = 0.5
) -> dict[str, dict[str, float]]:
    """Metrics of one labelled case, predicted with the full pipeline and scored on the original grid."""
    from fedbrats.shared.data.transforms import preprocess
    from fedbrats.shared.data.volumes import load_case
    from fedbrats.shared.evaluation.inference import predict_probabilities
    from fedbrats.shared.evaluation.metrics import region_metrics
    from fedbrats.shared.evaluation.postprocess import min_et_voxels, postprocess

    volume = load_case(case, with_labels=True)
    image, _, box = preprocess(volume)
    probs = predict_probabilities(
        model, torch.as_tensor(image), patch_size=patch_size, overlap=overlap, tta=tta, device=device
    )
    regions = postprocess(probs.numpy() >= 0.5, min_et_voxels(volume.spacing), brain=(image != 0).any(0))
    return region_metrics(box.uncrop(regions), volume.regions.astype(bool), volume.spacing)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site (and "all" over every case when there are several sites): case count and mean of each column."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["site"], []).append(row)
    if len(groups) > 1:
        groups["all"] = rows
    return {
        site: {"cases": len(items), **{c: float(np.mean([r[c] for r in items])) for c in METRIC_COLUMNS}}
        for site, items in groups.items()
    }


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def summary_table(summary: dict[str, dict[str, Any]], title: str) -> Table:
    """Rich table: one row per site, one column per metric with the ET / TC / WT values."""
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


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    partition_csv: str | Path | None = None,
    *,
    out_csv: str | Path | None = None,
    tta: bool = False,
    device: str = "auto",
    split: str = "all",
    seed: int = 0,
    val_fraction: float = 0.2,
    console: Console | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Score `checkpoint` on the labelled cases under `data_root`; print a per-site table, optionally write CSVs.

    Returns (per-case rows {"site", "case_id", "dice_ET", ..., "specificity_WT"}, per-site summary
    {site: {"cases", <same columns as means>}}). `out_csv` gets the per-case rows and
    `<stem>_sites.csv` beside it the per-site means. A case that cannot be loaded is logged and
    listed as skipped, never silently dropped. `split` "val" scores only the validation cases of each
    site as `split_train_val(seed, val_fraction)` draws them.
    """
    from fedbrats.shared.checkpoint import load_checkpoint
    from fedbrats.shared.data.cases import discover_cases
    from fedbrats.shared.data.problems import CaseError
    from fedbrats.shared.evaluation.inference import get_device

    console = console or Console()
    model, meta = load_checkpoint(checkpoint)
    if "patch_size" not in meta:
        raise ValueError(f"checkpoint {checkpoint} has no patch_size in its metadata; cannot run inference")
    device = get_device(device)
    cases, problems = discover_cases(Path(data_root))
    for problem in problems:
        log.warning("%s", problem)
    by_id = {c.case_id: c for c in cases}
    sites = _site_subjects(sorted(by_id), Path(partition_csv) if partition_csv else None, split, seed, val_fraction)
    todo = [(site, cid) for site, subjects in sites.items() for cid in subjects]
    if not todo:
        raise ValueError(f"no case to evaluate under {data_root} (split {split!r})")

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(todo))
        for site, case_id in todo:
            progress.update(task, description=f"site {site}: {case_id}")
            try:
                metrics = score_case(model, by_id[case_id], patch_size=meta["patch_size"], tta=tta, device=device)
            except CaseError as error:
                log.warning("skipped %s: %s", case_id, error)
                skipped.append(f"{case_id}: {error}")
            else:
                rows.append({"site": site, "case_id": case_id,
                             **{f"{m}_{r}": float(metrics[r][m]) for m in METRIC_NAMES for r in REGIONS}})
            progress.advance(task)
    if not rows:
        raise ValueError(f"none of the {len(todo)} cases could be scored: " + "; ".join(skipped[:5]))
    summary = summarise(rows)
    title = f"{Path(checkpoint).name} on {len(rows)} case(s), split {split}, TTA {'on' if tta else 'off'}"
    console.print(summary_table(summary, title))
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} case(s):[/] " + "; ".join(skipped))
    if out_csv is not None:
        out_csv = Path(out_csv)
        _write_csv(out_csv, ["site", "case_id", *METRIC_COLUMNS], rows)
        sites_csv = out_csv.with_name(f"{out_csv.stem}_sites.csv")
        _write_csv(sites_csv, ["site", "cases", *METRIC_COLUMNS], [{"site": s, **v} for s, v in summary.items()])
        console.print(f"per-case metrics: {out_csv}\nper-site means: {sites_csv}")
    return rows, summary
