"""Segmentation metrics per region (ET, TC, WT): Dice, HD95 (mm), sensitivity, specificity.

Empty masks follow the CaPTk/FeTS convention (DESIGN section 4), substituted explicitly because
the libraries disagree (MONAI's DiceMetric gives NaN on an empty truth, its Hausdorff metric NaN
or inf, brats-evaluation drops both-empty cases from the mean):

==================  ======  =========================  ===========  ===========
pred / truth         Dice    HD95                       sensitivity  specificity
==================  ======  =========================  ===========  ===========
both empty           1       0                          1            as counted
exactly one empty    0       image diagonal in mm       0 (*)        as counted
==================  ======  =========================  ===========  ===========

(*) Sensitivity TP / (TP + FN) is 0/0 on an empty truth; we score it like Dice: 1 when the
prediction is empty too, 0 when it predicts anything (so a false-positive region on a case
without it is penalised, as in the Dice column). A truth covering the whole image gives
specificity 1 (there is no negative voxel to get wrong).

The image diagonal is sqrt(sum((shape_i * spacing_i)^2)): 373.13 mm for 240x240x155 at 1 mm.
Specificity counts every voxel of the array, so score predictions padded back to the original
volume (not on the cropped brain) to compare with BraTS numbers.

HD95 has two definitions in use (`shared.evaluation.surface`): `pooled`, the default, is the 95th
percentile of both directions' surface distances pooled (MedPy's `hd95`, as the BraTS evaluators
compute it); `max` is MONAI's larger of the two directed 95th percentiles. The RunConfig key
`hd95-definition` chooses; reports and CSVs name the one they used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.evaluation.surface import DEFAULT_HD95, HD95_DESCRIPTIONS, check_definition, hd95_of

METRICS = ("dice", "hd95", "sensitivity", "specificity")

#: Which empty-mask convention the numbers use; reports print it (and the HD95 definition, `hd95_note`).
CONVENTION = (
    "CaPTk/FeTS: both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 = image diagonal (mm); "
    "sensitivity on empty truth = 1 if prediction empty else 0"
)


def hd95_note(definition: str = DEFAULT_HD95) -> str:
    """The HD95 definition as a report names it: "HD95 pooled: 95th percentile of ..."."""
    return f"HD95 {check_definition(definition)}: {HD95_DESCRIPTIONS[definition]}"

Mask = np.ndarray | torch.Tensor


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the image diagonal: HD95 when exactly one mask is empty."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def _as_bool(mask: Mask, name: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != bool:
        values = np.unique(mask)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(
                f"{name} must be a binary mask (bool or 0/1), found values {values[:10].tolist()}"
            )
        mask = mask.astype(bool)
    return mask


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm per voxel), got {spacing}")
    return spacing


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], definition: str = DEFAULT_HD95) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (`definition`: pooled or max), empty masks by convention."""
    spacing = _check_spacing(spacing, pred.ndim)
    check_definition(definition)
    pred_any, truth_any = bool(pred.any()), bool(truth.any())
    if not pred_any and not truth_any:
        return 0.0
    if pred_any != truth_any:
        return image_diagonal(pred.shape, spacing)
    return hd95_of(pred, truth, spacing, definition)


def binary_metrics(
    pred: Mask, truth: Mask, spacing: Sequence[float], hd95_definition: str = DEFAULT_HD95
) -> dict[str, float]:
    """Dice, HD95 (mm, `hd95_definition`), sensitivity and specificity of one binary mask against its truth."""
    pred, truth = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    n_pred, n_truth, n = int(np.count_nonzero(pred)), int(np.count_nonzero(truth)), pred.size
    fp, fn = n_pred - tp, n_truth - tp
    tn = n - tp - fp - fn
    if n_truth == 0:
        dice = sensitivity = 1.0 if n_pred == 0 else 0.0
    else:
        dice = 2 * tp / (n_pred + n_truth)
        sensitivity = tp / n_truth
    specificity = tn / (tn + fp) if tn + fp else 1.0
    return {
        "dice": dice,
        "hd95": hd95(pred, truth, spacing, hd95_definition),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def region_metrics(
    pred: Mask, truth: Mask, spacing: Sequence[float] = (1.0, 1.0, 1.0), hd95_definition: str = DEFAULT_HD95
) -> dict[str, dict[str, float]]:
    """Metrics per region for masks [3, X, Y, Z] in REGIONS order: {"ET": {"dice": ..., ...}, ...}."""
    pred, truth = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    expected = f"[{len(REGIONS)}, X, Y, Z] in REGIONS order {REGIONS}"
    if pred.ndim != 4 or pred.shape[0] != len(REGIONS):
        raise ValueError(f"pred must be {expected}, got shape {pred.shape}")
    if truth.shape != pred.shape:
        raise ValueError(
            f"truth shape {truth.shape} differs from pred shape {pred.shape}; expected {expected}"
        )
    spacing = _check_spacing(spacing, 3)
    check_definition(hd95_definition)
    return {region: binary_metrics(pred[i], truth[i], spacing, hd95_definition) for i, region in enumerate(REGIONS)}


def mean_over_cases(cases: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of each region's metrics over cases (every case counts, empty ones by the convention)."""
    if not cases:
        raise ValueError("mean_over_cases needs at least one case")
    keys = {region: sorted(metrics) for region, metrics in cases[0].items()}
    for i, case in enumerate(cases):
        if {region: sorted(metrics) for region, metrics in case.items()} != keys:
            raise ValueError(
                f"case {i} has regions/metrics {sorted(case)} unlike the first case's {sorted(keys)}"
            )
    return {
        region: {metric: float(np.mean([case[region][metric] for case in cases])) for metric in metrics}
        for region, metrics in keys.items()
    }
