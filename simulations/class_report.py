"""The run report of a classification run: AUC over rounds (pooled and per site), ROC curves per site.

Everything comes from the history: each site's metrics (`auc`, `balanced-accuracy`, ...) and score
histograms, and the round's `headline` (the AUC pooled from the summed histograms). No per-case
score ever left a site, so the ROC curves are drawn from the histograms (`simulations.roc`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedbrats.shared.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from fedbrats.simulations.figures import elapsed_hours, is_simulated, save_figure, site_order  # noqa: E402
from fedbrats.simulations.final_evaluation import EXTERNAL, final_evaluation_lines, read_final_evaluation  # noqa: E402
from fedbrats.simulations.headline import AUC, evaluated_rounds, evaluated_sites, headline_value  # noqa: E402
from fedbrats.simulations.roc import pooled_histograms, roc_curves  # noqa: E402
from fedbrats.simulations.run_summary import final_convergence_score  # noqa: E402

#: Site metrics of a classification evaluate reply, in table order (MetricRecord keys).
SITE_METRICS = ("auc", "balanced-accuracy", "sensitivity", "specificity", "accuracy")


def _value(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    return math.nan if value is None else float(value)


def _cell(value: float, digits: int = 3) -> str:
    return "undefined" if math.isnan(value) else f"{value:.{digits}f}"


def site_metrics(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each evaluated site's classification metrics in one round (NaN where undefined)."""
    return {
        str(e["site"]): {**{k: _value(e, k) for k in SITE_METRICS}, "num-examples": _value(e, "num-examples")}
        for e in evaluated_sites(record)
    }


