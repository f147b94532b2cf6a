"""The numbers of one run of a comparison (one strategy, one seed), from its history alone.

Ranking, the convergence target and the FeTS convergence score all use the run's headline
(`simulations.headline`): mean Dice for segmentation, pooled AUC for classification. Histories
without a headline (runs from before classification) are segmentation runs ranked by mean Dice.
"""

from __future__ import annotations

import math
from typing import Any

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.evaluation.intervals import FEW_CASES, case_weighted
from fedbrats.simulations.headline import (
    AUC,
    DEFAULT_TARGETS,
    MEAN_DICE,
    evaluated_rounds,
    evaluated_sites,
    headline_name,
    headline_value,
    region_mean,
    site_values,
)

#: FeTS scores convergence over one simulated week (DESIGN section 8).
ONE_WEEK = 604_800.0
TARGET_REGIONS = ("mean", *REGIONS)
_COSTS = (
    "rounds_to_target", "hours_to_target", "convergence_score", "simulated_hours",
    "bytes_sent", "bytes_received", "wall_seconds", "max_site_epsilon", "client_epsilon",
)  # fmt: skip
#: Metrics aggregated over seeds per headline, in table order; each becomes <name>_mean and <name>_std.
METRICS = {
    MEAN_DICE: (
        *(f"final_dice_{r}" for r in (*REGIONS, "mean")),
        *(f"final_case_dice_{r}" for r in (*REGIONS, "mean")),  # weighted by each site's validation cases
        *(f"best_dice_{r}" for r in (*REGIONS, "mean")),
        "worst_site_dice", *_COSTS,
    ),
    AUC: ("final_auc", "best_auc", "worst_site_auc", "balanced_accuracy", "sensitivity", "specificity", *_COSTS),
}  # fmt: skip
#: The metric a comparison ranks by (higher is better) and the worst site's value, per headline.
RANKED_BY = {MEAN_DICE: "final_dice_mean", AUC: "final_auc"}
WORST_SITE = {MEAN_DICE: "worst_site_dice", AUC: "worst_site_auc"}
#: Counts of a run's training updates by attacking and honest sites (`attack_counts`); summed over seeds.
ATTACK_COUNTS = ("attacker_updates", "attacker_dropped", "honest_updates", "honest_dropped")
#: Site metrics of a classification evaluate reply averaged over sites (summary key -> record key).
SITE_MEANS = {"balanced_accuracy": "balanced-accuracy", "sensitivity": "sensitivity", "specificity": "specificity"}


def convergence_scores(
    values: list[float | None], round_seconds: list[float], window: float = ONE_WEEK
) -> list[float]:
    """The FeTS projected convergence score after each round, of any headline (Dice, AUC).

    After each round: best = best headline value so far (this round's model included; a round
    without evaluation keeps the previous best), auc += best x round_time, T += round_time, and
    score = ((W - T) x best + auc) / W, i.e. the area under the best-value-over-time curve if the
    best model were kept for the rest of the week. Time past the window W does not count (FeTS
    stops the experiment there). FeTS itself credits a model from the round after it is validated,
    so its score for the same curve is slightly lower.
    """
    if len(values) != len(round_seconds):
        raise ValueError(
            f"one headline value per round expected: {len(values)} values for {len(round_seconds)} rounds"
        )
    best = area = elapsed = 0.0
    scores = []
    for value, seconds in zip(values, round_seconds, strict=True):
        if value is not None and not math.isnan(value):
            best = max(best, value)
        counted = min(max(seconds, 0.0), window - elapsed)
        area += best * counted
        elapsed += counted
        scores.append(((window - elapsed) * best + area) / window)
    return scores


def final_convergence_score(history: list[dict[str, Any]]) -> float:
    """The run's FeTS convergence score on its headline over simulated time (NaN without rounds)."""
    scores = convergence_scores(
        [headline_value(h) for h in history], [h.get("simulated_round_seconds", 0.0) for h in history]
    )
    return scores[-1] if scores else math.nan


def region_value(mean_dice: dict[str, float], region: str) -> float:
    """One region's mean Dice, or the mean over the three regions for "mean"."""
    if region == "mean":
        return region_mean(mean_dice)
    return mean_dice.get(region, math.nan) if mean_dice else math.nan


def resolve_target(name: str, target: float | None = None, target_dice: float | None = None) -> float:
    """The convergence target on the headline `name`: `target`, else the segmentation alias `target_dice`,
    else the headline's default."""
    if target_dice is not None and name != MEAN_DICE:
        raise ValueError(
            f"--target-dice applies to segmentation's mean Dice; this comparison's headline is {name}: use --target"
        )
    if target is not None and target_dice is not None and target != target_dice:
        raise ValueError(f"--target {target:g} and --target-dice {target_dice:g} disagree; give one of them")
    value = target if target is not None else target_dice if target_dice is not None else DEFAULT_TARGETS[name]
    if not 0.0 < value <= 1.0:
        raise ValueError(f"the convergence target must be in (0, 1], got {value}")
    return float(value)


