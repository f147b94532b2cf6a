"""Update screening: drop an update that is far larger than the round's others or points against them.

Validated replies can still be hostile: under a weighted mean (FedAvg and most strategies) one
update scaled by 1e6 decides the aggregate, and a sign-flipped update pulls it backwards. Each
site's update (its model minus the global model, floating-point arrays only) is measured against
the round: its norm against the median norm (dropped above ``norm_factor`` times the median), and
its cosine to the coordinate-wise median update (dropped below ``min_cosine``). Both statistics are
medians, so a minority of sites cannot set them. With fewer than three updates a median cannot
tell an outlier from a disagreement: screening says so and keeps every update.

A small update is never dropped: pulled towards the global model, the mean moves less, not more.
A large hospital takes more local steps a round and its update grows with them (FeTS-shaped sites
differ 250-fold in size), so norms are compared per local step: each site's claimed steps, never more
than the round asked for (`local-steps`, or one step per training case and epoch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedbrats.strategies.arithmetic import record_views

#: Elements per block when the median update is computed: a block of every site stays small.
_BLOCK = 1 << 18

#: Below this many updates screening cannot judge.
MIN_UPDATES = 3


@dataclass
class Screening:
    """The verdict on one round's updates (indices refer to the order they were given in)."""

    norms: list[float] = field(default_factory=list)
    cosines: list[float | None] = field(default_factory=list)
    median_norm: float = 0.0  # of the norms per local step when steps were given
    steps: list[float] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    note: str | None = None

    def kept(self, count: int) -> list[int]:
        return [i for i in range(count) if i not in self.dropped]

    def record(self, sites: Sequence[str]) -> dict[str, Any]:
        """What the history keeps: per-site norm and cosine, the median, the note."""
        return {
            "median_norm": self.median_norm,
            "norms": {s: n for s, n in zip(sites, self.norms, strict=False)},
            **({"steps": dict(zip(sites, self.steps, strict=False))} if self.steps else {}),
            "cosines": {s: c for s, c in zip(sites, self.cosines, strict=False)},
            "dropped": [sites[i] for i in sorted(self.dropped)],
            **({"note": self.note} if self.note else {}),
        }


def _floats(reference: Mapping[str, np.ndarray]) -> list[str]:
    return [name for name, value in reference.items() if value.dtype.kind == "f" and value.size]


def _blocks(updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]):
    """(reference values, [each update's values]) in blocks of about `_BLOCK` values; small arrays (norms,
    biases) share a block, so a model of many small arrays costs a few NumPy calls, not a few per array."""
    pending: list[tuple[np.ndarray, list[np.ndarray]]] = []
    size = 0
    for name in _floats(reference):
        start = np.ravel(reference[name])
        flat = [np.ravel(u[name]) for u in updates]
        for lo in range(0, start.size, _BLOCK):
            hi = min(lo + _BLOCK, start.size)
            pending.append((start[lo:hi], [f[lo:hi] for f in flat]))
            size += hi - lo
            if size >= _BLOCK:
                yield _joined(pending)
                pending, size = [], 0
    if pending:
        yield _joined(pending)


def _joined(parts: list[tuple[np.ndarray, list[np.ndarray]]]) -> tuple[np.ndarray, list[np.ndarray]]:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([r for r, _ in parts]), [np.concatenate(u) for u in zip(*(f for _, f in parts), strict=True)]


