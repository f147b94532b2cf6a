"""Case-level classification metrics: AUC, balanced accuracy, sensitivity, specificity (DESIGN section 9).

Scores are per-case class probabilities: `[N]` (binary: the score of class 1) or `[N, K]` (softmax
output; binary uses column 1). Labels are class indices 0..K-1 (`CaseLabels.classes` order).
Binary metrics treat class 1 as positive; multi-class AUC is one-vs-rest, macro-averaged over the
classes present (as scikit-learn's `roc_auc_score(multi_class="ovr")`; sklearn is not used here).

A metric that the data cannot define is `None` with a reason, never 0 or 1: a site that holds
one grade only has no AUC, and its balanced accuracy would be one class's recall in disguise.

Sites need not share per-case scores: each sends `score_histograms` (fixed bins, equal in log-odds
over [-10, 10], the end bins open, so that scores that crowd near 0, 1 or one value still fall in
different bins: equal bins of 0.01 over [0, 1] put an uncertain model's scores in one bin); the
server sums them and `histogram_auc` gives the pooled AUC. Pairs of cases in different bins are
ordered exactly as their scores are; a positive-negative pair in the same bin counts one half,
while the exact AUC counts it 0, 1/2 or 1. Hence |histogram AUC - exact AUC| <= one half of the
fraction of positive-negative pairs that share a bin (`HistogramAUC.error_bound`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Bins of the score histograms a site sends instead of per-case scores: width 0.02 in log-odds
#: (0.005 in probability at 0.5, 0.002 at 0.1) over [-LOGIT_SPAN, LOGIT_SPAN]; the end bins are open.
HISTOGRAM_BINS = 1000
LOGIT_SPAN = 10.0


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of one evaluation; `undefined` says why each `None` is None."""

    n_cases: int
    class_counts: tuple[int, ...]  # cases per class index
    accuracy: float | None
    auc: float | None
    balanced_accuracy: float | None
    sensitivity: float | None  # binary: recall of class 1; multi-class: macro recall over classes present
    specificity: (
        float | None
    )  # binary: recall of class 0; multi-class: one-vs-rest, mean over classes present
    undefined: dict[str, str] = field(default_factory=dict)

    def defined(self) -> dict[str, float]:
        """The metrics that have a value (what a metric record or a report table can carry)."""
        names = ("accuracy", "auc", "balanced_accuracy", "sensitivity", "specificity")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}


def _check(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence, n_classes: int | None):
    """Validated (scores [N, K] float, labels [N] int, K); binary `[N]` scores become [N, 2]."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if s.ndim == 1:
        s = np.stack([1.0 - s, s], axis=1)
    if s.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(f"scores must be [N] or [N, K] with N = {len(y)} labels, got shape {s.shape}")
    k = s.shape[1] if n_classes is None else int(n_classes)
    if k < 2 or s.shape[1] != k:
        raise ValueError(f"scores have {s.shape[1]} columns; expected n_classes = {k} >= 2")
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s).all(axis=1))[0])
        raise ValueError(f"score of case {bad} is not finite: {s[bad].tolist()}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k):
        raise ValueError(
            f"labels must be class indices in 0..{k - 1}, got values {np.unique(y).tolist()[:10]}"
        )
    return s, y.astype(np.int64), k


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Exact ROC AUC (Mann-Whitney U, ties count half); None when either class is absent."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata  # SciPy (~1 s) is paid where an exact AUC is computed, not at import

    ranks = rankdata(scores)  # average ranks: a tie contributes one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _single_class_reason(counts: np.ndarray, metric: str) -> str | None:
    present = np.flatnonzero(counts)
    if present.size == 0:
        return f"{metric} undefined: no cases"
    if present.size == 1:
        return f"{metric} undefined: only class {int(present[0])} present ({int(counts[present[0]])} cases)"
    return None


def auc(
    scores: np.ndarray | Sequence, labels: np.ndarray | Sequence, n_classes: int | None = None
) -> tuple[float | None, str | None]:
    """(AUC, None), or (None, reason) when fewer than two classes are present.

    Binary: the AUC of class 1's score. Multi-class: one-vs-rest AUC of each class present, averaged.
    """
    s, y, k = _check(scores, labels, n_classes)
    counts = np.bincount(y, minlength=k)
    reason = _single_class_reason(counts, "AUC")
    if reason:
        return None, reason
    if k == 2:
        return binary_auc(s[:, 1], y == 1), None
    per_class = [binary_auc(s[:, c], y == c) for c in np.flatnonzero(counts)]
    return float(np.mean(per_class)), None


def classification_metrics(
    scores: np.ndarray | Sequence,
    labels: np.ndarray | Sequence,
    n_classes: int | None = None,
    threshold: float = 0.5,
) -> ClassificationMetrics:
    """Every metric at once. Predictions: binary `score of class 1 >= threshold`, else the arg-max."""
    s, y, k = _check(scores, labels, n_classes)
    counts = np.bincount(y, minlength=k)
    undefined: dict[str, str] = {}
    auc_value, reason = auc(s, y, k)
    if reason:
        undefined["auc"] = reason
    if y.size == 0:
        undefined.update({n: "undefined: no cases" for n in ("accuracy", "balanced_accuracy")})
        undefined.update({"sensitivity": "undefined: no cases", "specificity": "undefined: no cases"})
        return ClassificationMetrics(0, tuple(counts.tolist()), None, None, None, None, None, undefined)
    predicted = (s[:, 1] >= threshold).astype(np.int64) if k == 2 else s.argmax(axis=1)
    present = np.flatnonzero(counts)
    recall = {int(c): float(np.mean(predicted[y == c] == c)) for c in present}
    # one-vs-rest specificity of class c: the share of other-class cases not predicted as c
    spec = {int(c): float(np.mean(predicted[y != c] != c)) for c in present if (y != c).any()}
    balanced = sensitivity = specificity = None
    if present.size < 2:
        single = _single_class_reason(counts, "balanced accuracy")
        undefined["balanced_accuracy"] = str(single)
    else:
        balanced = float(np.mean(list(recall.values())))
    if k == 2:
        sensitivity, specificity = recall.get(1), recall.get(0)
        if sensitivity is None:
            undefined["sensitivity"] = "sensitivity undefined: no case of class 1"
        if specificity is None:
            undefined["specificity"] = "specificity undefined: no case of class 0"
    elif present.size < 2:
        undefined["sensitivity"] = str(_single_class_reason(counts, "sensitivity"))
        undefined["specificity"] = str(_single_class_reason(counts, "specificity"))
    else:
        sensitivity, specificity = balanced, float(np.mean(list(spec.values())))
    accuracy = float(np.mean(predicted == y))
    return ClassificationMetrics(
        y.size, tuple(counts.tolist()), accuracy, auc_value, balanced, sensitivity, specificity, undefined
    )


# ---- pooled AUC from score histograms -------------------------------------------------------------------


@dataclass(frozen=True)
class HistogramAUC:
    """A pooled AUC and how far it can be from the exact AUC of the same scores."""

    auc: float | None
    error_bound: float  # |auc - exact| <= error_bound: half the share of pairs that share a bin
    reason: str | None = None


def score_histograms(
    scores: np.ndarray | Sequence,
    labels: np.ndarray | Sequence,
    n_classes: int | None = None,
    bins: int = HISTOGRAM_BINS,
) -> np.ndarray:
    """Counts [K true classes, S scored classes, bins] of scores over [0, 1]; S = 1 for binary.

    Binary histograms hold class 1's score; multi-class ones every class's score (one-vs-rest).
    What a site sends instead of per-case scores: summing sites' arrays pools them exactly.
    Bins are equal in log-odds over [-LOGIT_SPAN, LOGIT_SPAN] (a monotone map, so bin order is score
    order), the end bins open; scores outside [0, 1] are refused.
    """
    s, y, k = _check(scores, labels, n_classes)
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"scores must be probabilities in [0, 1] to be binned, got [{s.min()}, {s.max()}]")
    scored = s[:, 1:2] if k == 2 else s
    with np.errstate(divide="ignore"):
        log_odds = np.log(scored) - np.log1p(-scored)  # -inf at 0, +inf at 1: the end bins
    position = np.floor((log_odds + LOGIT_SPAN) / (2 * LOGIT_SPAN) * bins)
    index = np.clip(np.nan_to_num(position, posinf=bins, neginf=-1), 0, bins - 1).astype(np.int64)
    counts = np.zeros((k, scored.shape[1], bins), np.int64)
    for j in range(scored.shape[1]):
        np.add.at(counts[:, j, :], (y, index[:, j]), 1)
    return counts


def _pair_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC, share of pairs in the same bin) of positive and negative counts per bin."""
    pairs = float(pos.sum()) * float(neg.sum())
    below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    wins = float((pos * below).sum())
    ties = float((pos * neg).sum())
    return (wins + 0.5 * ties) / pairs, ties / pairs


