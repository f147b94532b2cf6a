"""The report at the end of a simulated run: learning curves, per-site bars, Dice against simulated time, a table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedbrats.server.history import INITIAL_MODEL, read_events, read_history  # noqa: E402
from fedbrats.shared.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from fedbrats.shared.constants import REGIONS  # noqa: E402
from fedbrats.shared.evaluation.intervals import FEW_CASES, case_weighted, few_cases_label  # noqa: E402
from fedbrats.shared.evaluation.surface import HD95_DESCRIPTIONS  # noqa: E402
from fedbrats.simulations.class_report import write_class_report  # noqa: E402
from fedbrats.simulations.figures import elapsed_hours, is_simulated, save_figure, site_order  # noqa: E402
from fedbrats.simulations.final_evaluation import EXTERNAL, final_evaluation_lines, read_final_evaluation  # noqa: E402
from fedbrats.simulations.headline import AUC, headline_name  # noqa: E402
from fedbrats.simulations.run_summary import final_convergence_score  # noqa: E402

__all__ = ["plot_learning_curves", "plot_site_bars", "save_figure", "site_order", "site_region_dice", "write_report"]


COLORS = {"ET": "#d62728", "TC": "#ff7f0e", "WT": "#2ca02c"}


def site_region_dice(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each evaluated site's Dice per region in one history record (dropped sites left out)."""
    return {e["site"]: {r: e.get(f"dice-{r}", math.nan) for r in REGIONS} for e in record.get("evaluate", []) if not e.get("dropped")}


def plot_learning_curves(history: list[dict[str, Any]], path: Path) -> Path:
    evaluated = [r for r in history if r.get("mean_dice")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rounds = [r["round"] for r in evaluated]
    elapsed = elapsed_hours(history)
    hours = [elapsed[r["round"]] for r in evaluated]
    for region in REGIONS:
        values = [r["mean_dice"][region] for r in evaluated]
        axes[0].plot(rounds, values, marker="o", color=COLORS[region], label=f"mean {region}")
        axes[2].plot(hours, values, marker="o", color=COLORS[region], label=f"mean {region}")
    sites = sorted({s for r in evaluated for s in site_region_dice(r)}, key=site_order)
    for site in sites:
        pts = [(r["round"], site_region_dice(r)[site]["WT"]) for r in evaluated if site in site_region_dice(r)]
        axes[1].plot(*zip(*pts, strict=True), marker=".", label=f"site {site}")
    axes[0].set(title="Mean Dice over sites", xlabel="round", ylabel="Dice", ylim=(0, 1))
    axes[1].set(title="WT Dice per site", xlabel="round", ylabel="Dice", ylim=(0, 1))
    clock = ("simulated time", "simulated hours (FeTS model)") if is_simulated(history) else ("wall time", "hours")
    axes[2].set(title=f"Mean Dice against {clock[0]}", xlabel=clock[1], ylabel="Dice", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_site_bars(record: dict[str, Any], path: Path) -> Path:
    per_site = site_region_dice(record)
    sites = sorted(per_site, key=site_order)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sites) + 2), 4))
    width = 0.27
    for i, region in enumerate(REGIONS):
        xs = [j + (i - 1) * width for j in range(len(sites))]
        ax.bar(xs, [per_site[s][region] for s in sites], width, color=COLORS[region], label=region)
    ax.set_xticks(range(len(sites)), [f"site {s}" for s in sites])
    ax.set(title=f"Final Dice per site and region (round {record['round']})", ylabel="Dice", ylim=(0, 1))
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def hd95_definition(config: dict[str, Any]) -> str:
    """The run's HD95 definition as a report names it; runs from before `hd95-definition` existed used MONAI's max."""
    if not config:
        return "HD95 definition not recorded (no run_config.json)"
    name = str(config.get("hd95-definition", "max"))
    return f"HD95 {name}: {HD95_DESCRIPTIONS.get(name, 'unknown definition')}"


