"""What a run learns: one `Task` object owns the batch, the loss, the model's heads, evaluation and the headline.

- `segmentation`: region masks (ET, TC, WT); headline: mean Dice over the three regions.
- `classification`: one label per case from a labels CSV (grade, MGMT; `shared.data.case_labels`),
  a whole-brain classifier (`resclassifier`, `densenet121`); headline: the AUC pooled over sites
  from their score histograms (no per-case score leaves a site).
- `multitask`: a U-Net with a class head (`resunet`, `selfensemble` with `n_classes`): by default
  one that reads the segmented tumour's profile (`model-class-head = profile`, never training the
  segmentation), or one on the bottleneck; loss = segmentation loss + `multitask-weight` x
  classification loss; both metric sets; headline: the pooled AUC (the mean Dice stays in every round record).

The site (client/app.py), local training, DP-SGD, the server's round record and the reports ask
the task rather than testing its name: `task_for(config)` is the one place a name becomes behaviour.
The patient stays the unit of every dataset (one item per case), so DP-SGD and the ledger apply as
they are.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.data.case_labels import (
    KNOWN_FORMATS,
    CaseLabelError,
    CaseLabels,
    find_label_file,
    read_case_labels,
)
from fedbrats.shared.evaluation.classification import (
    HISTOGRAM_BINS,
    HistogramAUC,
    classification_metrics,
    histogram_auc,
    score_histograms,
)

log = logging.getLogger(__name__)

#: A fedbrats.shared.config.RunConfig. Not imported: RunConfig.model_config asks the task for the model's
#: arguments, and imports flow one way.
RunConfig = Any

#: Task names (RunConfig's `task`; shared.config.CHOICES holds a copy).
TASKS = ("segmentation", "classification", "multitask")
MEAN_DICE, AUC = "mean-dice", "auc"
#: Cases scored at once when a classifier evaluates a site.
EVAL_BATCH = 4


def _takes(model: str, argument: str) -> bool:
    from fedbrats.shared.models import MODELS

    return argument in inspect.signature(MODELS.get(model)).parameters


def _default_classes(config: RunConfig) -> int:
    return type(config).__dataclass_fields__["model_classes"].default


def _cache(config: RunConfig) -> str | None:
    return None if config.cache == "none" else config.cache


def _label_of(cases: Sequence[Any], labels: CaseLabels | None, task: str) -> dict[str, int]:
    if labels is None:
        raise ValueError(f"task {task!r} needs case labels (a labels CSV); none were given")
    ids = [c.case_id for c in cases]
    labels.require(ids)
    return {i: labels.index(i) for i in ids}


class Task:
    """The interface; each task below says what differs. Metric keys are those of a site's reply."""

    name = ""
    headline_name = ""
    needs_labels = False  # a labels CSV is read at the site
    needs_masks = True  # cases need a seg file
    classifies = False  # evaluation sends score histograms; the round record has a pooled AUC

    def model_arguments(self, config: RunConfig, arguments: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments of `config.model` for this task (RunConfig.model_config asks here)."""
        return arguments

    def check_model(self, config: RunConfig) -> None:
        """Raise ValueError when `config.model` cannot learn this task (the server and each site check)."""

    def dataset(self, cases: Sequence[Any], config: RunConfig, *, labels: CaseLabels | None, augment: bool,
                cache_dir: Path | None) -> torch.utils.data.Dataset:  # fmt: skip
        raise NotImplementedError

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dataset: Any, config: RunConfig, device: Any) -> dict[str, Any]:
        """Site metrics (plain floats, reply keys), `histograms` when the task classifies, and `reasons`
        (metric -> why it is undefined; for the site's log, never sent)."""
        raise NotImplementedError

    def headline(self, site_metrics: Sequence[Mapping[str, float]], pooled: float | None) -> float | None:
        """The number reports, `compare` and convergence use for one evaluated round (None: not available)."""
        raise NotImplementedError


def model_loss(model: str) -> Any:
    """The training loss a registered model brings (its paper's loss: `training_loss(outputs, regions)`,
    a static method or attribute of the registered class or factory), or None for the default region loss.

    A model whose training outputs are more than region logits (a slice branch, a cascade, label
    logits) owns the loss that reads them; its eval-mode forward returns region logits like any model.
    """
    from fedbrats.shared.models import MODELS

    return getattr(MODELS.get(model), "training_loss", None)


class SegmentationTask(Task):
    """Region masks; the loss is the model's own (`model_loss`) or Dice + focal on region logits."""

    name, headline_name = "segmentation", MEAN_DICE

    def __init__(self, model_loss_fn: Any = None):
        self.model_loss_fn = model_loss_fn

    def check_model(self, config: RunConfig) -> None:
        if not _takes(config.model, "out_channels"):
            raise ValueError(f"task 'segmentation' needs a model with region outputs (e.g. resunet); "
                             f"model {config.model!r} gives class logits: set task = classification")  # fmt: skip

    def model_arguments(self, config: RunConfig, arguments: dict[str, Any]) -> dict[str, Any]:
        if "n_classes" in arguments and _takes(config.model, "out_channels"):  # a multi-task model, no head
            if arguments["n_classes"] != _default_classes(config):
                raise ValueError(f"model-classes ({arguments['n_classes']}) does not apply to task 'segmentation' "
                                 "(set task = multitask for a classification head)")  # fmt: skip
            # no head: its kind is not part of the model (the checkpoint matches one trained with any kind)
            arguments = {k: v for k, v in arguments.items() if k != "class_head"} | {"n_classes": 0}
        return arguments

    def dataset(self, cases, config, *, labels, augment, cache_dir):
        from fedbrats.shared.data.dataset import PatientDataset

        return PatientDataset(cases, config.patch, foreground_prob=config.foreground_prob, augment=augment,
                              cache=_cache(config), cache_dir=cache_dir, seed=config.seed)  # fmt: skip

    def loss(self, outputs, targets):
        if self.model_loss_fn is not None:
            return self.model_loss_fn(outputs, targets)
        from fedbrats.shared.models.losses import region_loss

        return region_loss(outputs, targets)

    def evaluate(self, model, dataset, config, device):
        from fedbrats.shared.evaluation.local import evaluate_local, flat_metrics

        evaluation = evaluate_local(model, dataset, patch_size=config.patch, device=device,
                                    hd95_definition=config.hd95_definition)
        metrics = {k.replace("_", "-"): v for k, v in flat_metrics(evaluation).items()}
        return {**metrics, "eval-seconds": evaluation["seconds"], "reasons": {}}

    def headline(self, site_metrics, pooled=None):
        """Mean over ET, TC, WT of the unweighted mean over the sites that report Dice."""
        reporting = [m for m in site_metrics if all(f"dice-{r}" in m for r in REGIONS)]
        if not reporting:
            return None
        return float(np.mean([np.mean([m[f"dice-{r}"] for m in reporting]) for r in REGIONS]))


def class_metrics(probabilities: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, Any]:
    """A site's classification reply: defined metrics, `auc-undefined` = 1 when its AUC is not defined
    (never 0 or 1 in its place), the score `histograms`, and the `reasons` for the site's log."""
    m = classification_metrics(probabilities, labels, n_classes)
    out: dict[str, Any] = {k.replace("_", "-"): v for k, v in m.defined().items()}
    if m.auc is None:
        out["auc-undefined"] = 1.0
    out["histograms"] = score_histograms(probabilities, labels, n_classes)
    out["reasons"] = dict(m.undefined)
    return out


def class_softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64)


def class_scores(model: nn.Module, dataset: Any, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [N, K], class indices [N]) of every case of a `ClassificationDataset`.

    What `fedbrats evaluate` writes per case at the site that holds the cases; a federated site only
    sends `class_metrics` of them.
    """
    from fedbrats.shared.evaluation.inference import get_device

    device = get_device(device)
    was_training = model.training
    model.to(device).eval()
    scores = []
    try:
        with torch.inference_mode():
            for start in range(0, len(dataset), EVAL_BATCH):
                cubes = [dataset.image(i) for i in range(start, min(start + EVAL_BATCH, len(dataset)))]
                scores.append(class_softmax(model(torch.as_tensor(np.stack(cubes)).to(device))))
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("no case to evaluate; the site has no usable validation case")
    return np.concatenate(scores), np.asarray(dataset.labels, dtype=np.int64)


class ClassificationTask(Task):
    name, headline_name = "classification", AUC
    needs_labels, needs_masks, classifies = True, False, True

    def check_model(self, config: RunConfig) -> None:
        if not _takes(config.model, "n_classes") or _takes(config.model, "out_channels"):
            raise ValueError(f"task 'classification' needs a classifier (resclassifier or densenet121); "
                             f"model {config.model!r} is not one (task = multitask puts a head on resunet)")  # fmt: skip

    def dataset(self, cases, config, *, labels, augment, cache_dir):
        from fedbrats.shared.data.class_dataset import ClassificationDataset

        data = ClassificationDataset(cases, _label_of(cases, labels, self.name), config.class_input_size,
                                     augment=augment, cache=_cache(config), cache_dir=cache_dir, seed=config.seed)  # fmt: skip
        if config.class_balance and augment:  # training cases: targets carry their class weight
            from fedbrats.shared.data.class_balance import ClassBalanced

            return ClassBalanced(data)
        return data

    def loss(self, outputs, targets):
        if targets.ndim == 2:  # [index, class weight] (class-balance): a weighted mean over the batch
            return (F.cross_entropy(outputs, targets[:, 0].long(), reduction="none") * targets[:, 1]).mean()
        return F.cross_entropy(outputs, targets.long())

    def evaluate(self, model, dataset, config, device):
        start = time.perf_counter()
        probabilities, labels = class_scores(model, dataset, device)
        return {**class_metrics(probabilities, labels, config.model_classes),
                "eval-seconds": time.perf_counter() - start}  # fmt: skip

    def headline(self, site_metrics, pooled=None):
        """The AUC pooled over sites (summed histograms); None when no site sent histograms or it is undefined."""
        return pooled


def centre_patch(image: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """The centre `patch` of a [C, X, Y, Z] volume, zero-padded where the volume is smaller."""
    out = np.zeros((image.shape[0], *patch), np.float32)
    src, dst = [], []
    for n, p in zip(image.shape[1:], patch, strict=True):
        size = min(n, p)
        a, b = (n - size) // 2, (p - size) // 2
        src.append(slice(a, a + size))
        dst.append(slice(b, b + size))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


class MultitaskTask(Task):
    """Segmentation and a case label from one U-Net. The class score of a case is read from the
    centre patch of its brain-cropped volume (the patch size the model trained on)."""

    name, headline_name = "multitask", AUC
    needs_labels, classifies = True, True

    def __init__(self, weight: float = 0.5, model_loss_fn: Any = None):
        self.weight = float(weight)
        self.segmentation = SegmentationTask(model_loss_fn)

    def check_model(self, config: RunConfig) -> None:
        if not (_takes(config.model, "out_channels") and _takes(config.model, "n_classes")):
            raise ValueError(f"task 'multitask' needs a segmentation model with a classification head "
                             f"(n_classes), e.g. resunet; model {config.model!r} has none")  # fmt: skip

    def dataset(self, cases, config, *, labels, augment, cache_dir):
        from fedbrats.shared.data.class_dataset import MultitaskDataset

        patients = self.segmentation.dataset(cases, config, labels=None, augment=augment, cache_dir=cache_dir)
        return MultitaskDataset(patients, _label_of(patients.cases, labels, self.name))

    def loss(self, outputs, targets):
        segmentation, logits = outputs
        regions, label = targets
        return self.segmentation.loss(segmentation, regions) + self.weight * F.cross_entropy(logits, label.long())

    def evaluate(self, model, dataset, config, device):
        from fedbrats.shared.evaluation.inference import get_device

        start = time.perf_counter()
        metrics = self.segmentation.evaluate(model, dataset, config, device)
        device = get_device(device)
        was_training = model.training
        model.to(device).eval()
        scores = []
        try:
            with torch.inference_mode():
                for i in range(len(dataset)):
                    patch = centre_patch(np.asarray(dataset.volume(i)[0]), config.patch)
                    scores.append(class_softmax(model(torch.as_tensor(patch)[None].to(device))[1]))
        finally:
            model.train(was_training)
        labels = np.asarray(dataset.labels, dtype=np.int64)
        classified = class_metrics(np.concatenate(scores), labels, config.model_classes)
        reasons = {**metrics.pop("reasons"), **classified.pop("reasons")}
        return {**metrics, **classified, "eval-seconds": time.perf_counter() - start, "reasons": reasons}

    def headline(self, site_metrics, pooled=None):
        return pooled


def task_for(config: RunConfig) -> Task:
    """The task object of a run configuration."""
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")
    return {
        "segmentation": lambda: SegmentationTask(model_loss(config.model)),
        "classification": ClassificationTask,
        "multitask": lambda: MultitaskTask(config.multitask_weight, model_loss(config.model)),
    }[config.task]()


# ---- labels ------------------------------------------------------------------------------------------


def _explicit_classes(config: RunConfig) -> tuple[str, ...] | None:
    names = tuple(c.strip() for c in config.label_classes.split(",") if c.strip())
    return names or None


def load_labels(config: RunConfig, data_root: Path | str) -> CaseLabels:
    """The case labels of a run: `labels` (a path, absolute or under the data folder) or the known file
    found in the data folder; `label-column`/`id-column` override the file's defaults; `label-classes`
    fixes the class order (so every site numbers the classes alike)."""
    root = Path(data_root)
    classes = _explicit_classes(config)
    if config.labels:
        path = Path(config.labels)
        if not path.is_absolute() and not path.is_file() and (root / path).is_file():
            path = root / path
        fmt = next((f for f in KNOWN_FORMATS if f.filename == path.name), None)
        label_column = config.label_column or (fmt.label_column if fmt else "")
        if not label_column:
            raise CaseLabelError(f"{path}: set label-column, the column of the class (not a file we know by name)")
        id_column = config.id_column or (fmt.id_column if fmt else "Subject_ID")
        return read_case_labels(path, label_column, id_column, classes=classes,
                                case_name=fmt.case_name if fmt and fmt.id_column == id_column else None)  # fmt: skip
    found = find_label_file(root, config.label_column or None)
    if found is None:
        names = ", ".join(f.filename for f in KNOWN_FORMATS)
        column = f" with column {config.label_column!r}" if config.label_column else ""
        raise CaseLabelError(f"{root}: no labels file{column} ({names}); task {config.task!r} needs one "
                             "label per case: set labels = PATH (and label-column)")  # fmt: skip
    path, fmt = found
    id_column = config.id_column or fmt.id_column
    return read_case_labels(path, fmt.label_column, id_column, classes=classes,
                            case_name=fmt.case_name if id_column == fmt.id_column else None)  # fmt: skip


def check_classes(config: RunConfig, labels: CaseLabels) -> None:
    """Refuse labels whose class count is not the model's (`model-classes`), naming both numbers."""
    if len(labels.classes) != config.model_classes:
        raise ValueError(
            f"the labels ({labels.label_column}) hold {len(labels.classes)} classes {list(labels.classes)} but "
            f"model-classes = {config.model_classes}; set model-classes = {len(labels.classes)}, or list every "
            "class in label-classes when a site's labels miss one"
        )


def with_label_classes(config: RunConfig, data_root: Path | str | None = None) -> RunConfig:
    """`config` with `model-classes` taken from the labels when the task classifies (call it where the
    whole labels file is visible: `fedbrats simulate`, `fedbrats train`). A `model-classes` set away from
    its default that disagrees with the labels is refused, naming both numbers."""
    task = task_for(config)
    if not task.needs_labels:
        return config
    labels = load_labels(config, data_root if data_root is not None else config.data_dir)
    found = len(labels.classes)
    if config.model_classes not in (found, _default_classes(config)):
        check_classes(config, labels)
    return config.replace(model_classes=found, label_classes=config.label_classes or ",".join(labels.classes))


def checkpoint_metadata(config: RunConfig, data_root: Path | str | None = None) -> dict[str, Any]:
    """What a checkpoint records about the task: `task`, and for classifying tasks `classes` (names in
    index order), `label_column` and `class_input_size`. Names come from `label-classes`, else from the labels file when it
    can be read here, else the class indices."""
    meta: dict[str, Any] = {"task": config.task}
    if not task_for(config).classifies:
        return meta
    classes = _explicit_classes(config)
    column = config.label_column
    root = data_root if data_root is not None else config.data_dir
    if root or config.labels:
        try:
            labels = load_labels(config, root or ".")
            classes = classes or labels.classes
            column = labels.label_column
        except CaseLabelError as err:  # the server of a deployment does not see the sites' labels
            log.info("class names not read from the labels (%s); the checkpoint lists class indices", err)
    meta["classes"] = list(classes or (str(i) for i in range(config.model_classes)))
    meta["label_column"] = column or "label"
    meta["class_input_size"] = config.class_input_size  # the classifier's input cube, for evaluate and predict
    return meta


# ---- pooled over sites -----------------------------------------------------------------------------


def histogram_shape(n_classes: int) -> tuple[int, int, int]:
    """The shape of a site's `histograms` for `n_classes` classes (`score_histograms`)."""
    return (n_classes, 1 if n_classes == 2 else n_classes, HISTOGRAM_BINS)


def pooled_auc(histograms: Iterable[np.ndarray]) -> HistogramAUC | None:
    """The AUC over every site's cases from the sum of their histograms (None when no site sent any)."""
    arrays = [np.asarray(h, dtype=np.int64) for h in histograms]
    if not arrays:
        return None
    return histogram_auc(np.sum(arrays, axis=0))


def round_summary(config: RunConfig, site_metrics: Sequence[Mapping[str, float]],
                  histograms: Iterable[np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """The task's fields of a round record: `headline` {name, value}, and `pooled_auc` with its bound
    (|pooled - exact AUC| <= bound) for classifying tasks."""
    task = task_for(config)
    summary: dict[str, Any] = {}
    pooled = None
    if task.classifies:
        result = pooled_auc(histograms)
        pooled = None if result is None else result.auc
        summary["pooled_auc"] = pooled
        summary["pooled_auc_bound"] = None if result is None or result.auc is None else result.error_bound
    summary["headline"] = {"name": task.headline_name, "value": task.headline(site_metrics, pooled)}
    return summary