def histogram_auc(histograms: np.ndarray) -> HistogramAUC:
    """Pooled AUC from (summed) `score_histograms` output; macro one-vs-rest when multi-class."""
    h = np.asarray(histograms)
    if h.ndim != 3 or h.shape[0] < 2 or h.shape[1] not in (1, h.shape[0]):
        raise ValueError(f"expected histograms [K, 1 or K, bins] from score_histograms, got shape {h.shape}")
    if (h < 0).any():
        raise ValueError("histogram counts must be non-negative")
    k = h.shape[0]
    counts = h[:, 0, :].sum(axis=1)
    reason = _single_class_reason(counts, "AUC")
    if reason:
        return HistogramAUC(None, 0.0, reason)
    if h.shape[1] == 1:
        value, tie_share = _pair_auc(h[1, 0], h[0, 0])
        return HistogramAUC(value, 0.5 * tie_share)
    values, bounds = [], []
    for c in np.flatnonzero(counts):
        rest = h[np.arange(k) != c, c, :].sum(axis=0)
        value, tie_share = _pair_auc(h[c, c], rest)
        values.append(value)
        bounds.append(0.5 * tie_share)
    return HistogramAUC(float(np.mean(values)), float(np.mean(bounds)))


# ---- bootstrap interval ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AUCInterval:
    """A percentile bootstrap interval of the AUC; `low`/`high` None with a reason when undefined."""

    auc: float | None
    low: float | None
    high: float | None
    level: float
    n_boot: int
    reason: str | None = None


def bootstrap_auc_interval(
    scores: np.ndarray | Sequence,
    labels: np.ndarray | Sequence,
    n_classes: int | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AUCInterval:
    """Percentile interval of the AUC over case resamples, stratified by class (as pROC does).

    Stratified: each resample keeps every class's case count, so no resample loses a class and
    the interval never mixes in undefined AUCs. Deterministic for a seed.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    s, y, k = _check(scores, labels, n_classes)
    value, reason = auc(s, y, k)
    if reason:
        return AUCInterval(None, None, None, level, n_boot, reason)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y == c) for c in range(k)]
    draws = np.empty(n_boot)
    for b in range(n_boot):
        pick = np.concatenate([m[rng.integers(0, m.size, m.size)] for m in members if m.size])
        draws[b] = auc(s[pick], y[pick], k)[0]
    tail = (1.0 - level) / 2
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return AUCInterval(value, float(low), float(high), level, n_boot)
