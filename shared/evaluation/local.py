"""Validation of a segmentation model on a site's cases while it trains (sliding window, no post-processing).

Used by the federated site each round, by `fedbrats train` after each epoch and by the segmentation
task (`shared.tasks`); scores are on the brain-cropped volume the model sees, which tracks training.
`shared.evaluation.evaluate` is the full pipeline (TTA, post-processing, original grid) for final scores.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.evaluation.inference import predict_probabilities

__all__ = ["evaluate_local", "flat_metrics"]


def _case_id(dataset: Any, i: int) -> str:
    cases = getattr(dataset, "cases", None)
    if cases is not None and i < len(cases):
        return str(getattr(cases[i], "case_id", cases[i]))
    return str(i)


def evaluate_local(
    model: nn.Module,
    dataset: Any,
    *,
    patch_size: tuple[int, int, int],
    device: torch.device | str | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    hd95_definition: str = "pooled",
) -> dict[str, Any]:
    """Sliding-window predict every case of `dataset` (its `.volume(i)`), threshold 0.5, score per region.

    Returns {"cases": [{"case_id", "ET": {...}, "TC": {...}, "WT": {...}}], "mean": {region: {metric}},
    "mean_dice": mean Dice over the three regions, "num_cases", "seconds"}. Metrics are computed on
    the cropped volume the model sees (no post-processing: this tracks training, not final scores).
    """
    from fedbrats.shared.evaluation.metrics import mean_over_cases, region_metrics

    start = time.perf_counter()
    rows = []
    for i in range(len(dataset)):
        image, regions, spacing = dataset.volume(i)
        probs = predict_probabilities(
            model, torch.as_tensor(image), patch_size=patch_size, overlap=overlap, tta=tta, device=device
        )
        pred = probs.numpy() >= 0.5
        truth = np.asarray(regions).astype(bool)
        metrics = region_metrics(pred, truth, spacing, hd95_definition)
        rows.append({"case_id": _case_id(dataset, i), **{r: dict(metrics[r]) for r in REGIONS}})
    if not rows:
        raise ValueError("no case to evaluate; the site has no usable validation case")
    mean = mean_over_cases([{r: row[r] for r in REGIONS} for row in rows])
    mean_dice = float(np.mean([mean[r]["dice"] for r in REGIONS]))
    return {
        "cases": rows, "mean": mean, "mean_dice": mean_dice, "num_cases": len(rows),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics ("dice_ET", "hd95_WT", ..., "mean_dice") for Flower replies and logs."""
    flat = {f"{m}_{r}": float(v) for r in REGIONS for m, v in evaluation["mean"][r].items()}
    flat["mean_dice"] = float(evaluation["mean_dice"])
    return flat
