"""The comparison report: strategies side by side, aggregated over seeds, from the run folders alone.

Everything here is a pure function of ``OUT/runs/<strategy>-seed<k>/history.jsonl`` (plus
``run_config.json`` and ``OUT/comparison_config.json`` when present), so a report can be rebuilt
after the fact, or tested, without Flower. Spread over seeds is the sample standard deviation.
Strategies are ranked by the runs' headline (`simulations.headline`): mean Dice for segmentation,
pooled AUC for classification; the per-run numbers come from `simulations.run_summary`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbrats.server.history import read_history
from fedbrats.shared.atomic import atomic_write_text
from fedbrats.shared.constants import REGIONS
from fedbrats.shared.evaluation.intervals import FEW_CASES
from fedbrats.simulations.compare_figures import mean_std, plot_curves, plot_fairness, plot_site_bars
from fedbrats.simulations.headline import AUC, LABELS, MEAN_DICE
from fedbrats.simulations.run_summary import (
    ATTACK_COUNTS,
    METRICS,
    ONE_WEEK,
    RANKED_BY,
    TARGET_REGIONS,
    WORST_SITE,
    convergence_scores,
    region_value,
    summarise_run,
)

__all__ = [
    "ONE_WEEK", "TARGET_REGIONS", "aggregate", "attack_of", "attack_settings", "collect_runs", "convergence_scores", "mean_std", "region_value",
    "summarise_run", "summarise_runs", "table_columns", "write_comparison",
]  # fmt: skip

#: Attacks whose strength attack-scale does not set (client.attack.DATA_ATTACKS).
UNSCALED = ("labelflip",)
RUN_DIR = re.compile(r"^(?P<label>.+)-seed(?P<seed>\d+)$")


@dataclass
class Run:
    label: str
    seed: int
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # the code of each start (a resumed run has several)

    @property
    def planned_rounds(self) -> int:
        return int(self.config.get("rounds", self.summary.get("rounds_done", 0)))

    @property
    def complete(self) -> bool:
        return self.summary.get("rounds_done", 0) >= self.planned_rounds > 0


def run_commits(folder: Path) -> list[str]:
    """The FedBraTS commit of each start of a run, from its sources.jsonl (written by `simulate`)."""
    path = Path(folder) / "sources.jsonl"
    commits = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            commits.append(str(json.loads(line)["versions"].get("fedbrats-commit", "?")))
        except (ValueError, KeyError, AttributeError):  # a torn last line of a killed start
            continue
    return commits


def read_settings(out: Path) -> dict[str, Any]:
    path = Path(out) / "comparison_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def settings_target(settings: dict[str, Any]) -> float | None:
    """The target a comparison was run with (`target`, or `target_dice` of comparisons before headlines)."""
    value = settings.get("target", settings.get("target_dice"))
    return None if value is None else float(value)


def attack_of(config: dict[str, Any]) -> str:
    """The simulated attack a run was configured with ("none" for none, and for runs from before attacks)."""
    return str(config.get("attack") or "none")


def attack_settings(runs: list[Run]) -> list[str]:
    """Each distinct attack setting of the runs, e.g. "`labelflip` by site(s) 3 (attack-scale 0: its default)"."""
    settings = []
    for r in runs:
        if attack_of(r.config) == "none":
            continue
        scale = float(r.config.get("attack-scale", 0) or 0)
        strength = "" if attack_of(r.config) in UNSCALED else f" (attack-scale {scale:g}{': its default' if scale == 0 else ''})"
        settings.append(f"`{attack_of(r.config)}` by site(s) {r.config.get('attack-sites') or '?'}{strength}")
    return list(dict.fromkeys(settings))


def collect_runs(
    out: Path, *, target: float | None = None, target_dice: float | None = None, target_region: str | None = None
) -> list[Run]:
    """Every run folder under OUT/runs with at least one recorded round, in the comparison's order.

    Every run must have the same headline (one task per comparison); a mix is an error naming a run of each.
    """
    out = Path(out)
    settings = read_settings(out)
    if target is None and target_dice is None:
        target = settings_target(settings)
    target_region = settings.get("target_region", "mean") if target_region is None else target_region
    runs = []
    for folder in sorted((out / "runs").glob("*-seed*")):
        match = RUN_DIR.match(folder.name)
        history = read_history(folder / "history.jsonl")
        if not match or not folder.is_dir() or not history:
            continue
        config_path = folder / "run_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        run = Run(match["label"], int(match["seed"]), folder, config, commits=run_commits(folder))
        try:
            run.summary = summarise_run(history, target=target, target_dice=target_dice, target_region=target_region)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        runs.append(run)
    headlines = {r.summary["headline"]: r.path.name for r in runs}
    if len(headlines) > 1:
        raise ValueError(
            "runs of different tasks cannot be ranked together: "
            + ", ".join(f"{folder} has headline {name}" for name, folder in headlines.items())
        )
    order = {label: i for i, label in enumerate(s["label"] for s in settings.get("strategies", []))}
    return sorted(runs, key=lambda r: (order.get(r.label, len(order)), r.label, r.seed))


def aggregate(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per strategy: every metric as mean and std over its seeds, ranked by the headline.

    Rank 1 has the highest final headline (mean over seeds; a strategy without one ranks last);
    rows come in rank order, ties in the comparison's order.
    """
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        mine = [r for r in runs if r.label == label]
        config = mine[0].config
        name = mine[0].summary["headline"]
        params = {
            k.removeprefix("strategy-"): v for k, v in sorted(config.items()) if k.startswith("strategy-")
        }
        row: dict[str, Any] = {
            "strategy": label,
            "name": config.get("strategy", label),
            "params": " ".join(f"{k}={v:g}" for k, v in params.items()),
            "attack": ",".join(dict.fromkeys(attack_of(r.config) for r in mine)),
            **{key: sum(int(r.summary.get(key, 0)) for r in mine) for key in ATTACK_COUNTS},
            "headline": name,
            "target": mine[0].summary["target"],
            "seeds": ",".join(str(r.seed) for r in mine),
            "runs_complete": f"{sum(r.complete for r in mine)}/{len(mine)}",
            "rounds": max(r.planned_rounds for r in mine),
            "target_reached": f"{sum(not math.isnan(r.summary['rounds_to_target']) for r in mine)}/{len(mine)}",
            "worst_site": Counter(r.summary["worst_site"] for r in mine).most_common(1)[0][0],
        }
        for metric in METRICS[name]:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([r.summary[metric] for r in mine])
        rows.append(row)

    def score(row: dict[str, Any]) -> float:
        value = row[f"{RANKED_BY[row['headline']]}_mean"]
        return -math.inf if math.isnan(value) else value

    ranked = sorted(rows, key=score, reverse=True)  # stable: ties keep the comparison's order
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return ranked