def update_statistics(
    updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> tuple[list[float], list[float | None], float]:
    """Per site: the norm of ``update - reference`` and its cosine to the coordinate-wise median
    of those changes; and the median update's norm. Computed block by block in float64, so memory
    stays at one block per site whatever the model size."""
    k = len(updates)
    squares, dots = np.zeros(k), np.zeros(k)
    median_square = 0.0
    for start, flat in _blocks(updates, reference):
        changes = np.stack(flat).astype(np.float64) - start
        median = np.median(changes, axis=0)
        squares += np.einsum("ij,ij->i", changes, changes)
        dots += changes @ median
        median_square += float(median @ median)
    norms = [math.sqrt(s) for s in squares]
    median_norm = math.sqrt(median_square)
    cosines: list[float | None] = [
        float(d / (n * median_norm)) if n > 0 and median_norm > 0 else None for d, n in zip(dots, norms, strict=True)
    ]
    return norms, cosines, median_norm


def screen_updates(
    updates: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    *,
    norm_factor: float = 10.0,
    min_cosine: float = 0.0,
    min_updates: int = MIN_UPDATES,
    steps: Sequence[float] | None = None,
) -> Screening:
    """Which of the round's `updates` (models as arrays) to drop, and why.

    An update is dropped when its change from `reference` (the global model) has a norm above
    ``norm_factor`` x the round's median norm, or a cosine to the median change below `min_cosine`.
    With `steps` (each site's local steps as plain-step equivalents, >= 1: `site_steps`) the norm test compares
    norms per step.
    """
    if norm_factor <= 1.0:
        raise ValueError(f"norm_factor must be > 1, got {norm_factor}")
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    if steps is not None and (len(steps) != len(updates) or min(steps) < 1):
        raise ValueError(f"steps must give each of the {len(updates)} updates a count >= 1, got {list(steps)}")
    if len(updates) < min_updates:
        return Screening(note=f"screening needs at least {min_updates} updates, got {len(updates)}; skipped")
    norms, cosines, median_change = update_statistics(updates, reference)
    rates = [n / s for n, s in zip(norms, steps, strict=True)] if steps is not None else norms
    median_norm = float(np.median(rates))
    result = Screening(norms=norms, cosines=cosines, median_norm=median_norm, steps=list(steps or []))
    if median_norm == 0.0:
        result.note = "the median update is zero; the norm test was skipped"
    for i, (norm, rate, cosine) in enumerate(zip(norms, rates, cosines, strict=True)):
        if median_norm > 0 and rate > norm_factor * median_norm:
            per_step = f" over {steps[i]:.3g} plain steps, {rate:.4g} a step," if steps is not None else ""
            result.dropped[i] = (
                f"screened: update norm {norm:.4g}{per_step} is {rate / median_norm:.3g} x the round's median "
                f"{median_norm:.4g}{' a step' if steps is not None else ''} (limit {norm_factor:g} x)"
            )
        elif cosine is not None and cosine < min_cosine:
            result.dropped[i] = (
                f"screened: update cosine {cosine:.3f} to the round's median update is below {min_cosine:g} "
                f"(norm {norm:.4g}, median norm {median_norm:.4g})"
            )
    if median_change == 0.0 and result.note is None:
        result.note = "the coordinate-wise median update is zero; the cosine test was skipped"
    return result


def screen_replies(
    replies: Sequence[Message], reference: ArrayRecord, *, norm_factor: float = 10.0, min_cosine: float = 0.0,
    steps: Sequence[float] | None = None,
) -> Screening:
    """`screen_updates` over validated training replies (their ``"arrays"``) against the global model."""
    updates = [record_views(r.content.array_records["arrays"]) for r in replies]
    return screen_updates(updates, record_views(reference), norm_factor=norm_factor, min_cosine=min_cosine,
                          steps=steps)  # fmt: skip


def site_steps(metrics: Sequence[Mapping[str, float]], config: Any, *, epochs: int) -> list[float] | None:
    """Each site's local steps for the norm test: what its validated reply claims, at least 1 and never more than
    the round asked for (`local-steps` of the run configuration, or one step per training case and epoch). None
    when a reply has no count.

    With SGD momentum m (`local-optimizer = sgd`) step k moves the weights (1 - m^k) / (1 - m) times as far as a
    plain step along the same gradient, so K steps count as their sum (`momentum_steps`): 28.7 for K = 8 and
    m = 0.9. Counted plainly, an honest hospital taking 8 steps moved 14 times as far a step as the one-step
    sites on the FeTS-shaped phantom and was dropped. Adam's steps have about the same length from the first."""
    if not metrics or any("local-steps" not in m or "num-examples" not in m for m in metrics):
        return None
    local_steps = config.local_steps
    momentum = config.sgd_momentum if config.local_optimizer == "sgd" else 0.0
    bound = [float(local_steps) if local_steps > 0 else float(epochs * m["num-examples"]) for m in metrics]
    steps = [max(1.0, min(float(m["local-steps"]), b)) for m, b in zip(metrics, bound, strict=True)]
    return [momentum_steps(k, momentum) for k in steps]


def momentum_steps(steps: float, momentum: float) -> float:
    """Plain steps that K heavy-ball steps with momentum m amount to: sum over k <= K of (1 - m^k) / (1 - m)."""
    if momentum <= 0:
        return steps
    return (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)


def attack_marks(config: Any) -> dict[str, str]:
    """Site -> attack, for the sites a simulated run's configuration makes attack (client/attack.py)."""
    if getattr(config, "attack", "none") == "none":
        return {}
    return {site.strip(): config.attack for site in str(config.attack_sites).split(",") if site.strip()}
