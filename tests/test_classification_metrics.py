"""Classification metrics against hand-worked examples and brute-force pair counting (no scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest

from fedbrats.shared.evaluation.classification import (
    HISTOGRAM_BINS,
    auc,
    binary_auc,
    bootstrap_auc_interval,
    classification_metrics,
    histogram_auc,
    score_histograms,
)

# Five cases worked out by hand. Positives (class 1) score 0.35, 0.8, 0.4; negatives 0.1, 0.4.
# Pairs: 0.35 beats 0.1, loses to 0.4; 0.8 beats both; 0.4 beats 0.1 and ties 0.4 (one half).
# AUC = (1 + 2 + 1.5) / 6 = 0.75. At threshold 0.5 only 0.8 is called positive: sensitivity 1/3,
# specificity 2/2, balanced accuracy (1/3 + 1) / 2 = 2/3, accuracy 3/5.
SCORES = [0.1, 0.4, 0.35, 0.8, 0.4]
LABELS = [0, 0, 1, 1, 1]

# Three classes, five cases; rows are softmax outputs.
MULTI = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3], [0.5, 0.3, 0.2]])
MULTI_LABELS = [0, 1, 2, 2, 1]
# One-vs-rest by hand: class 0: 0.7 beats 0.2, 0.1, 0.3, 0.5 -> 1. Class 1: positives 0.5, 0.3 vs
# negatives 0.2, 0.3, 0.4: 3 + (1 + 0.5) = 4.5 / 6 = 0.75. Class 2: positives 0.6, 0.3 vs 0.1, 0.3,
# 0.2: 3 + 2.5 = 5.5 / 6 = 11/12. Macro: (1 + 3/4 + 11/12) / 3 = 8/9.
# Arg-max predictions 0, 1, 2, 1, 0: recalls 1, 1/2, 1/2 -> balanced 2/3; one-vs-rest specificity:
# class 0 3/4 (case 5 called 0), class 1 2/3 (case 4 called 1), class 2 3/3 -> mean 29/36.


def brute_force_auc(scores, positive) -> float:
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    total = 0.0
    for p in scores[positive]:
        for n in scores[~positive]:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (positive.sum() * (~positive).sum())


def test_binary_hand_example():
    value, reason = auc(SCORES, LABELS)
    assert value == pytest.approx(0.75) and reason is None
    m = classification_metrics(SCORES, LABELS)
    assert m.n_cases == 5 and m.class_counts == (2, 3)
    assert m.auc == pytest.approx(0.75)
    assert m.sensitivity == pytest.approx(1 / 3) and m.specificity == pytest.approx(1.0)
    assert m.balanced_accuracy == pytest.approx(2 / 3) and m.accuracy == pytest.approx(0.6)
    assert m.undefined == {}
    assert set(m.defined()) == {"accuracy", "auc", "balanced_accuracy", "sensitivity", "specificity"}
    # [N, 2] softmax output means the same as the class-1 score alone
    two_columns = np.stack([1 - np.array(SCORES), SCORES], axis=1)
    assert classification_metrics(two_columns, LABELS) == m
    assert classification_metrics(SCORES, LABELS, threshold=0.3).sensitivity == pytest.approx(1.0)


def test_multiclass_hand_example():
    value, _ = auc(MULTI, MULTI_LABELS)
    assert value == pytest.approx(8 / 9)
    m = classification_metrics(MULTI, MULTI_LABELS)
    assert m.class_counts == (1, 2, 2) and m.accuracy == pytest.approx(3 / 5)
    assert m.balanced_accuracy == pytest.approx(2 / 3) and m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(29 / 36)


def test_auc_matches_brute_force_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for n in (7, 40, 200):
        scores = np.round(rng.random(n), 1)  # many ties
        labels = (rng.random(n) < 0.4).astype(int)
        labels[:2] = [0, 1]
        assert auc(scores, labels)[0] == pytest.approx(brute_force_auc(scores, labels == 1), abs=1e-12)
    k = 4
    probs = rng.dirichlet(np.ones(k), 60).round(2)
    labels = rng.integers(0, k, 60)
    expected = np.mean([brute_force_auc(probs[:, c], labels == c) for c in range(k)])
    assert auc(probs, labels)[0] == pytest.approx(expected, abs=1e-12)


def test_single_class_is_undefined_with_a_reason_never_zero_or_one():
    value, reason = auc([0.2, 0.9, 0.4], [1, 1, 1])
    assert value is None and "only class 1 present (3 cases)" in reason
    m = classification_metrics([0.2, 0.9, 0.4], [1, 1, 1])
    assert m.auc is None and m.balanced_accuracy is None and m.specificity is None
    assert m.sensitivity == pytest.approx(1 / 3) and m.accuracy == pytest.approx(
        1 / 3
    )  # these exist (0.9 only)
    assert set(m.undefined) == {"auc", "balanced_accuracy", "specificity"}
    assert "no case of class 0" in m.undefined["specificity"]
    assert "auc" not in m.defined() and "sensitivity" in m.defined()
    multi = classification_metrics(MULTI[:1], [0], n_classes=3)
    assert multi.auc is None and multi.sensitivity is None and multi.specificity is None
    empty = classification_metrics(np.zeros((0, 3)), np.zeros(0, int), n_classes=3)
    assert empty.auc is None and empty.accuracy is None and "no cases" in empty.undefined["auc"]
    assert binary_auc(np.array([0.5]), np.array([True])) is None


def test_multiclass_with_an_absent_class_averages_over_the_present_ones():
    probs, labels = MULTI[[0, 2, 3]], [0, 2, 2]  # no class 1
    value, _ = auc(probs, labels)
    # class 0: 0.7 vs 0.1, 0.3 -> 1; class 2: 0.6, 0.3 vs 0.1 -> 1
    assert value == pytest.approx(1.0)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="not finite"):
        auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match=r"class indices in 0\.\.1"):
        auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="N = 3 labels"):
        auc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="expected n_classes = 4"):
        auc(MULTI, MULTI_LABELS, n_classes=4)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        score_histograms([0.1, 1.2], [0, 1])


# ---- histograms ----------------------------------------------------------------------------------------------


def test_histogram_auc_hand_example_and_bound():
    h = score_histograms(SCORES, LABELS)
    assert h.shape == (2, 1, HISTOGRAM_BINS) and h.sum() == 5
    assert (
        # bins of 0.02 in log-odds from -10: logit(0.1) = -2.197 -> bin 390, logit(0.4) = -0.405 -> 479
        h[0, 0, 390] == 1 and h[0, 0, 479] == 1 and h[1, 0, 469] == 1 and h[1, 0, 479] == 1 and h[1, 0, 569] == 1
    )
    pooled = histogram_auc(h)
    # the only pair sharing a bin is 0.4 vs 0.4, a tie in the exact AUC too: equal, bound 1/2 * 1/6
    assert pooled.auc == pytest.approx(0.75) and pooled.error_bound == pytest.approx(1 / 12)
    # two bins [0, .5) and [.5, 1]: 0.8 beats both negatives (2); the other 4 pairs share bin 0 (2 x 1/2)
    coarse = histogram_auc(score_histograms(SCORES, LABELS, bins=2))
    assert coarse.auc == pytest.approx(4 / 6) and coarse.error_bound == pytest.approx(0.5 * 4 / 6)
    assert abs(coarse.auc - 0.75) <= coarse.error_bound


def test_crowded_scores_of_an_uncertain_model_keep_their_order():
    """An undertrained classifier's scores all within 0.11-0.16: equal bins of 0.01 over [0, 1] held them
    in 6 bins and the pooled AUC read about 0.5; log-odds bins keep the pooled AUC near the exact one."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 30)
    scores = 0.11 + 0.05 * np.clip(0.4 + 0.3 * labels + 0.2 * rng.standard_normal(60), 0, 1)
    exact = brute_force_auc(scores, labels == 1)
    pooled = histogram_auc(score_histograms(scores, labels))
    assert exact > 0.8 and abs(pooled.auc - exact) <= pooled.error_bound + 1e-12 and pooled.error_bound < 0.02
    at_01 = histogram_auc(score_histograms(scores, labels, bins=20))  # coarse bins: the saturation is back
    assert at_01.error_bound > 0.1


