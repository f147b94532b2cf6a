"""Score a checkpoint on labelled cases: per case and per site Dice, HD95, sensitivity, specificity (ET, TC, WT).

The full inference pipeline runs (sliding window, optional TTA, post-processing) and predictions are
padded back to the original volume before scoring, so the numbers are comparable with BraTS (the
metrics' specificity and empty-mask HD95 depend on the whole image). Sites come from a FeTS
partition CSV, or everything is one site "all". Every CSV names its HD95 definition (`hd95_definition`
column); `<stem>_intervals.csv` holds the case- and site-weighted means with bootstrap 95% intervals.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from fedbrats.shared.atomic import atomic_write_text
from fedbrats.shared.constants import REGIONS
from fedbrats.shared.data.partition import Partition
from fedbrats.shared.data.site_cases import SPLITS, Discovered, cases_of_sites
from fedbrats.shared.evaluation.intervals import interval_rows
from fedbrats.shared.evaluation.surface import DEFAULT_HD95, check_definition

log = logging.getLogger(__name__)

METRIC_NAMES = ("dice", "hd95", "sensitivity", "specificity")
#: Per-case CSV columns after site and case_id: metric-major, regions in ET, TC, WT order.
METRIC_COLUMNS = tuple(f"{m}_{r}" for m in METRIC_NAMES for r in REGIONS)


def score_case(
    model: torch.nn.Module, case: Any, *, patch_size, tta: bool, device: Any, overlap: float = 0.5,
    hd95_definition: str = DEFAULT_HD95, on_image: Any = None,
) -> dict[str, dict[str, float]]:
    """Metrics of one labelled case, predicted with the full pipeline and scored on the original grid;
    `on_image(image)` (optional) sees its preprocessed volume first."""
    from fedbrats.shared.data.transforms import preprocess
    from fedbrats.shared.data.volumes import load_case
    from fedbrats.shared.evaluation.inference import predict_probabilities
    from fedbrats.shared.evaluation.metrics import region_metrics
    from fedbrats.shared.evaluation.postprocess import min_et_voxels, postprocess

    volume = load_case(case, with_labels=True)
    image, _, box = preprocess(volume)
    if on_image is not None:
        on_image(image)
    probs = predict_probabilities(
        model, torch.as_tensor(image), patch_size=patch_size, overlap=overlap, tta=tta, device=device
    )
    regions = postprocess(probs.numpy() >= 0.5, min_et_voxels(volume.spacing), brain=(image != 0).any(0))
    return region_metrics(box.uncrop(regions), volume.regions.astype(bool), volume.spacing, hd95_definition)


class CaseHook(Protocol):
    """More to score in the same pass over the same cases (a multitask model's class probabilities,
    shared.evaluation.evaluate_multitask): `cases` sees the list before any is scored, `image` each
    case's preprocessed volume [4, X, Y, Z]."""

    def cases(self, todo: list[tuple[str, Any]]) -> None: ...

    def image(self, model: torch.nn.Module, site: str, case: Any, image: np.ndarray) -> None: ...


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
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, text.getvalue())


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate_checkpoint` found: per-case rows, per-site means, cases it could not score, files,
    and the case- and site-weighted means with bootstrap intervals (`shared.evaluation.intervals`)."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    skipped: list[str]
    title: str
    written: list[Path]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    hd95_definition: str = DEFAULT_HD95


def cases_to_score(
    data_root: str | Path, partition: Partition | str | Path | None, *, split: str, seed: int, val_fraction: float,
    discovered: Discovered | None = None,
) -> list[tuple[str, Any]]:
    """(site, case) for every case of `split`, drawn as training drew them; each site's data problems are logged."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    sites = cases_of_sites(data_root, partition, seed=seed, val_fraction=val_fraction, discovered=discovered)
    for found in sites.values():
        for problem in found.problems:
            log.warning("site %s: %s", found.site, problem)
    todo = [(name, case) for name, found in sites.items() for case in found.select(split)]
    if not todo:
        raise ValueError(f"no case to evaluate under {data_root} (split {split!r})")
    return todo


def score_cases(
    todo: list[tuple[str, Any]], score: Any, *, console: Console | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows {"site", "case_id", **score(site, case)} with a progress bar. A case that cannot be loaded is logged
    and listed as skipped ("case: why"), never silently dropped; none scored at all is an error."""
    from fedbrats.shared.data.problems import CaseError

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("evaluating", total=len(todo))
        for site, case in todo:
            progress.update(task, description=f"site {site}: {case.case_id}")
            try:
                rows.append({"site": site, "case_id": case.case_id, **score(site, case)})
            except CaseError as error:
                log.warning("skipped %s: %s", case.case_id, error)
                skipped.append(f"{case.case_id}: {error}")
            progress.advance(task)
    if not rows:
        raise ValueError(f"none of the {len(todo)} cases could be scored: " + "; ".join(skipped[:5]))
    return rows, skipped


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    partition: Partition | str | Path | None = None,
    *,
    out_csv: str | Path | None = None,
    tta: bool = False,
    device: str = "auto",
    split: str = "all",
    seed: int = 0,
    val_fraction: float = 0.2,
    discovered: Discovered | None = None,
    console: Console | None = None,
    hd95_definition: str = DEFAULT_HD95,
    hook: CaseHook | None = None,
) -> Evaluation:
    """Score `checkpoint` on the labelled cases under `data_root`, site by site; optionally write CSVs.

    Rows are {"site", "case_id", "dice_ET", ..., "specificity_WT"}; the summary is per site
    {site: {"cases", <same columns as means>}}. `out_csv` gets the per-case rows and
    `<stem>_sites.csv` beside it the per-site means. A case that cannot be loaded is logged and
    listed as skipped, never silently dropped. The cases of each site and their train/val `split`
    come from `shared.data.site_cases` with `seed` and `val_fraction`, as training drew them.
    `console` only carries the progress bar. HD95 follows `hd95_definition` (pooled or max); the
    intervals resample the scored cases with `seed`. `hook` scores more of each case in the same pass.
    """
    from fedbrats.shared.checkpoint import load_checkpoint
    from fedbrats.shared.evaluation.inference import get_device

    check_definition(hd95_definition)
    model, meta = load_checkpoint(checkpoint)
    if "patch_size" not in meta:
        raise ValueError(f"checkpoint {checkpoint} has no patch_size in its metadata; cannot run inference")
    device = get_device(device)
    todo = cases_to_score(data_root, partition, split=split, seed=seed, val_fraction=val_fraction,
                          discovered=discovered)  # fmt: skip
    if hook is not None:
        hook.cases(todo)

    def score(site: str, case: Any) -> dict[str, Any]:
        on_image = None if hook is None else partial(hook.image, model, site, case)
        metrics = score_case(model, case, patch_size=meta["patch_size"], tta=tta, device=device,
                             hd95_definition=hd95_definition, on_image=on_image)  # fmt: skip
        return {f"{m}_{r}": float(metrics[r][m]) for m in METRIC_NAMES for r in REGIONS}

    rows, skipped = score_cases(todo, score, console=console)
    summary = summarise(rows)
    intervals = interval_rows(rows, METRIC_COLUMNS, seed=seed)
    title = (f"{Path(checkpoint).name} on {len(rows)} case(s), split {split}, TTA {'on' if tta else 'off'}, "
             f"HD95 {hd95_definition}")  # fmt: skip
    written: list[Path] = []
    if out_csv is not None:
        out_csv = Path(out_csv)
        named = {"hd95_definition": hd95_definition}
        _write_csv(out_csv, ["site", "case_id", *METRIC_COLUMNS, *named], [{**r, **named} for r in rows])
        sites_csv = out_csv.with_name(f"{out_csv.stem}_sites.csv")
        _write_csv(sites_csv, ["site", "cases", *METRIC_COLUMNS, *named],
                   [{"site": s, **v, **named} for s, v in summary.items()])  # fmt: skip
        intervals_csv = out_csv.with_name(f"{out_csv.stem}_intervals.csv")
        _write_csv(intervals_csv, [*intervals[0], *named], [{**r, **named} for r in intervals])
        written = [out_csv, sites_csv, intervals_csv]
    return Evaluation(rows, summary, skipped, title, written, intervals, hd95_definition)
