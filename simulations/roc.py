"""ROC curves from the score histograms sites send (DESIGN section 9): no per-case score needed.

A threshold at each bin edge splits a histogram into cases scored above and below it, so the ROC
is exact at the bin edges; joining the points with straight lines gives a curve whose area is
`shared.evaluation.classification.histogram_auc` of the same counts (same-bin pairs count one half).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbrats.shared.evaluation.classification import histogram_auc


@dataclass(frozen=True)
class RocCurve:
    """One ROC curve: false and true positive rates from the strictest threshold (0, 0) to (1, 1)."""

    positive: int  # the class index scored as positive (binary: 1; multi-class: one vs the rest)
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float  # the area under the polyline: `histogram_auc` of the same counts


def as_histograms(value) -> np.ndarray:
    """A history's nested list (or an array) as validated counts [K, 1 or K, bins]."""
    h = np.asarray(value)
    if h.ndim != 3 or h.shape[0] < 2 or h.shape[1] not in (1, h.shape[0]) or h.shape[2] < 1:
        raise ValueError(f"expected score histograms [K, 1 or K, bins] with K >= 2, got shape {h.shape}")
    if not np.issubdtype(h.dtype, np.number) or (h < 0).any() or not np.isfinite(h).all():
        raise ValueError("score histogram counts must be finite and non-negative")
    return h.astype(np.int64)


def _curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # From the top bin down: cases scored at or above each bin's lower edge are called positive.
    tpr = np.concatenate([[0.0], np.cumsum(positive[::-1]) / positive.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(negative[::-1]) / negative.sum()])
    return fpr, tpr


def roc_curves(histograms) -> list[RocCurve]:
    """The ROC curve(s) of (summed) histograms: one for binary, one per class present (one vs rest) otherwise.

    Empty when the counts hold fewer than two classes (the AUC is undefined there, and so is the curve).
    """
    h = as_histograms(histograms)
    if histogram_auc(h).auc is None:
        return []
    if h.shape[1] == 1:
        fpr, tpr = _curve(h[1, 0], h[0, 0])
        return [RocCurve(1, fpr, tpr, float(np.trapezoid(tpr, fpr)))]
    curves = []
    counts = h[:, 0, :].sum(axis=1)
    for c in np.flatnonzero(counts):
        rest = h[np.arange(h.shape[0]) != c, c, :].sum(axis=0)
        fpr, tpr = _curve(h[c, c], rest)
        curves.append(RocCurve(int(c), fpr, tpr, float(np.trapezoid(tpr, fpr))))
    return curves


def pooled_histograms(entries: list[dict]) -> np.ndarray | None:
    """The sum of the sites' histograms (what the server pools), None when no site sent any."""
    arrays = [as_histograms(e["histograms"]) for e in entries if e.get("histograms") is not None]
    if not arrays:
        return None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"sites sent score histograms of different shapes {sorted(shapes)}; cannot pool them")
    return np.sum(arrays, axis=0)
