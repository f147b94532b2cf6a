"""The comparison's pictures: the headline (mean Dice or AUC) over rounds and simulated time, per site, worst site."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedbrats.simulations.figures import save_figure, site_order  # noqa: E402

#: A comparison run (`compare_report.Run`): its label and its summary of the history.
Run = Any


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the defined values (std NaN below two values)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan


def _by_label(runs: list[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for r in runs:
        grouped.setdefault(r.label, []).append(r)
    return grouped


def plot_curves(runs: list[Run], path: Path, target: float | None = None, label: str = "mean Dice") -> Path:
    """The headline (`label`) against rounds and simulated time: mean over seeds, min-max band, target dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (label, mine) in enumerate(_by_label(runs).items()):
        points: dict[int, list[tuple[float, float]]] = {}
        for r in mine:
            for rnd, hours, dice in r.summary["curve"]:
                points.setdefault(rnd, []).append((hours, dice))
        rounds = sorted(points)
        if not rounds:
            continue
        hours = [statistics.fmean(h for h, _ in points[k]) for k in rounds]
        mean = [statistics.fmean(d for _, d in points[k]) for k in rounds]
        low = [min(d for _, d in points[k]) for k in rounds]
        high = [max(d for _, d in points[k]) for k in rounds]
        color = f"C{i % 10}"
        for ax, xs in ((axes[0], rounds), (axes[1], hours)):
            ax.plot(
                xs, mean, marker="o", color=color, label=f"{label} ({len(mine)} seed{'s' * (len(mine) > 1)})"
            )
            ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    top = min(
        1.0,
        1.2 * max((d for r in runs for *_, d in r.summary["curve"] if not math.isnan(d)), default=1) + 0.05,
    )
    what = "Mean Dice (ET, TC, WT; mean over sites)" if label == "mean Dice" else f"{label} (pooled over sites)"
    axes[0].set(title=what, xlabel="round", ylabel=label, ylim=(0, top))
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set(
        title=f"{label} against simulated time", xlabel="simulated hours (FeTS timing model)", ylim=(0, top)
    )
    for ax in axes:
        if target is not None and target <= top:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _site_label(label: str) -> str:
    return "Dice (mean of ET, TC, WT)" if label == "mean Dice" else f"{label} of the site"


def plot_site_bars(runs: list[Run], path: Path, label: str = "mean Dice") -> Path:
    """Final headline per site (Dice: mean over regions), one bar per strategy, error bar = std over seeds."""
    grouped = _by_label(runs)
    sites = sorted({s for r in runs for s in r.summary["site_values"]}, key=site_order)
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(sites) * len(grouped) + 3), 4.5))
    width = 0.8 / max(1, len(grouped))
    for i, (label, mine) in enumerate(grouped.items()):
        stats = [mean_std([r.summary["site_values"].get(s, math.nan) for r in mine]) for s in sites]
        xs = [j + (i - (len(grouped) - 1) / 2) * width for j in range(len(sites))]
        errors = None if len(mine) < 2 else [0.0 if math.isnan(sd) else sd for _, sd in stats]
        ax.bar(xs, [m for m, _ in stats], width, yerr=errors, capsize=3, color=f"C{i % 10}", label=label)
    ax.set_xticks(range(len(sites)), [f"site {s}" for s in sites])
    ax.set(title=f"Final {_site_label(label)} per site (mean over seeds)", ylabel=label, ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    return save_figure(fig, path)


def plot_fairness(runs: list[Run], path: Path, label: str = "mean Dice") -> Path:
    """Spread of the sites' final headline per strategy: a box per strategy, one dot per site and seed."""
    grouped = _by_label(runs)
    values = [
        [d for r in mine for d in r.summary["site_values"].values() if not math.isnan(d)]
        for mine in grouped.values()
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(grouped) + 2), 4.5))
    ax.boxplot([v or [math.nan] for v in values], tick_labels=list(grouped), showfliers=False)
    for i, v in enumerate(values):
        jitter = [(j % 7 - 3) * 0.03 for j in range(len(v))]
        ax.scatter([i + 1 + x for x in jitter], v, s=18, color=f"C{i % 10}", alpha=0.8, zorder=3)
    ax.set(title=f"Fairness: final {label} of every site (and seed)", ylabel=_site_label(label), ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)

