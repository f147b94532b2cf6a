"""`fedbrats evaluate` of a multitask checkpoint (a U-Net with a classification head): the segmentation
metrics of `evaluate_checkpoint` and, from the same pass over the same cases, each case's class
probabilities scored as a classifier's are (AUC with its bootstrap interval, balanced accuracy, ... per site).

The class input is the one a multitask site scores during the federation (`shared.tasks.MultitaskTask.evaluate`):
the centre patch (the training patch size) of the brain-cropped, z-scored volume and the softmax of the
model's class logits on it, so the figures here equal the site's on the same cases. The classes and
the label column come from the checkpoint's metadata, the true labels from the data root's labels file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from fedbrats.shared.checkpoint import CheckpointError
from fedbrats.shared.data.site_cases import Discovered
from fedbrats.shared.evaluation.evaluate import Evaluation, cases_to_score, evaluate_checkpoint, score_cases
from fedbrats.shared.evaluation.predict_class import ClassEvaluation, class_results, labels_for

#: Metadata a multitask checkpoint needs to name its class logits.
MULTITASK_KEYS = ("classes", "label_column")


def is_multitask(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's model gives both region masks and class logits (task multitask)."""
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.tasks import task_for

    task = task_for(RunConfig(task=str(meta.get("task", "segmentation"))))
    return task.classifies and task.needs_masks


def multitask_class_probabilities(
    model: nn.Module, image: np.ndarray, patch: tuple[int, int, int], device: torch.device
) -> np.ndarray:
    """Softmax over the class logits [K] (float64) of one preprocessed case [4, X, Y, Z], read as the site reads it."""
    from fedbrats.shared.tasks import centre_patch, class_softmax  # the site's own input and softmax

    model.to(device).eval()
    with torch.inference_mode():
        logits = model(torch.as_tensor(centre_patch(np.asarray(image), patch))[None].to(device))[1]
    return class_softmax(logits)[0]


class _ClassScores:
    """The `CaseHook` of `evaluate_checkpoint`: every case needs a label; each image gets its class probabilities."""

    def __init__(self, labels: Any, patch: tuple[int, int, int], device: torch.device):
        self.labels, self.patch, self.device = labels, patch, device
        self.probabilities: dict[str, np.ndarray] = {}

    def cases(self, todo: list[tuple[str, Any]]) -> None:
        self.labels.require([case.case_id for _, case in todo])

    def image(self, model: nn.Module, site: str, case: Any, image: np.ndarray) -> None:
        self.probabilities[case.case_id] = multitask_class_probabilities(
            model, image, self.patch, self.device
        )


@dataclass(frozen=True)
class MultitaskEvaluation:
    """The segmentation evaluation (None when only the class head was scored) and the classification of the same
    cases."""

    segmentation: Evaluation | None
    classes: ClassEvaluation

    @property
    def written(self) -> list[Path]:
        return [*(self.segmentation.written if self.segmentation else []), *self.classes.written]


