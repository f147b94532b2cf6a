"""The comparison report: strategies side by side, aggregated over seeds, from the run folders alone.

Everything here is a pure function of ``OUT/runs/<strategy>-seed<k>/history.jsonl`` (plus
``run_config.json`` and ``OUT/comparison_config.json`` when present), so a report can be rebuilt
after the fact, or tested, without Flower. Spread over seeds is the sample standard deviation.
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
from fedbrats.simulations.compare_figures import mean_std, plot_curves, plot_fairness, plot_site_bars
from fedbrats.simulations.report import site_region_dice

#: FeTS scores convergence over one simulated week (DESIGN section 8).
ONE_WEEK = 604_800.0
RUN_DIR = re.compile(r"^(?P<label>.+)-seed(?P<seed>\d+)$")
TARGET_REGIONS = ("mean", *REGIONS)
#: Metrics aggregated over seeds, in table order; each becomes <name>_mean and <name>_std in the CSV.
METRICS = (
    *(f"final_dice_{r}" for r in (*REGIONS, "mean")),
    *(f"best_dice_{r}" for r in (*REGIONS, "mean")),
    "worst_site_dice", "rounds_to_target", "hours_to_target", "convergence_score", "simulated_hours",
    "bytes_sent", "bytes_received", "wall_seconds", "max_site_epsilon", "client_epsilon",
)  # fmt: skip


def convergence_scores(
    dice: list[float | None], round_seconds: list[float], window: float = ONE_WEEK
) -> list[float]:
    """The FeTS projected convergence score after each round.

    After each round: best = best mean Dice so far (this round's model included; a round without
    evaluation keeps the previous best), auc += best x round_time, T += round_time, and
    score = ((W - T) x best + auc) / W, i.e. the area under the best-Dice-over-time curve if the
    best model were kept for the rest of the week. Time past the window W does not count (FeTS
    stops the experiment there). FeTS itself credits a model from the round after it is validated,
    so its score for the same curve is slightly lower.
    """
    if len(dice) != len(round_seconds):
        raise ValueError(
            f"one Dice per round expected: {len(dice)} Dice values for {len(round_seconds)} rounds"
        )
    best = auc = elapsed = 0.0
    scores = []
    for value, seconds in zip(dice, round_seconds, strict=True):
        if value is not None and not math.isnan(value):
            best = max(best, value)
        counted = min(max(seconds, 0.0), window - elapsed)
        auc += best * counted
        elapsed += counted
        scores.append(((window - elapsed) * best + auc) / window)
    return scores


def region_value(mean_dice: dict[str, float], region: str) -> float:
    """One region's mean Dice, or the mean over the three regions for "mean"."""
    if not mean_dice:
        return math.nan
    if region == "mean":
        return sum(mean_dice.get(r, math.nan) for r in REGIONS) / len(REGIONS)
    return mean_dice.get(region, math.nan)


def site_dice(record: dict[str, Any]) -> dict[str, float]:
    """Each evaluated site's Dice, averaged over the three regions."""
    return {str(site): sum(d.values()) / len(d) for site, d in site_region_dice(record).items()}


