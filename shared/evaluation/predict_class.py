"""A case classifier's checkpoint at work: class probabilities per case (`fedbrats predict`) and scored
against a labels file, per case and per site with a bootstrap interval of the AUC (`fedbrats evaluate`).

The checkpoint says what it classifies: `task`, `classes` (names in index order), `label_column` and
`class_input_size` in its metadata (written by `fedbrats train` and the server's final save). Each case
is preprocessed as the classifier was trained (`shared.data.class_dataset`: brain crop, z-score,
resampled cube) and scored alone, so a dataset of any size runs in constant memory.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from fedbrats.shared.atomic import atomic_write_json, atomic_write_text
from fedbrats.shared.checkpoint import CheckpointError
from fedbrats.shared.data.class_dataset import case_cube
from fedbrats.shared.data.site_cases import Discovered
from fedbrats.shared.evaluation.classification import (
    AUCInterval,
    bootstrap_auc_interval,
    classification_metrics,
)

log = logging.getLogger(__name__)

#: Metadata a classifier checkpoint needs beyond the model itself.
CLASS_KEYS = ("classes", "label_column", "class_input_size")
#: Per-site columns of `<stem>_sites.csv` after site and cases.
SITE_COLUMNS = ("auc", "auc_low", "auc_high", "balanced_accuracy", "sensitivity", "specificity", "accuracy")


def is_case_classifier(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's model gives class logits only (task classification): no masks to predict."""
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.tasks import task_for

    task = task_for(RunConfig(task=str(meta.get("task", "segmentation"))))
    return task.classifies and not task.needs_masks


@dataclass(frozen=True)
class Classifier:
    """A loaded classifier checkpoint and what its metadata says about its input and classes."""

    model: nn.Module
    classes: tuple[str, ...]
    label_column: str
    input_size: int
    path: Path


def load_classifier(path: str | Path) -> Classifier:
    """Rebuild a classifier from its checkpoint; missing or inconsistent metadata is an error naming it."""
    from fedbrats.shared.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path)
    missing = [k for k in CLASS_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} (task {meta.get('task', '?')!r}) has no {', '.join(missing)} in "
                              "its metadata; cannot classify with it (write it with fedbrats train or simulate)")  # fmt: skip
    classes = tuple(str(c) for c in meta["classes"])
    n_classes = model.config.get("n_classes") if isinstance(getattr(model, "config", None), dict) else None
    if n_classes is not None and n_classes != len(classes):
        raise CheckpointError(f"checkpoint {path}: the model has {n_classes} class logits but its metadata lists "
                              f"{len(classes)} classes {list(classes)}")  # fmt: skip
    return Classifier(model, classes, str(meta["label_column"]), int(meta["class_input_size"]), Path(path))


def class_probabilities(model: nn.Module, cube: np.ndarray, device: torch.device) -> np.ndarray:
    """Softmax over the class logits of one case [K] (float64)."""
    model.to(device).eval()
    with torch.inference_mode():
        logits = model(torch.as_tensor(cube, dtype=torch.float32)[None].to(device))
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class ClassPrediction:
    case_id: str
    probabilities: dict[str, float]  # class name -> probability, in the checkpoint's class order
    predicted: str
    written: Path