def site_participation(history: list[dict[str, Any]]) -> list[str]:
    """Markdown table: per site, the rounds it delivered an update, was dropped or late, and its cases."""
    rows: dict[str, dict[str, Any]] = {}
    for h in history:
        for t in h.get("train", []):
            row = rows.setdefault(t["site"], {"delivered": 0, "dropped": 0, "late": 0, "cases": "-"})
            if not t.get("dropped"):
                row["delivered"] += 1
                row["cases"] = int(t.get("num-examples", 0))
            elif t["dropped"] == "no reply before timeout":
                row["late"] += 1
            else:
                row["dropped"] += 1
    lines = ["## Sites", "", "| site | updates delivered | dropped | late | training cases |", "|---|---|---|---|---|"]
    lines += [f"| {site} | {r['delivered']} | {r['dropped']} | {r['late']} | {r['cases']} |"
              for site, r in sorted(rows.items(), key=lambda kv: site_order(kv[0]))]  # fmt: skip
    return lines + [""]


def write_report(out_dir: Path) -> Path:
    """Write ``report.md`` (with PNGs) and ``summary.json`` from the run history in `out_dir`.

    The run's headline decides the report: AUC (classification, `simulations.class_report`; a
    multitask run's Dice curves go in a section of it) or mean Dice (segmentation, below).
    """
    out_dir = Path(out_dir)
    history = read_history(out_dir / "history.jsonl")
    if not history:
        raise ValueError(f"{out_dir / 'history.jsonl'} holds no completed round")
    evaluated = [r for r in history if r.get("mean_dice")]
    config = json.loads((out_dir / "run_config.json").read_text()) if (out_dir / "run_config.json").is_file() else {}
    if headline_name(history) == AUC:
        dice = plot_learning_curves(history, out_dir / "learning_curves.png") if evaluated else None
        return write_class_report(out_dir, history, config, segmentation=dice)
    final = evaluated[-1] if evaluated else history[-1]
    curves = plot_learning_curves(history, out_dir / "learning_curves.png")
    bars = plot_site_bars(final, out_dir / "site_dice.png") if evaluated else None
    per_site = site_region_dice(final)
    worst = min(per_site.items(), key=lambda kv: sum(kv[1].values())) if per_site else None
    scored = [e for e in final.get("evaluate", []) if not e.get("dropped")]
    val_cases = [int(e.get("num-examples", 0)) for e in scored]
    by_cases = {r: case_weighted([e.get(f"dice-{r}", math.nan) for e in scored], val_cases) for r in REGIONS}
    few = sorted((str(e["site"]) for e, n in zip(scored, val_cases, strict=True) if few_cases_label(n)), key=site_order)
    summary = {
        "task": "segmentation",
        "headline": "mean-dice",
        "rounds": history[-1]["round"],
        "final_mean_dice": final.get("mean_dice", {}),
        "final_case_weighted_dice": by_cases if scored else {},
        "few_case_sites": few,
        "hd95_definition": hd95_definition(config),
        "best_mean_dice": {r: max((h["mean_dice"][r] for h in evaluated), default=math.nan) for r in REGIONS},
        "worst_site": worst[0] if worst else None,
        "worst_site_dice": worst[1] if worst else {},
        "simulated_hours": history[-1]["simulated_seconds"] / 3600 if is_simulated(history) else None,
        "convergence_score": final_convergence_score(history) if is_simulated(history) else None,
        "wall_seconds": sum(h["wall_seconds"] for h in history),
        "bytes_sent": sum(h["bytes_sent"] for h in history),
        "bytes_received": sum(h["bytes_received"] for h in history),
        "dropped": [(h["round"], t["site"], t["dropped"]) for h in history for t in h["train"] if t.get("dropped")],
    }
    atomic_write_json(out_dir / "summary.json", summary)
    lines = [
        f"# FedBraTS run report: {config.get('strategy', '?')}, {summary['rounds']} rounds",
        "",
        f"Data: `{config.get('data-dir', '?')}`, partition `{config.get('partition', '?')}`. "
        f"Model `{config.get('model', '?')}` (width {config.get('model-width', '?')}, depth {config.get('model-depth', '?')}), "
        f"patch {config.get('patch-size', '?')}, {config.get('local-epochs', '?')} local epoch(s) per round.",
        "",
        *[f"Initial model: warm start from `{e.get('path')}` (digest {str(e.get('digest'))[:12]})"
          + (f"; sites train only `trainable = {config['trainable']}`." if config.get("trainable", "*") != "*" else ".")
          + "\n" for e in read_events(out_dir / "history.jsonl") if e.get("event") == INITIAL_MODEL][-1:],
        "Metrics are computed on each site's held-out validation cases, thresholded at 0.5, without post-processing. "
        "Empty truth and empty prediction count as Dice 1 (CaPTk/FeTS convention). "
        f"{hd95_definition(config)}. The mean counts each site once (site-weighted, as FeTS ranks); the "
        "case-weighted mean counts each validation case once.",
        "",
        "## Final Dice per site",
        "",
        "| site | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | " + " | ".join(f"HD95 {r} (mm)" for r in REGIONS) + " | val cases |",
        "|---" * (2 + 2 * len(REGIONS)) + "|",
    ]
    for e in sorted((e for e in final["evaluate"] if not e.get("dropped")), key=lambda e: site_order(e["site"])):
        label = few_cases_label(int(e.get("num-examples", 0)))
        lines.append(
            f"| {e['site']}{f' ({label})' if label else ''} | "
            + " | ".join(f"{e.get(f'dice-{r}', math.nan):.3f}" for r in REGIONS) + " | "
            + " | ".join(f"{e.get(f'hd95-{r}', math.nan):.1f}" for r in REGIONS) + f" | {int(e.get('num-examples', 0))} |"
        )
    md = summary["final_mean_dice"]
    lines += [
        "| **mean (site-weighted)** | " + " | ".join(f"**{md.get(r, math.nan):.3f}**" for r in REGIONS) + " |"
        + " |" * (len(REGIONS) + 1),
        "| **mean (case-weighted)** | " + " | ".join(f"**{by_cases[r]:.3f}**" for r in REGIONS) + " |"
        + " |" * len(REGIONS) + f" {sum(val_cases)} |",
        "",
        *([f"Sites marked n=K are scored on 1-{FEW_CASES} validation cases ({', '.join(few)}): their own numbers "
           "are anecdotes, not estimates; the means above carry them.", ""] if few else []),
        f"Worst site: {summary['worst_site']}. "
        + (f"Simulated time: {summary['simulated_hours']:.2f} h (FeTS timing model; transfers priced by the bytes "
           f"moved), convergence score {summary['convergence_score']:.3f} (FeTS: area under best mean Dice over "
           "one simulated week). " if is_simulated(history) else "")
        + f"Wall clock: {summary['wall_seconds']:.0f} s. Sent {summary['bytes_sent'] / 1e6:.1f} MB, "
        f"received {summary['bytes_received'] / 1e6:.1f} MB.",
        "",
        "## Learning curves",
        "",
        f"![learning curves]({curves.name})",
        "",
    ]
    if bars:
        lines += ["## Final Dice per site", "", f"![per-site Dice]({bars.name})", ""]
    lines += final_evaluation_lines(read_final_evaluation(out_dir))
    lines += final_evaluation_lines(read_final_evaluation(out_dir, EXTERNAL))
    lines += site_participation(history)
    if summary["dropped"]:
        lines += ["## Dropped updates", ""] + [f"- round {r}, site {s}: {why}" for r, s, why in summary["dropped"]] + [""]
    lines += ["## Rounds", "", "| round | status | delivered | mean Dice ET | TC | WT | wall s | simulated h |", "|---|---|---|---|---|---|---|---|"]
    for h in history:
        d = h.get("mean_dice") or {}
        delivered = sum(1 for t in h["train"] if not t.get("dropped"))
        lines.append(
            f"| {h['round']} | {h['status']} | {delivered}/{h['selected']} | "
            + " | ".join(f"{d[r]:.3f}" if r in d else "-" for r in REGIONS)
            + f" | {h['wall_seconds']:.1f} | "
            + (f"{h['simulated_seconds'] / 3600:.2f} |" if "simulated_seconds" in h else "- |")
        )
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