def summarise_run(
    history: list[dict[str, Any]], *, target_dice: float, target_region: str = "mean"
) -> dict[str, Any]:
    """The numbers of one run (one strategy, one seed)."""
    if target_region not in TARGET_REGIONS:
        raise ValueError(f"target region must be one of {', '.join(TARGET_REGIONS)}, got {target_region!r}")
    evaluated = [h for h in history if h.get("mean_dice")]
    final = evaluated[-1] if evaluated else {}
    s: dict[str, Any] = {"rounds_done": history[-1]["round"] if history else 0}
    for region in (*REGIONS, "mean"):
        s[f"final_dice_{region}"] = region_value(final.get("mean_dice", {}), region)
        s[f"best_dice_{region}"] = max(
            (region_value(h["mean_dice"], region) for h in evaluated), default=math.nan
        )
    s["site_dice"] = site_dice(final) if final else {}
    worst = min(s["site_dice"].items(), key=lambda kv: kv[1], default=(None, math.nan))
    s["worst_site"], s["worst_site_dice"] = worst
    reached = next((h for h in evaluated if region_value(h["mean_dice"], target_region) >= target_dice), None)
    s["rounds_to_target"] = reached["round"] if reached else math.nan
    s["hours_to_target"] = reached["simulated_seconds"] / 3600 if reached else math.nan
    dice = [region_value(h.get("mean_dice", {}), "mean") for h in history]
    scores = convergence_scores(dice, [h.get("simulated_round_seconds", 0.0) for h in history])
    s["convergence_score"] = scores[-1] if scores else math.nan
    s["simulated_hours"] = history[-1].get("simulated_seconds", 0.0) / 3600 if history else math.nan
    for key in ("bytes_sent", "bytes_received", "wall_seconds"):
        s[key] = float(sum(h.get(key, 0) for h in history))
    epsilon: dict[str, float] = {}
    for h in history:
        for t in h.get("train", []):
            if "epsilon" in t:
                epsilon[str(t["site"])] = max(epsilon.get(str(t["site"]), 0.0), float(t["epsilon"]))
    s["site_epsilon"] = epsilon
    s["max_site_epsilon"] = max(epsilon.values(), default=math.nan)
    s["client_epsilon"] = next(
        (float(h["client_epsilon"]) for h in reversed(history) if "client_epsilon" in h), math.nan
    )
    s["curve"] = [
        (h["round"], h["simulated_seconds"] / 3600, region_value(h["mean_dice"], "mean")) for h in evaluated
    ]
    return s


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


def collect_runs(
    out: Path, *, target_dice: float | None = None, target_region: str | None = None
) -> list[Run]:
    """Every run folder under OUT/runs with at least one recorded round, in the comparison's order."""
    out = Path(out)
    settings = read_settings(out)
    target_dice = settings.get("target_dice", 0.7) if target_dice is None else target_dice
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
        run.summary = summarise_run(history, target_dice=target_dice, target_region=target_region)
        runs.append(run)
    order = {label: i for i, label in enumerate(s["label"] for s in settings.get("strategies", []))}
    return sorted(runs, key=lambda r: (order.get(r.label, len(order)), r.label, r.seed))