def plot_auc_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Pooled AUC and each site's own AUC against rounds; pooled AUC against simulated time."""
    evaluated = evaluated_rounds(history, AUC)
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(12, 4))
    rounds = [r["round"] for r in evaluated]
    pooled = [headline_value(r) for r in evaluated]
    by_round.plot(rounds, pooled, marker="o", color="black", linewidth=2, label="pooled (summed histograms)")
    hours = elapsed_hours(history)  # simulated time, or a deployed run's wall time
    by_time.plot([hours[r["round"]] for r in evaluated], pooled, marker="o", color="black",
                 label="pooled")  # fmt: skip
    sites = sorted({s for r in evaluated for s in site_metrics(r)}, key=site_order)
    for site in sites:
        points = [(r["round"], site_metrics(r)[site]["auc"]) for r in evaluated if site in site_metrics(r)]
        if all(math.isnan(v) for _, v in points):
            continue  # a site holding one class has no AUC of its own in any round
        by_round.plot(*zip(*points, strict=True), marker=".", label=f"site {site}")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.set(title="AUC over rounds", xlabel="round", ylabel="AUC", ylim=(0, 1))
    by_time.set(title="Pooled AUC against time", xlabel="hours (simulated FeTS model, or wall clock when deployed)", ylabel="AUC",
                ylim=(0, 1))  # fmt: skip
    for ax in (by_round, by_time):
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_roc_curves(record: dict[str, Any], path: Path) -> Path | None:
    """One panel per site (and one pooled) with the ROC curve(s) of the round's score histograms.

    None when no site sent histograms (e.g. under DP with suppressed evaluation metrics).
    """
    entries = sorted((e for e in evaluated_sites(record) if e.get("histograms") is not None),
                     key=lambda e: site_order(str(e["site"])))  # fmt: skip
    pooled = pooled_histograms(entries)
    if pooled is None:
        return None
    panels = [(f"site {e['site']}", e["histograms"]) for e in entries] + [("pooled over sites", pooled)]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, histograms) in zip(axes.flat, panels, strict=False):
        curves = roc_curves(histograms)
        for curve in curves:
            name = "" if len(curves) == 1 and curve.positive == 1 else f"class {curve.positive} vs rest, "
            ax.plot(curve.fpr, curve.tpr, drawstyle="default", label=f"{name}AUC {curve.auc:.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        if not curves:
            ax.text(0.5, 0.5, "one class only:\nno ROC curve", ha="center", va="center")
        ax.set(title=title, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        ax.set_aspect("equal")
        if curves:
            ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"ROC curves per site, round {record['round']} (from score histograms)")
    return save_figure(fig, path)


def classification_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json of a classification run: final and best pooled AUC, each site's final metrics, costs."""
    evaluated = evaluated_rounds(history, AUC)
    final = evaluated[-1] if evaluated else history[-1]
    per_site = site_metrics(final) if evaluated else {}
    defined = {s: m["auc"] for s, m in per_site.items() if not math.isnan(m["auc"])}
    worst = min(defined.items(), key=lambda kv: kv[1]) if defined else (None, math.nan)
    pooled = [(headline_value(r), r["round"]) for r in evaluated if not math.isnan(headline_value(r))]
    best = max(pooled, default=(math.nan, None))
    balanced = [m["balanced-accuracy"] for m in per_site.values() if not math.isnan(m["balanced-accuracy"])]
    bound = final.get("pooled_auc_bound")
    return {
        "task": "classification",
        "headline": AUC,
        "rounds": history[-1]["round"],
        "final_round": final["round"] if evaluated else None,
        "final_auc": headline_value(final) if evaluated else math.nan,
        "final_auc_bound": math.nan if bound is None else float(bound),
        "best_auc": best[0],
        "best_round": best[1],
        "sites": per_site,
        "undefined_sites": sorted((s for s in per_site if s not in defined), key=site_order),
        "worst_site": worst[0],
        "worst_site_auc": worst[1],
        "mean_balanced_accuracy": sum(balanced) / len(balanced) if balanced else math.nan,
        "simulated_hours": history[-1]["simulated_seconds"] / 3600 if is_simulated(history) else None,
        "convergence_score": final_convergence_score(history) if is_simulated(history) else None,
        "wall_seconds": sum(h["wall_seconds"] for h in history),
        "bytes_sent": sum(h["bytes_sent"] for h in history),
        "bytes_received": sum(h["bytes_received"] for h in history),
        "dropped": [(h["round"], t["site"], t["dropped"]) for h in history for t in h["train"] if t.get("dropped")],
    }  # fmt: skip


def _header(config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    label = config.get("label-column") or "the dataset's default label"
    return [
        f"# FedBraTS run report: {config.get('strategy', '?')}, {summary['rounds']} rounds, classification",
        "",
        f"Data: `{config.get('data-dir', '?')}`, partition `{config.get('partition', '?')}`, label `{label}`. "
        f"Model `{config.get('model', '?')}` (width {config.get('model-width', '?')}, depth "
        f"{config.get('model-depth', '?')}), input {config.get('class-input-size', '?')} voxels a side, "
        f"{config.get('local-epochs', '?')} local epoch(s) per round.",
        "",
        "Metrics are computed on each site's held-out validation cases. The pooled AUC comes from the sum of "
        "the sites' score histograms (no per-case score leaves a site); it is within the stated bound of the "
        "exact AUC. A site holding one class only has no AUC of its own (undefined); its cases still count in "
        "the pooled AUC. Binary metrics treat class index 1 as positive (threshold 0.5); means are over sites, "
        "unweighted.",
        "",
    ]


def write_class_report(
    out_dir: Path, history: list[dict[str, Any]], config: dict[str, Any], *, segmentation: Path | None = None
) -> Path:
    """Write report.md (with PNGs) and summary.json of a classification run; `segmentation`: a multitask
    run's Dice learning curves, shown in a section of their own."""
    out_dir = Path(out_dir)
    summary = classification_summary(history)
    atomic_write_json(out_dir / "summary.json", summary)
    curves = plot_auc_curves(history, out_dir / "auc_curves.png")
    evaluated = evaluated_rounds(history, AUC)
    roc = plot_roc_curves(evaluated[-1], out_dir / "roc_curves.png") if evaluated else None
    lines = _header(config, summary)
    lines += [f"## Final metrics per site (round {summary['final_round'] or '-'})", "",
              "| site | AUC | balanced accuracy | sensitivity | specificity | accuracy | val cases |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for site in sorted(summary["sites"], key=site_order):
        m = summary["sites"][site]
        cases = "-" if math.isnan(m["num-examples"]) else str(int(m["num-examples"]))
        lines.append(f"| {site} | " + " | ".join(_cell(m[k]) for k in SITE_METRICS) + f" | {cases} |")
    bound = summary["final_auc_bound"]
    within = "" if math.isnan(bound) else f" (± {bound:.3f})"
    lines += [
        f"| **pooled** | **{_cell(summary['final_auc'])}**{within} | "
        f"{_cell(summary['mean_balanced_accuracy'])} (mean) | | | | |",
        "",
        f"Best pooled AUC {_cell(summary['best_auc'])} (round {summary['best_round'] or '-'}). "
        + (f"Worst site: {summary['worst_site']} (AUC {summary['worst_site_auc']:.3f}). "
           if summary["worst_site"] is not None else "")
        + (f"AUC undefined at site(s) {', '.join(summary['undefined_sites'])}. " if summary["undefined_sites"] else "")
        + (f"Simulated time: {summary['simulated_hours']:.2f} h (FeTS timing model), convergence score "
           f"{summary['convergence_score']:.3f} (area under best pooled AUC over one simulated week). "
           if summary["simulated_hours"] is not None else "")
        + f"Wall clock: {summary['wall_seconds']:.0f} s. Sent {summary['bytes_sent'] / 1e6:.1f} MB, "
        f"received {summary['bytes_received'] / 1e6:.1f} MB.",
        "",
        "## AUC over rounds", "", f"![AUC over rounds]({curves.name})", "",
        *final_evaluation_lines(read_final_evaluation(out_dir)),
        *final_evaluation_lines(read_final_evaluation(out_dir, EXTERNAL)),
    ]  # fmt: skip
    if roc is not None:
        lines += ["## ROC curves per site", "", f"![ROC curves per site]({roc.name})", ""]
    else:
        lines += ["## ROC curves per site", "", "No site sent score histograms (evaluation metrics suppressed?).", ""]
    if segmentation is not None:
        lines += ["## Segmentation (multitask)", "", f"![Dice learning curves]({segmentation.name})", ""]
    if summary["dropped"]:
        lines += ["## Dropped updates", ""] + [f"- round {r}, site {s}: {why}" for r, s, why in summary["dropped"]]
        lines.append("")
    lines += ["## Rounds", "", "| round | status | sites | pooled AUC | wall s | simulated h |", "|---|---|---|---|---|---|"]
    for h in history:
        value = headline_value(h)
        lines.append(
            f"| {h['round']} | {h['status']} | {h['selected']}/{h['available']} | "
            f"{'-' if math.isnan(value) else f'{value:.3f}'} | {h['wall_seconds']:.1f} | "
            + (f"{h['simulated_seconds'] / 3600:.2f} |" if "simulated_seconds" in h else "- |")
        )
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