def test_scores_of_exactly_0_and_1_fall_in_the_open_end_bins():
    h = score_histograms([0.0, 1e-9, 1.0, 1 - 1e-9], [0, 0, 1, 1])
    assert h[0, 0, 0] == 2 and h[1, 0, -1] == 2


def test_histogram_bound_is_reached():
    """One bin, perfectly separated scores: exact AUC 1, histogram 1/2, bound 1/2."""
    scores, labels = [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]
    one_bin = histogram_auc(score_histograms(scores, labels, bins=1))
    assert one_bin.auc == 0.5 and one_bin.error_bound == 0.5 and auc(scores, labels)[0] == 1.0


def test_summed_site_histograms_pool_exactly_and_stay_within_the_bound():
    rng = np.random.default_rng(1)
    sites = []
    for n in (5, 30, 120):
        labels = (rng.random(n) < 0.5).astype(int)
        scores = np.clip(0.5 + 0.2 * (labels - 0.5) + 0.25 * rng.standard_normal(n), 0, 1)
        sites.append((scores, labels))
    pooled_scores = np.concatenate([s for s, _ in sites])
    pooled_labels = np.concatenate([y for _, y in sites])
    summed = sum(score_histograms(s, y) for s, y in sites)
    assert np.array_equal(summed, score_histograms(pooled_scores, pooled_labels))
    for bins, bound in ((HISTOGRAM_BINS, 0.005), (100, 0.05)):
        h = histogram_auc(sum(score_histograms(s, y, bins=bins) for s, y in sites))
        exact = brute_force_auc(pooled_scores, pooled_labels == 1)
        assert abs(h.auc - exact) <= h.error_bound + 1e-12
        assert h.error_bound < bound
    # multi-class: macro one-vs-rest from [K, K, bins] histograms
    labels = rng.integers(0, 3, 150)
    probs = rng.dirichlet(np.ones(3), 150)
    probs[np.arange(150), labels] += 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    hm = histogram_auc(score_histograms(probs, labels))
    assert score_histograms(probs, labels).shape == (3, 3, HISTOGRAM_BINS)
    assert abs(hm.auc - auc(probs, labels)[0]) <= hm.error_bound + 1e-12