def _class_head_only(
    checkpoint: Path, data_root: Any, partition: Any, *, hook: _ClassScores, config: Any, split: str,
    discovered: Discovered | None, console: Console | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The cases and preprocessing of `evaluate_checkpoint`, without the sliding-window segmentation: the class
    head reads one centre patch, so this is the cost of loading the cases."""
    from fedbrats.shared.checkpoint import load_checkpoint
    from fedbrats.shared.data.transforms import preprocess
    from fedbrats.shared.data.volumes import load_case

    model, _ = load_checkpoint(checkpoint)
    todo = cases_to_score(data_root, partition, split=split, seed=config.seed, val_fraction=config.val_fraction,
                          discovered=discovered)  # fmt: skip
    hook.cases(todo)

    def score(site: str, case: Any) -> dict[str, Any]:
        hook.image(model, site, case, preprocess(load_case(case, with_labels=False))[0])
        return {}

    return score_cases(todo, score, console=console)


def _class_metadata(checkpoint: Path) -> tuple[tuple[str, ...], str, dict[str, Any]]:
    """(classes in index order, label column, metadata); missing or inconsistent metadata names the file."""
    from fedbrats.shared.checkpoint import read_metadata

    meta = read_metadata(checkpoint)
    missing = [k for k in MULTITASK_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} (task {meta.get('task', '?')!r}) has no {', '.join(missing)} "
                              "in its metadata; cannot score its class head (write it with fedbrats train or simulate)")  # fmt: skip
    classes = tuple(str(c) for c in meta["classes"])
    n_classes = (meta.get("model_config") or {}).get("n_classes")
    if n_classes is not None and n_classes != len(classes):
        raise CheckpointError(f"checkpoint {checkpoint}: the model has {n_classes} class logits but its metadata "
                              f"lists {len(classes)} classes {list(classes)}")  # fmt: skip
    return classes, str(meta["label_column"]), meta


def evaluate_multitask_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    partition: Any = None,
    *,
    config: Any,
    out_csv: str | Path | None = None,
    tta: bool = False,
    device: str = "auto",
    split: str = "all",
    discovered: Discovered | None = None,
    n_boot: int = 1000,
    console: Console | None = None,
    class_only: bool = False,
) -> MultitaskEvaluation:
    """Score a multitask checkpoint: segmentation as `evaluate_checkpoint` (its CSVs at `out_csv`), and the class
    probabilities of the same cases in `<stem>_class.csv` (Subject_ID, the true class under the label column's
    name, p_<class>) with the per-site metrics in `<stem>_class_sites.csv`.

    `config` (a RunConfig) gives the labels file settings (by default the checkpoint's column and classes),
    `seed`, `val-fraction` and `hd95-definition` as for the other checkpoints. `class_only` skips the segmentation
    (its sliding window is most of the time): only the class files are written.
    """
    from fedbrats.shared.evaluation.inference import get_device

    checkpoint = Path(checkpoint)
    classes, label_column, meta = _class_metadata(checkpoint)
    labels = labels_for(classes, label_column, checkpoint, config, Path(data_root), task="multitask")
    if len(labels.classes) != len(classes):
        raise ValueError(f"{labels.path}: {len(labels.classes)} classes {list(labels.classes)}, but the checkpoint "
                         f"{checkpoint.name} classifies {len(classes)} {list(classes)}")  # fmt: skip
    patch = tuple(
        int(p) for p in meta.get("patch_size") or ()
    )  # evaluate_checkpoint refuses a checkpoint without
    hook = _ClassScores(labels, patch, get_device(device))
    if class_only:
        segmentation = None
        cases, skipped = _class_head_only(checkpoint, data_root, partition, hook=hook, config=config, split=split,
                                          discovered=discovered, console=console)  # fmt: skip
    else:
        segmentation = evaluate_checkpoint(
            checkpoint, data_root, partition, out_csv=out_csv, tta=tta, device=device, split=split, seed=config.seed,
            val_fraction=config.val_fraction, discovered=discovered, console=console,
            hd95_definition=config.hd95_definition, hook=hook,
        )  # fmt: skip
        cases, skipped = segmentation.rows, segmentation.skipped
    names = labels.classes  # the checkpoint's classes, or the names given in label-classes, in index order
    scored: list[tuple[str, np.ndarray, int]] = []
    rows: list[dict[str, Any]] = []
    for row in cases:  # the cases scored, in their order
        site, case_id = row["site"], row["case_id"]
        probs, truth = hook.probabilities[case_id], labels.index(case_id)
        scored.append((site, probs, truth))
        rows.append({"site": site, "Subject_ID": case_id, labels.label_column: names[truth],
                     **{f"p_{c}": float(p) for c, p in zip(names, probs, strict=True)}})  # fmt: skip
    class_csv = None if out_csv is None else Path(out_csv).with_name(f"{Path(out_csv).stem}_class.csv")
    title = (f"{checkpoint.name} class head on {len(rows)} case(s), split {split}: "
             f"{labels.label_column} {list(names)}")  # fmt: skip
    result = class_results(scored, rows, tuple(names), labels.label_column, title=title,
                           skipped=list(skipped), out_csv=class_csv, n_boot=n_boot, seed=config.seed)  # fmt: skip
    return MultitaskEvaluation(segmentation, result)
