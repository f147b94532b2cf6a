"""Which sites train in a round, and how long and how fast they train: the FeTS hooks as pure functions.

FeTS lets participants choose the training sites each round (all, a fraction, the fastest,
time-aware) and the learning rate and epochs per round. Here each choice is a function of plain
values (node ids, predicted seconds, the round), so the server's round loop
(``fedbrats.server.federation``) calls it and a test can check it without a grid. Rounds are
numbered from 1, as in our loop.

Run-configuration keys: ``selection`` (with ``fraction-train``, ``select-k``, ``deadline-seconds``),
``epoch-decay`` (`epochs_at`) and ``lr-round-schedule`` (`round_lr`: the "lr" each round's config
carries).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from fedbrats.shared.wallclock import SiteTiming, timing_for


def select_all(nodes: Sequence[int]) -> list[int]:
    return sorted(nodes)


def select_fraction(nodes: Sequence[int], fraction: float, *, min_sites: int, seed: int, server_round: int) -> list[int]:
    """A random ``fraction`` of the sites (at least `min_sites`), reproducible from seed and round."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(min_sites, round(fraction * len(nodes)))
    if count >= len(nodes):
        return sorted(nodes)
    return sorted(random.Random(seed * 100_003 + server_round).sample(sorted(nodes), count))


def select_fastest(nodes: Sequence[int], predicted_seconds: Mapping[int, float], k: int) -> list[int]:
    """The `k` sites with the shortest predicted round time (ties: lower node id first).

    A site without a prediction counts as 0 s, so new sites train and get measured."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranked = sorted(nodes, key=lambda n: (predicted_seconds.get(n, 0.0), n))
    return sorted(ranked[:k])


def select_by_deadline(
    nodes: Sequence[int], predicted_seconds: Mapping[int, float], deadline: float, *, min_sites: int
) -> list[int]:
    """Time-aware selection: every site predicted to finish within `deadline` seconds; if fewer than
    `min_sites` qualify, the fastest others are added until `min_sites` (or all sites) train."""
    if deadline <= 0:
        raise ValueError(f"deadline must be > 0 seconds, got {deadline}")
    ranked = sorted(nodes, key=lambda n: (predicted_seconds.get(n, 0.0), n))
    within = [n for n in ranked if predicted_seconds.get(n, 0.0) <= deadline]
    if len(within) < min_sites:
        within = ranked[: max(min_sites, len(within))]
    return sorted(within)


def predict_round_seconds(
    nodes: Sequence[int],
    node_names: Mapping[int, str],
    sizes: Mapping[int, tuple[int, int]],
    timings: Mapping[str, SiteTiming],
    epochs: float,
    payload_bytes: int | None = None,
) -> dict[int, float]:
    """Predicted simulated seconds of each site's next round (FeTS formula, ``fedbrats.shared.wallclock``).

    `sizes` maps node -> (training cases, validation cases) as last reported (``num-examples``,
    ``num-val``); a node not yet heard from is left out (the selectors treat it as 0 s). `payload_bytes`,
    the global model's size, prices both transfers."""
    predicted = {}
    for node in nodes:
        if node not in sizes or node not in node_names:
            continue
        n_train, n_val = sizes[node]
        predicted[node] = timing_for(dict(timings), node_names[node]).round_seconds(
            n_train, n_val, epochs, down_bytes=payload_bytes, up_bytes=payload_bytes
        )
    return predicted


def epochs_at(server_round: int, base_epochs: float, decay: float = 0.9, cap: int = 10) -> int:
    """``max(1, round(base * decay ** min(r, cap)))`` with ``r = server_round - 1``.

    FeTS's ``train_less_each_round`` counts rounds from 0, so its first round trains the full
    `base_epochs`; ``r = server_round - 1`` keeps that with our rounds counted from 1."""
    if server_round < 1:
        raise ValueError(f"rounds are counted from 1, got {server_round}")
    return max(1, round(base_epochs * decay ** min(server_round - 1, cap)))


def lr_at(
    server_round: int,
    base_lr: float,
    schedule: str = "constant",
    *,
    rounds: int = 1,
    decay: float = 0.9,
    milestone: int = 0,
    min_lr: float = 0.0,
) -> float:
    """The learning rate sent to sites in `server_round`.

    ``constant``: base. ``exponential``: ``base * decay ** (r - 1)``. ``step``: base before
    `milestone`, ``base * decay`` from it (FeTS 2022 "major/minor" schedules). ``cosine``: from base
    in round 1 to `min_lr` in round `rounds`. Never below `min_lr`."""
    if server_round < 1:
        raise ValueError(f"rounds are counted from 1, got {server_round}")
    if schedule == "constant":
        lr = base_lr
    elif schedule == "exponential":
        lr = base_lr * decay ** (server_round - 1)
    elif schedule == "step":
        lr = base_lr if server_round < milestone else base_lr * decay
    elif schedule == "cosine":
        progress = min(1.0, (server_round - 1) / max(1, rounds - 1))
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"lr schedule must be constant, exponential, step or cosine, got {schedule!r}")
    return max(min_lr, lr)


#: Parameters each per-round learning-rate schedule takes in ``lr-round-schedule`` (see `round_lr`).
LR_ROUND_SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": (),
    "exponential": ("decay", "min_lr"),
    "step": ("milestone", "decay", "min_lr"),
    "cosine": ("min_lr",),
}


def parse_lr_round_schedule(spec: str) -> tuple[str, dict[str, float]]:
    """``"NAME[:key=value,...]"`` -> (name, parameters), e.g. ``"step:milestone=10,decay=0.1"``.

    Errors name the run-configuration key ``lr-round-schedule``, the value and what was expected."""
    key = "lr-round-schedule"
    name, _, rest = str(spec).strip().partition(":")
    name = name.strip()
    if name not in LR_ROUND_SCHEDULES:
        raise ValueError(f"{key} must start with one of {', '.join(LR_ROUND_SCHEDULES)}, got {spec!r}")
    allowed = LR_ROUND_SCHEDULES[name]
    params: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        param, sep, value = item.partition("=")
        param = param.strip().replace("-", "_")
        if not sep or param not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
            raise ValueError(f"{key} {spec!r}: {item!r} is not key=value for {name!r}, which {takes}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key} {spec!r}: {param} must be a number, got {value.strip()!r}") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{key} {spec!r}: {param} must be a finite number >= 0, got {value.strip()!r}")
        params[param] = number
    if "decay" in params and not 0 < params["decay"] <= 1:
        raise ValueError(f"{key} {spec!r}: decay must be in (0, 1], got {params['decay']}")
    if name == "step":
        milestone = params.get("milestone", 0.0)
        if milestone < 2 or milestone != int(milestone):
            raise ValueError(f"{key} {spec!r}: step needs milestone=M, a whole round number >= 2")
        params["milestone"] = int(milestone)
    return name, params


def round_lr(server_round: int, base_lr: float, spec: str = "constant", *, rounds: int = 1) -> float:
    """The learning rate each site receives in `server_round` under schedule `spec` (`lr_at`).

    It is the base of the site's own per-step schedule (``lr-schedule``, warm-up then cosine or poly
    over the whole run): the two multiply. For FeTS-style rates set per round by the server, use
    ``lr-schedule = "constant"`` at the sites."""
    name, params = parse_lr_round_schedule(spec)
    return lr_at(server_round, base_lr, name, rounds=rounds, **params)
