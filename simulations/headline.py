"""The headline metric of a run, read from its history: what reports, `compare` and convergence rank by.

Every round record of a run written since the task abstraction carries
``"headline": {"name": "mean-dice" | "auc", "value": float | null}`` (the server computes it:
segmentation = mean over ET, TC, WT of the sites' mean Dice; classification = AUC pooled over the
sites' summed score histograms). Older histories have no headline: they are segmentation runs, and
their headline is the mean of ``mean_dice`` over the three regions, the number they always ranked by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.tasks import AUC, MEAN_DICE

HEADLINES = (MEAN_DICE, AUC)
#: How tables and figures name each headline.
LABELS = {MEAN_DICE: "mean Dice", AUC: "AUC"}
#: The convergence target when none is given: a usable segmentation, a useful classifier.
DEFAULT_TARGETS = {MEAN_DICE: 0.7, AUC: 0.8}


def _declared(record: dict[str, Any]) -> str | None:
    headline = record.get("headline")
    return headline.get("name") if isinstance(headline, dict) else None


def headline_name(history: Iterable[dict[str, Any]]) -> str:
    """The headline of a run: the one its records declare, "mean-dice" when none does (older runs)."""
    names = {name for name in map(_declared, history) if name is not None}
    unknown = sorted(n for n in names if n not in HEADLINES)
    if unknown:
        raise ValueError(f"history declares headline {unknown[0]!r}; expected one of {', '.join(HEADLINES)}")
    if len(names) > 1:
        raise ValueError(f"history mixes headlines {sorted(names)}; one run has one task and one headline")
    return names.pop() if names else MEAN_DICE


def region_mean(mean_dice: dict[str, float] | None) -> float:
    """Mean Dice over ET, TC, WT (NaN when the round was not evaluated)."""
    if not mean_dice:
        return math.nan
    return sum(mean_dice.get(r, math.nan) for r in REGIONS) / len(REGIONS)


def headline_value(record: dict[str, Any]) -> float:
    """The round's headline value, NaN when undefined (not evaluated, or an AUC of one class only)."""
    headline = record.get("headline")
    if isinstance(headline, dict) and headline.get("name"):
        value = headline.get("value")
        return math.nan if value is None else float(value)
    return region_mean(record.get("mean_dice"))


def evaluated_sites(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The round's evaluate entries that were not dropped."""
    return [e for e in record.get("evaluate", []) if not e.get("dropped")]


def site_value(entry: dict[str, Any], name: str) -> float:
    """One site's headline: its own AUC (NaN when its AUC is undefined), or its Dice averaged over regions."""
    if name == AUC:
        value = entry.get("auc")
        return math.nan if value is None else float(value)
    return sum(entry.get(f"dice-{r}", math.nan) for r in REGIONS) / len(REGIONS)


def site_values(record: dict[str, Any], name: str) -> dict[str, float]:
    """Each evaluated site's headline value in one round."""
    return {str(e["site"]): site_value(e, name) for e in evaluated_sites(record)}


def is_evaluated(record: dict[str, Any], name: str) -> bool:
    """Whether the round evaluated the model: Dice recorded, or (classification) a site's scores came back."""
    if name == MEAN_DICE:
        return bool(record.get("mean_dice"))
    keys = ("auc", "auc-undefined", "histograms", "balanced-accuracy")
    return not math.isnan(headline_value(record)) or any(
        any(k in e for k in keys) for e in evaluated_sites(record)
    )


def evaluated_rounds(history: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    """The records of rounds that evaluated the model, in order."""
    name = name or headline_name(history)
    return [r for r in history if is_evaluated(r, name)]