def predict_class_case(
    checkpoint: str | Path, case_dir: str | Path, out_dir: str | Path, *, device: str = "auto"
) -> ClassPrediction:
    """Class probabilities of one case folder, written as `<case>_class.json` into `out_dir`."""
    from fedbrats.shared.data.cases import find_case
    from fedbrats.shared.evaluation.inference import get_device

    classifier = load_classifier(checkpoint)
    case = find_case(Path(case_dir))
    probs = class_probabilities(classifier.model, case_cube(case, classifier.input_size), get_device(device))
    by_class = {c: float(p) for c, p in zip(classifier.classes, probs, strict=True)}
    predicted = classifier.classes[int(np.argmax(probs))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = atomic_write_json(out_dir / f"{case.case_id}_class.json", {
        "case": case.case_id, "checkpoint": str(checkpoint), "label_column": classifier.label_column,
        "classes": list(classifier.classes), "probabilities": by_class, "predicted": predicted,
    })  # fmt: skip
    return ClassPrediction(case.case_id, by_class, predicted, Path(written))


@dataclass(frozen=True)
class ClassEvaluation:
    """Per-case rows (Subject_ID, the true class, p_<class>), per-site metrics, the AUC interval over all."""

    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    interval: AUCInterval
    classes: tuple[str, ...]
    label_column: str
    skipped: list[str]
    title: str
    written: list[Path]


def labels_for(classes: tuple[str, ...], label_column: str, checkpoint: Path, config: Any, data_root: Path, *,
               task: str = "classification"):  # fmt: skip
    """The labels file read with the checkpoint's class order (so index i is the model's logit i)."""
    from fedbrats.shared.tasks import load_labels

    column = config.label_column or ("" if label_column == "label" else label_column)
    ordered = config.label_classes or ",".join(classes)
    try:
        return load_labels(config.replace(task=task, label_column=column, label_classes=ordered), data_root)
    except ValueError as err:
        raise ValueError(f"{err} (the checkpoint {checkpoint.name} lists classes {list(classes)} "
                         "in index order; if the labels name them otherwise, give the names in that order with "
                         "--set label-classes=A,B)") from None  # fmt: skip


def site_summary(probs: np.ndarray, labels: np.ndarray, n_classes: int, *, n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics of one group of cases: case count, AUC with its bootstrap interval, balanced accuracy, ...
    (None where the cases cannot define a metric, e.g. the AUC of one class)."""
    m = classification_metrics(probs, labels, n_classes)
    interval = bootstrap_auc_interval(probs, labels, n_classes, n_boot=n_boot, seed=seed)
    return {"cases": int(len(labels)), "auc": m.auc, "auc_low": interval.low, "auc_high": interval.high,
            "balanced_accuracy": m.balanced_accuracy, "sensitivity": m.sensitivity, "specificity": m.specificity,
            "accuracy": m.accuracy, "undefined": dict(m.undefined)}  # fmt: skip


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> Path:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return atomic_write_text(path, text.getvalue())


def evaluate_class_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    partition: Any = None,
    *,
    config: Any,
    out_csv: str | Path | None = None,
    device: str = "auto",
    split: str = "all",
    discovered: Discovered | None = None,
    n_boot: int = 1000,
    console: Console | None = None,
) -> ClassEvaluation:
    """Score a classifier checkpoint on the labelled cases under `data_root`, site by site.

    `config` (a RunConfig) gives the labels file settings (`labels`, `label-column`, `id-column`,
    `label-classes`; by default the checkpoint's column and classes) and, with `seed` and
    `val-fraction`, each site's train/val `split` as training drew it. `out_csv` gets one row per
    case: Subject_ID, the true class under the label column's name, p_<class> per class; and
    `<stem>_sites.csv` beside it the per-site metrics. A case that cannot be read is listed as skipped.
    """
    from fedbrats.shared.evaluation.evaluate import cases_to_score, score_cases
    from fedbrats.shared.evaluation.inference import get_device

    classifier = load_classifier(checkpoint)
    labels = labels_for(classifier.classes, classifier.label_column, classifier.path, config, Path(data_root))
    todo = cases_to_score(data_root, partition, split=split, seed=config.seed, val_fraction=config.val_fraction,
                          discovered=discovered)  # fmt: skip
    labels.require([case.case_id for _, case in todo])
    if len(labels.classes) != len(classifier.classes):
        raise ValueError(f"{labels.path}: {len(labels.classes)} classes {list(labels.classes)}, but the checkpoint "
                         f"{classifier.path.name} classifies {len(classifier.classes)} {list(classifier.classes)}")  # fmt: skip
    names = labels.classes  # the checkpoint's classes, or the names given in label-classes, in index order
    device_ = get_device(device)

    def score(site: str, case: Any) -> dict[str, Any]:
        return {"probs": class_probabilities(classifier.model, case_cube(case, classifier.input_size), device_)}

    cases, skipped = score_cases(todo, score, console=console)
    rows: list[dict[str, Any]] = []
    scored: list[tuple[str, np.ndarray, int]] = []
    for case in cases:
        truth = labels.index(case["case_id"])
        scored.append((case["site"], case["probs"], truth))
        rows.append({"site": case["site"], "Subject_ID": case["case_id"], labels.label_column: names[truth],
                     **{f"p_{c}": float(p) for c, p in zip(names, case["probs"], strict=True)}})  # fmt: skip
    title = f"{Path(checkpoint).name} on {len(rows)} case(s), split {split}: {labels.label_column} {list(names)}"
    return class_results(scored, rows, tuple(names), labels.label_column, title=title, skipped=skipped,
                         out_csv=out_csv, n_boot=n_boot, seed=config.seed)  # fmt: skip


def class_results(
    scored: list[tuple[str, np.ndarray, int]], rows: list[dict[str, Any]], names: tuple[str, ...], label_column: str,
    *, title: str, skipped: list[str], out_csv: str | Path | None, n_boot: int, seed: int,
) -> ClassEvaluation:  # fmt: skip
    """Per-site metrics (and "all" over several sites) and the AUC interval of scored cases (site, probabilities,
    true index); `out_csv` gets the per-case `rows` and `<stem>_sites.csv` beside it the per-site metrics."""
    k = len(names)
    groups: dict[str, list[tuple[np.ndarray, int]]] = {}
    for site, probs, truth in scored:
        groups.setdefault(site, []).append((probs, truth))
    if len(groups) > 1:
        groups["all"] = [(p, t) for _, p, t in scored]
    summary = {
        site: site_summary(np.stack([p for p, _ in items]), np.array([t for _, t in items]), k,
                           n_boot=n_boot, seed=seed)  # fmt: skip
        for site, items in groups.items()
    }
    everything = next(reversed(summary.values()))  # "all", or the one site
    interval = AUCInterval(everything["auc"], everything["auc_low"], everything["auc_high"], 0.95, n_boot,
                           everything["undefined"].get("auc"))  # fmt: skip
    written: list[Path] = []
    if out_csv is not None:
        out_csv = Path(out_csv)
        header = ["Subject_ID", label_column, *(f"p_{c}" for c in names)]
        written.append(_write_csv(out_csv, header, rows))
        sites_csv = out_csv.with_name(f"{out_csv.stem}_sites.csv")
        written.append(_write_csv(sites_csv, ["site", "cases", *SITE_COLUMNS], [{"site": s, **v} for s, v in summary.items()]))
    return ClassEvaluation(rows, summary, interval, names, label_column, skipped, title, written)