def summarise_runs(
    out: Path, *, target: float | None = None, target_dice: float | None = None, target_region: str | None = None
) -> list[dict[str, Any]]:
    """The comparison table (one row per strategy, best headline first) from the run folders under OUT/runs."""
    return aggregate(collect_runs(out, target=target, target_dice=target_dice, target_region=target_region))


# --- tables and the report --------------------------------------------------------------------
def fmt(row: dict[str, Any], metric: str, digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' over seeds ('mean' alone for one seed, '-' when undefined)."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if math.isnan(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


def _target(row: dict[str, Any], metric: str, digits: int) -> str:
    if row["target_reached"].startswith("0/"):
        return "not reached"
    return f"{fmt(row, metric, digits)} ({row['target_reached']} seeds)"


def _worst(row: dict[str, Any]) -> str:
    metric = WORST_SITE[row["headline"]]
    return "-" if row["worst_site"] is None else f"{fmt(row, metric)} (site {row['worst_site']})"


def headline_of(rows: list[dict[str, Any]]) -> str:
    """The headline of a comparison's rows (mean Dice for rows of comparisons before headlines)."""
    return rows[0].get("headline", MEAN_DICE) if rows else MEAN_DICE


def table_columns(rows: list[dict[str, Any]]) -> tuple[list, list]:
    """(header, cell function) pairs for the accuracy table and the convergence-and-cost table."""
    name = ("strategy", lambda r: r["strategy"] + (f" ({r['params']})" if r["params"] else ""))
    accuracy = [("rank", lambda r: str(r["rank"])), name, ("complete runs", lambda r: r["runs_complete"])]
    if headline_of(rows) == AUC:
        accuracy += [
            ("final AUC (pooled)", lambda r: fmt(r, "final_auc")),
            ("best AUC (pooled)", lambda r: fmt(r, "best_auc")),
            ("worst site AUC (final)", _worst),
            ("balanced accuracy", lambda r: fmt(r, "balanced_accuracy")),
            ("sensitivity", lambda r: fmt(r, "sensitivity")),
            ("specificity", lambda r: fmt(r, "specificity")),
        ]
    else:
        accuracy += [(f"final {g}", lambda r, g=g: fmt(r, f"final_dice_{g}")) for g in (*REGIONS, "mean")]
        accuracy.append(("final mean, case-weighted", lambda r: fmt(r, "final_case_dice_mean")))
        accuracy += [(f"best {g}", lambda r, g=g: fmt(r, f"best_dice_{g}")) for g in (*REGIONS, "mean")]
        accuracy.append(("worst site (final)", _worst))
    cost = [
        name,
        ("rounds to target", lambda r: _target(r, "rounds_to_target", 1)),
        ("sim. hours to target", lambda r: _target(r, "hours_to_target", 2)),
        ("convergence score", lambda r: fmt(r, "convergence_score")),
        ("sim. hours", lambda r: fmt(r, "simulated_hours", 2)),
        ("sent MB", lambda r: fmt(r, "bytes_sent", 1, 1e-6)),
        ("received MB", lambda r: fmt(r, "bytes_received", 1, 1e-6)),
        ("wall s", lambda r: fmt(r, "wall_seconds", 0)),
    ]
    if attacked(rows):
        column = ("attack", lambda r: r["attack"])
        accuracy.insert(2, column)
        cost[1:1] = [
            column,
            ("attacker updates dropped", lambda r: f"{r['attacker_dropped']} / {r['attacker_updates']}"),
            ("honest updates dropped", lambda r: f"{r['honest_dropped']} / {r['honest_updates']}"),
        ]
    if any(not math.isnan(r["max_site_epsilon_mean"]) for r in rows):
        cost.append(("max site ε", lambda r: fmt(r, "max_site_epsilon", 2)))
    if any(not math.isnan(r["client_epsilon_mean"]) for r in rows):
        cost.append(("client ε", lambda r: fmt(r, "client_epsilon", 2)))
    return accuracy, cost


def attacked(rows: list[dict[str, Any]]) -> bool:
    """Whether any strategy's runs were configured with a simulated attack."""
    return any(r.get("attack", "none") != "none" for r in rows)


def table_titles(rows: list[dict[str, Any]], target: float, target_region: str = "mean") -> tuple[str, str]:
    """Titles of the accuracy table and of the convergence-and-cost table."""
    name = headline_of(rows)
    accuracy = "AUC (pooled over sites; mean ± std over seeds)" if name == AUC else "Dice (mean ± std over seeds)"
    return accuracy, f"Convergence (target: {target_text(target, target_region, name)}) and cost"


def markdown_table(columns: list, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|---" * len(columns) + "|"]
    return lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]


def target_text(target: float, target_region: str = "mean", name: str = MEAN_DICE) -> str:
    if name == AUC:
        return f"AUC pooled over sites >= {target:g}"
    what = "the mean of ET, TC and WT" if target_region == "mean" else target_region
    return f"mean Dice over sites >= {target:g}, on {what}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows)
    return atomic_write_text(path, handle.getvalue())


def _local_work(config: dict[str, Any]) -> str:
    if int(config.get("local-steps", 0) or 0) > 0:
        return f"{config['local-steps']} local steps"
    return f"{config.get('local-epochs', '?')} local epoch(s)"


#: The words of the report for each headline.
_WORDS = {
    MEAN_DICE: {
        "section": "Dice",
        "measured": "Dice is measured on each site's validation cases and averaged over sites, unweighted.",
        "site": "Final Dice per site",
    },
    AUC: {
        "section": "AUC",
        "measured": "AUC is pooled over the sites' summed score histograms (no per-case score leaves a site); "
        "a site's own AUC is undefined when it holds one class only. Balanced accuracy, sensitivity and "
        "specificity are means over sites, unweighted.",
        "site": "Final AUC per site",
    },
}


def write_comparison(
    out: Path, *, target: float | None = None, target_dice: float | None = None, target_region: str | None = None
) -> Path:
    """Write comparison.md (with PNGs), comparison.csv (per strategy) and comparison_runs.csv (per run)."""
    out = Path(out)
    settings = read_settings(out)
    target_region = settings.get("target_region", "mean") if target_region is None else target_region
    runs = collect_runs(out, target=target, target_dice=target_dice, target_region=target_region)
    if not runs:
        raise ValueError(
            f"no run under {out / 'runs'} has a completed round (expected runs/<strategy>-seed<k>/history.jsonl)"
        )
    name, target = runs[0].summary["headline"], runs[0].summary["target"]
    label, words = LABELS[name], _WORDS[name]
    rows = aggregate(runs)
    for row in rows:
        row["target_region"] = target_region
        if name == MEAN_DICE:
            row["target_dice"] = target  # the column's name before headlines, kept for readers of the CSV
    _write_csv(out / "comparison.csv", rows)
    per_run = [
        {"strategy": r.label, "seed": r.seed, "rounds_done": r.summary["rounds_done"], "rounds": r.planned_rounds,
         "complete": r.complete, "worst_site": r.summary["worst_site"], "attack": attack_of(r.config),
         **{k: r.summary[k] for k in ATTACK_COUNTS}, **{m: r.summary[m] for m in METRICS[name]}}
        for r in runs
    ]  # fmt: skip
    _write_csv(out / "comparison_runs.csv", per_run)
    curves = plot_curves(runs, out / "comparison_curves.png", target if target_region == "mean" else None, label)
    bars = plot_site_bars(runs, out / "comparison_sites.png", label)
    fairness = plot_fairness(runs, out / "comparison_fairness.png", label)
    accuracy, cost = table_columns(rows)
    config = settings.get("config", runs[0].config)
    lines = [
        f"# FedBraTS strategy comparison: {', '.join(r['strategy'] for r in rows)}",
        "",
        f"Data `{config.get('data-dir', '?')}`, partition `{config.get('partition', '?')}`; "
        f"{max(r['rounds'] for r in rows)} rounds; seeds {', '.join(sorted({r['seeds'] for r in rows}))}; "
        f"model `{config.get('model', '?')}` (width {config.get('model-width', '?')}, depth {config.get('model-depth', '?')}), "
        f"patch {config.get('patch-size', '?')}, {_local_work(config)} per round.",
        "",
        "Every strategy ran on the same partition with the same seeds; a seed fixes the initial weights, "
        "each site's train/validation split and the training randomness. Values are mean ± sample std over "
        f"seeds (the mean alone for one seed). {words['measured']} Strategies are ranked by their final "
        f"{label} (mean over seeds).",
        "",
    ]
    few, evaluated = runs[0].summary.get("few_case_sites", 0), runs[0].summary.get("sites_evaluated", 0)
    if few:
        lines += [f"{few} of the {evaluated} sites are scored on 1-{FEW_CASES} validation cases: their own figures "
                  "are anecdotes, not estimates, and the site mean gives each of them the weight of a large site; "
                  "the case-weighted column counts each validation case once.", ""]  # fmt: skip
    if attacked(rows):
        lines += [
            f"**Simulated attack**: {'; '.join(attack_settings(runs))} (docs/reliability.md). \"Attacker updates "
            "dropped\" counts the attacking sites' training updates the server dropped (reply validation, update "
            "checks or screening) out of those it received, summed over seeds; the others entered the aggregate. "
            "\"Honest updates dropped\" counts the same for the other sites.",
            "",
        ]  # fmt: skip
    lines += [f"- {note}" for note in settings.get("notes", [])] + ([""] if settings.get("notes") else [])
    lines += [f"## {words['section']}", "", *markdown_table(accuracy, rows), ""]
    lines += [
        "## Convergence and cost", "",
        f"Target: {target_text(target, target_region, name)} (time to target counts only the seeds that reached "
        "it). Convergence score: FeTS' projected score over one simulated week (W = 604,800 s): after each round "
        f"best = best {label} so far, auc += best x round time, score = ((W - T) x best + auc) / W. "
        "Wall seconds are the rounds' own time on this machine, without Flower's start-up.", "",
        *markdown_table(cost, rows), "",
        "## Learning curves", "", "Mean over seeds; the band spans the lowest to the highest seed.", "",
        f"![{label} against rounds and simulated time]({curves.name})", "",
        f"## {words['site']}", "", f"![{words['site']}]({bars.name})", "",
        "## Fairness", "", f"Every site's final {label}; a strategy that serves all hospitals has a short box.", "",
        f"![site {label} spread]({fairness.name})", "",
        "## Runs", "",
    ]  # fmt: skip
    if len({c for r in runs for c in r.commits}) > 1:
        lines += ["Not every run ran the same FedBraTS code: the code column gives the commit of each start.", ""]
    under_attack = attacked(rows)
    lines += [
        f"| strategy | seed | rounds | final {label} | worst site | convergence score | wall s | code | folder |"
        + (" attack | attacker updates dropped |" if under_attack else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if under_attack else ""),
    ]
    for r in runs:
        s = r.summary
        attack = f" {attack_of(r.config)} | {s['attacker_dropped']} / {s['attacker_updates']} |" if under_attack else ""
        lines.append(
            f"| {r.label} | {r.seed} | {s['rounds_done']}/{r.planned_rounds} | {s['final_headline']:.3f} | "
            f"{s['worst_site']} ({s[WORST_SITE[name]]:.3f}) | {s['convergence_score']:.3f} | {s['wall_seconds']:.0f} | "
            f"{' -> '.join(dict.fromkeys(r.commits)) or '-'} | `runs/{r.path.name}` |{attack}"
        )
    return atomic_write_text(out / "comparison.md", "\n".join(lines) + "\n")
