"""Known pitfalls of a DP-SGD run configuration, measured on the phantom (benchmarks/RESULTS.md), as notes.

One source for every front: the simulation command prints them, the ServerApp of a deployment logs them.
"""

from __future__ import annotations

from fedbrats.shared.config import RunConfig


def recipe_notes(config: RunConfig) -> list[str]:
    """What this DP-SGD configuration is known to do badly, measured (docs/privacy.md section 6). `fedbrats simulate`
    prints it and the ServerApp logs it before the first round; nothing is changed behind the user's back."""
    if not config.dp:
        return []
    notes = []
    if config.local_optimizer == "adam":
        notes.append(
            "DP-SGD with Adam at the sites: Adam moves every weight about `lr` a step whether its gradient is signal "
            "or noise; measured at epsilon 8 on two 200-patient sites, WT fell from the public model's 0.73 to 0.64, "
            "where local-optimizer=sgd (sgd-momentum=0.9, lr=0.05) reached 0.68-0.83 over five runs (docs/privacy.md "
            "section 6)"
        )
    if not config.init_checkpoint and config.trainable.strip() == "*":
        notes.append(
            "DP-SGD from random weights on every parameter: the noise grows with the parameters trained; a warm "
            "start (init-checkpoint, from public data) and a small trainable subset learn at budgets where a cold "
            "start does not (docs/privacy.md sections 4-5)"
        )
    return notes
