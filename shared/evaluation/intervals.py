"""Means a federation's numbers can carry: case-weighted and site-weighted, with bootstrap 95% intervals.

A case-weighted mean counts every validation case once (a 100-case hospital weighs 100 times a
one-case one); a site-weighted mean counts every hospital once, as FeTS ranks. On a FeTS-shaped
federation the two differ, and a site's own number on 1-4 cases is an anecdote: reports label it
(`few_cases_label`).

The interval resamples the validation cases with replacement (all of them, not site by site), with
a fixed seed, and takes the 2.5th and 97.5th percentiles of each statistic over the resamples; in a
resample, a site none of whose cases was drawn is left out of the site-weighted mean. The sites and
the model are taken as given: the interval says how much the number depends on which cases were
held out, not how it would move at other hospitals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Sites with at most this many validation cases get their count printed beside their metrics.
FEW_CASES = 4
RESAMPLES, LEVEL = 2000, 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval."""

    mean: float
    low: float
    high: float


def few_cases_label(n_cases: int) -> str:
    """ "n=3 cases" for a site scored on 1 to FEW_CASES validation cases, "" otherwise."""
    n = int(n_cases)
    return f"n={n} case{'s' if n != 1 else ''}" if 1 <= n <= FEW_CASES else ""


def case_weighted(site_means: Sequence[float], site_cases: Sequence[int]) -> float:
    """Mean over cases from each site's mean and case count (sites without cases or value left out)."""
    pairs = [(m, n) for m, n in zip(site_means, site_cases, strict=True) if n > 0 and np.isfinite(m)]
    total = sum(n for _, n in pairs)
    return float(sum(m * n for m, n in pairs) / total) if total else float("nan")


def bootstrap_means(
    values: Sequence[float],
    sites: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[Interval, Interval]:
    """(case-weighted, site-weighted) mean of per-case `values` grouped by `sites`, each with its interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) != len(sites) or len(values) == 0:
        raise ValueError(
            f"expected one site per value and at least one case, got {values.shape} and {len(sites)}"
        )
    if not np.isfinite(values).all():
        raise ValueError(
            "per-case values must be finite (empty masks are scored by the convention, never NaN)"
        )
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples={resamples}, level={level}; expected resamples >= 1 and 0 < level < 1")
    names, site_index = np.unique(np.asarray(sites, dtype=str), return_inverse=True)
    k, n = len(names), len(values)

    def site_weighted(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(counts > 0, sums / counts, np.nan), axis=-1)

    full_counts = np.bincount(site_index, minlength=k)
    full_sums = np.bincount(site_index, weights=values, minlength=k)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    flat = (site_index[draws] + k * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=k * resamples).reshape(resamples, k)
    sums = np.bincount(flat, weights=values[draws].ravel(), minlength=k * resamples).reshape(resamples, k)
    tails = [50 * (1 - level), 50 * (1 + level)]
    case_low, case_high = np.percentile(sums.sum(1) / n, tails)
    site_low, site_high = np.percentile(site_weighted(counts, sums), tails)
    return (
        Interval(float(values.mean()), float(case_low), float(case_high)),
        Interval(float(site_weighted(full_counts, full_sums)), float(site_low), float(site_high)),
    )


def interval_rows(
    rows: Sequence[dict],
    columns: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> list[dict]:
    """One row per column of per-case `rows` (each with "site"): both means and intervals, cases, sites."""
    sites = [str(r["site"]) for r in rows]
    out = []
    for column in columns:
        by_case, by_site = bootstrap_means(
            [float(r[column]) for r in rows], sites, resamples=resamples, seed=seed, level=level
        )
        out.append({
            "metric": column,
            "case_weighted": by_case.mean, "case_low": by_case.low, "case_high": by_case.high,
            "site_weighted": by_site.mean, "site_low": by_site.low, "site_high": by_site.high,
            "cases": len(rows), "sites": len(set(sites)), "resamples": resamples, "seed": seed, "level": level,
        })  # fmt: skip
    return out