def _mean_defined(values) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _segmentation(s: dict[str, Any], evaluated: list[dict[str, Any]]) -> None:
    """Final and best Dice: site-weighted (the recorded mean_dice, each site once) and, for the final
    round, case-weighted (each site's mean times its validation cases)."""
    final = evaluated[-1] if evaluated else {}
    entries = evaluated_sites(final) if final else []
    for region in REGIONS:
        s[f"final_case_dice_{region}"] = case_weighted(
            [e.get(f"dice-{region}", math.nan) for e in entries], [int(e.get("num-examples", 0)) for e in entries]
        )
    s["final_case_dice_mean"] = sum(s[f"final_case_dice_{r}"] for r in REGIONS) / len(REGIONS)
    cases = [int(e.get("num-examples", 0)) for e in entries]
    s["sites_evaluated"], s["few_case_sites"] = len(cases), sum(1 <= n <= FEW_CASES for n in cases)
    for region in (*REGIONS, "mean"):
        s[f"final_dice_{region}"] = region_value(final.get("mean_dice", {}), region)
        s[f"best_dice_{region}"] = max(
            (region_value(h["mean_dice"], region) for h in evaluated), default=math.nan
        )


def _classification(s: dict[str, Any], evaluated: list[dict[str, Any]]) -> None:
    final = evaluated[-1] if evaluated else {}
    s["final_auc"] = headline_value(final) if final else math.nan
    s["best_auc"] = max((v for v in map(headline_value, evaluated) if not math.isnan(v)), default=math.nan)
    bound = final.get("pooled_auc_bound")
    s["final_auc_bound"] = math.nan if bound is None else float(bound)
    entries = evaluated_sites(final) if final else []
    for key, metric in SITE_MEANS.items():
        s[key] = _mean_defined(e.get(metric) for e in entries)


def attack_counts(history: list[dict[str, Any]]) -> dict[str, int]:
    """Training updates the server received from attacking and from honest sites, and how many of each it
    dropped (validation, update checks or screening), from the rounds' train entries: the server marks a
    simulated attacker's entry with ``"attack"`` (server/federation.py)."""
    counts = dict.fromkeys(ATTACK_COUNTS, 0)
    for h in history:
        for entry in h.get("train", []):
            who = "attacker" if entry.get("attack") else "honest"
            counts[f"{who}_updates"] += 1
            counts[f"{who}_dropped"] += entry.get("dropped") is not None
    return counts


def summarise_run(
    history: list[dict[str, Any]],
    *,
    target: float | None = None,
    target_dice: float | None = None,
    target_region: str = "mean",
) -> dict[str, Any]:
    """The numbers of one run (one strategy, one seed); `target` applies to the headline
    (`target_dice` is its segmentation alias; `target_region` narrows a Dice target to one region)."""
    if target_region not in TARGET_REGIONS:
        raise ValueError(f"target region must be one of {', '.join(TARGET_REGIONS)}, got {target_region!r}")
    name = headline_name(history)
    if name != MEAN_DICE and target_region != "mean":
        raise ValueError(f"target region {target_region!r} applies to Dice; this run's headline is {name}")
    target = resolve_target(name, target, target_dice)
    evaluated = evaluated_rounds(history, name)
    final = evaluated[-1] if evaluated else {}
    s: dict[str, Any] = {"headline": name, "rounds_done": history[-1]["round"] if history else 0}
    (_segmentation if name == MEAN_DICE else _classification)(s, evaluated)
    s["final_headline"] = headline_value(final) if final else math.nan
    s["site_values"] = site_values(final, name) if final else {}
    defined = {k: v for k, v in s["site_values"].items() if not math.isnan(v)}
    s["worst_site"], s[WORST_SITE[name]] = min(defined.items(), key=lambda kv: kv[1], default=(None, math.nan))

    def on_target(h: dict[str, Any]) -> float:
        return headline_value(h) if target_region == "mean" else region_value(h["mean_dice"], target_region)

    reached = next((h for h in evaluated if on_target(h) >= target), None)
    s["target"] = target
    s["rounds_to_target"] = reached["round"] if reached else math.nan
    s["hours_to_target"] = reached["simulated_seconds"] / 3600 if reached else math.nan
    s["convergence_score"] = final_convergence_score(history)
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
    s["curve"] = [(h["round"], h["simulated_seconds"] / 3600, headline_value(h)) for h in evaluated]
    s.update(attack_counts(history))
    return s