def aggregate(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per strategy: every metric as mean and std over its seeds."""
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        mine = [r for r in runs if r.label == label]
        config = mine[0].config
        params = {
            k.removeprefix("strategy-"): v for k, v in sorted(config.items()) if k.startswith("strategy-")
        }
        row: dict[str, Any] = {
            "strategy": label,
            "name": config.get("strategy", label),
            "params": " ".join(f"{k}={v:g}" for k, v in params.items()),
            "seeds": ",".join(str(r.seed) for r in mine),
            "runs_complete": f"{sum(r.complete for r in mine)}/{len(mine)}",
            "rounds": max(r.planned_rounds for r in mine),
            "target_reached": f"{sum(not math.isnan(r.summary['rounds_to_target']) for r in mine)}/{len(mine)}",
            "worst_site": Counter(r.summary["worst_site"] for r in mine).most_common(1)[0][0],
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([r.summary[metric] for r in mine])
        rows.append(row)
    return rows


def summarise_runs(
    out: Path, *, target_dice: float | None = None, target_region: str | None = None
) -> list[dict[str, Any]]:
    """The comparison table (one row per strategy) from the run folders under OUT/runs."""
    return aggregate(collect_runs(out, target_dice=target_dice, target_region=target_region))


# --- plots ------------------------------------------------------------------------------------
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
    return "-" if row["worst_site"] is None else f"{fmt(row, 'worst_site_dice')} (site {row['worst_site']})"


def table_columns(rows: list[dict[str, Any]]) -> tuple[list, list]:
    """(header, cell function) pairs for the accuracy table and the convergence-and-cost table."""
    name = ("strategy", lambda r: r["strategy"] + (f" ({r['params']})" if r["params"] else ""))
    accuracy = [name, ("complete runs", lambda r: r["runs_complete"])]
    accuracy += [(f"final {g}", lambda r, g=g: fmt(r, f"final_dice_{g}")) for g in (*REGIONS, "mean")]
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
    if any(not math.isnan(r["max_site_epsilon_mean"]) for r in rows):
        cost.append(("max site ε", lambda r: fmt(r, "max_site_epsilon", 2)))
    if any(not math.isnan(r["client_epsilon_mean"]) for r in rows):
        cost.append(("client ε", lambda r: fmt(r, "client_epsilon", 2)))
    return accuracy, cost


def markdown_table(columns: list, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|---" * len(columns) + "|"]
    return lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]


def target_text(target_dice: float, target_region: str) -> str:
    what = "the mean of ET, TC and WT" if target_region == "mean" else target_region
    return f"mean Dice over sites >= {target_dice:g}, on {what}"


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


def write_comparison(
    out: Path, *, target_dice: float | None = None, target_region: str | None = None
) -> Path:
    """Write comparison.md (with PNGs), comparison.csv (per strategy) and comparison_runs.csv (per run)."""
    out = Path(out)
    settings = read_settings(out)
    target_dice = settings.get("target_dice", 0.7) if target_dice is None else target_dice
    target_region = settings.get("target_region", "mean") if target_region is None else target_region
    runs = collect_runs(out, target_dice=target_dice, target_region=target_region)
    if not runs:
        raise ValueError(
            f"no run under {out / 'runs'} has a completed round (expected runs/<strategy>-seed<k>/history.jsonl)"
        )
    rows = aggregate(runs)
    for row in rows:
        row.update(target_dice=target_dice, target_region=target_region)
    _write_csv(out / "comparison.csv", rows)
    per_run = [
        {"strategy": r.label, "seed": r.seed, "rounds_done": r.summary["rounds_done"], "rounds": r.planned_rounds,
         "complete": r.complete, "worst_site": r.summary["worst_site"], **{m: r.summary[m] for m in METRICS}}
        for r in runs
    ]  # fmt: skip
    _write_csv(out / "comparison_runs.csv", per_run)
    curves = plot_curves(
        runs, out / "comparison_curves.png", target_dice if target_region == "mean" else None
    )
    bars = plot_site_bars(runs, out / "comparison_sites.png")
    fairness = plot_fairness(runs, out / "comparison_fairness.png")
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
        "seeds (the mean alone for one seed). Dice is measured on each site's validation cases and averaged "
        "over sites, unweighted.",
        "",
    ]
    lines += [f"- {note}" for note in settings.get("notes", [])] + ([""] if settings.get("notes") else [])
    lines += ["## Dice", "", *markdown_table(accuracy, rows), ""]
    lines += [
        "## Convergence and cost", "",
        f"Target: {target_text(target_dice, target_region)} (time to target counts only the seeds that reached it). "
        "Convergence score: FeTS' projected score over one simulated week (W = 604,800 s): after each round "
        "best = best mean Dice (of ET, TC, WT) so far, auc += best x round time, score = ((W - T) x best + auc) / W. "
        "Wall seconds are the rounds' own time on this machine, without Flower's start-up.", "",
        *markdown_table(cost, rows), "",
        "## Learning curves", "", "Mean over seeds; the band spans the lowest to the highest seed.", "",
        f"![mean Dice against rounds and simulated time]({curves.name})", "",
        "## Final Dice per site", "", f"![final Dice per site]({bars.name})", "",
        "## Fairness", "", "Every site's final Dice; a strategy that serves all hospitals has a short box.", "",
        f"![site Dice spread]({fairness.name})", "",
        "## Runs", "",
    ]  # fmt: skip
    if len({c for r in runs for c in r.commits}) > 1:
        lines += ["Not every run ran the same FedBraTS code: the code column gives the commit of each start.", ""]
    lines += [
        "| strategy | seed | rounds | final mean Dice | worst site | convergence score | wall s | code | folder |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r.summary
        lines.append(
            f"| {r.label} | {r.seed} | {s['rounds_done']}/{r.planned_rounds} | {s['final_dice_mean']:.3f} | "
            f"{s['worst_site']} ({s['worst_site_dice']:.3f}) | {s['convergence_score']:.3f} | {s['wall_seconds']:.0f} | "
            f"{' -> '.join(dict.fromkeys(r.commits)) or '-'} | `runs/{r.path.name}` |"
        )
    return atomic_write_text(out / "comparison.md", "\n".join(lines) + "\n")
