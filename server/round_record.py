"""What a round's history record says about its evaluation, and the one progress line per round."""

from __future__ import annotations

from typing import Any

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.tasks import round_summary

#: the drop reason of a selected site whose reply never came ("late" in the progress line)
LATE = "no reply before timeout"


def evaluation_fields(config: Any, evaluated: list[Any]) -> dict[str, Any]:
    """The record's evaluation of its round's global model: per site, the mean Dice and the task's summary."""
    return {
        "evaluate": [{"site": r.site, "dropped": r.dropped, **r.metrics}
                     | ({"histograms": r.histograms.tolist()} if r.histograms is not None else {})
                     for r in evaluated],  # fmt: skip
        "mean_dice": mean_dice(evaluated),
        # the task's headline (what reports and compare rank on), and the pooled AUC of classifiers
        **round_summary(config, [r.metrics for r in evaluated if not r.dropped],
                        [r.histograms for r in evaluated if not r.dropped and r.histograms is not None]),
    }  # fmt: skip


def mean_dice(results: list[Any]) -> dict[str, float]:
    """Unweighted mean over sites (each hospital counts once, as FeTS scores), per region.

    A site that released no Dice (e.g. under DP with `dp-eval-metrics = suppress`) is left out, never
    counted as 0; a region no site reported is absent."""
    out = {}
    for region in REGIONS:
        values = [r.metrics[f"dice-{region}"] for r in results if not r.dropped and f"dice-{region}" in r.metrics]
        if values:
            out[region] = sum(values) / len(values)
    return out


def progress_line(record: dict[str, Any], rounds: int) -> str:
    """One line per round: which sites delivered, which were late, which were dropped and why."""
    dice = record["mean_dice"]
    dice_text = " ".join(f"{k} {v:.3f}" for k, v in dice.items()) if dice else "not evaluated"
    sites = " ".join(
        f"{e['site']}:{e.get('dice-WT', float('nan')):.2f}" for e in record["evaluate"] if not e.get("dropped")
    )
    delivered = sorted(t["site"] for t in record["train"] if not t.get("dropped"))
    late = sorted(t["site"] for t in record["train"] if t.get("dropped") == LATE)
    dropped = [f"{t['site']} ({t['dropped']})" for t in record["train"] if t.get("dropped") not in (None, LATE)]
    line = (
        f"round {record['round']}/{rounds} [{record['status']}] delivered {len(delivered)}/{record['selected']} "
        f"({', '.join(delivered) or '-'}; {record['available']} connected)"
        + (f" | late: {', '.join(late)}" if late else "")
        + (f" | dropped: {', '.join(dropped)}" if dropped else "")
    )
    if "pooled_auc" in record:  # a task that classifies
        auc = record["pooled_auc"]
        line += f" | pooled AUC {'undefined' if auc is None else f'{auc:.3f}'}"
        if not dice:  # classification only: each site's AUC, not a column of NaN Dice
            aucs = " ".join(f"{e['site']}:{e['auc']:.2f}" if "auc" in e else f"{e['site']}:-"
                            for e in record["evaluate"] if not e.get("dropped"))  # fmt: skip
            return line + f" | AUC per site {aucs or '-'} | {record['wall_seconds']:.1f} s"
    return line + f" | mean Dice {dice_text} | WT per site {sites or '-'} | {record['wall_seconds']:.1f} s"