def test_histogram_of_a_single_class_is_undefined():
    result = histogram_auc(score_histograms([0.3, 0.6], [0, 0]))
    assert result.auc is None and "only class 0" in result.reason
    with pytest.raises(ValueError, match="expected histograms"):
        histogram_auc(np.zeros((2, 100)))


# ---- bootstrap ------------------------------------------------------------------------------------------------------


def _sample(n: int, rng: np.random.Generator):
    labels = (np.arange(n) % 2).astype(int)
    scores = np.clip(0.5 + 0.15 * (labels - 0.5) + 0.2 * rng.standard_normal(n), 0, 1)
    return scores, labels


def test_bootstrap_interval_is_seeded_brackets_the_auc_and_narrows_with_more_cases():
    rng = np.random.default_rng(2)
    scores, labels = _sample(40, rng)
    a = bootstrap_auc_interval(scores, labels, n_boot=300, seed=7)
    b = bootstrap_auc_interval(scores, labels, n_boot=300, seed=7)
    c = bootstrap_auc_interval(scores, labels, n_boot=300, seed=8)
    assert a == b and (a.low, a.high) != (c.low, c.high)
    assert a.auc == auc(scores, labels)[0] and a.low < a.auc < a.high
    assert a.level == 0.95 and a.n_boot == 300 and a.reason is None
    big = bootstrap_auc_interval(*_sample(800, rng), n_boot=300, seed=7)
    assert big.high - big.low < 0.5 * (a.high - a.low)  # width ~ 1/sqrt(n)
    perfect = bootstrap_auc_interval([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=50)
    assert (perfect.low, perfect.high) == (1.0, 1.0)


def test_bootstrap_single_class_and_bad_arguments():
    undefined = bootstrap_auc_interval([0.1, 0.2], [1, 1])
    assert undefined.auc is None and undefined.low is None and "only class 1" in undefined.reason
    with pytest.raises(ValueError, match="level"):
        bootstrap_auc_interval([0.1, 0.9], [0, 1], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_auc_interval([0.1, 0.9], [0, 1], n_boot=0)
