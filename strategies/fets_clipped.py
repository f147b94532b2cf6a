"""Clipped aggregation, the FeTS challenge's reference outlier guard, made robust to a minority.

FeTS Challenge Task 1 (``clipped_aggregation`` in ``FeTS_Challenge.py``): per tensor, every site's
change from the global model is clipped to the 80th percentile of the absolute changes of all
sites in the round, then the clipped models are averaged weighted by training cases.

With one attacker in five, the attacker owns the top 20% of that pooled sample: the 80th
percentile is then the attacker's own magnitude and clipping does nothing (an update scaled by
1e6 still moved the aggregate 3e4 times the honest update). Our default takes the percentile per
site and clips to the median of those per-site percentiles, a statistic a minority cannot set;
``pooled=1`` restores the FeTS rule for reproducing the challenge.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Message

from fedbrats.strategies.arithmetic import normalise, record_views, weighted_average
from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.registry import register_strategy

log = logging.getLogger("fedbrats.strategies")


@register_strategy("fets_clipped")
class FetsClippedAvg(ReweightedFedAvg):
    """FedAvg of updates whose per-element change is clipped to a robust bound per tensor.

    Parameters
    ----------
    percentile : float (default: 80.0)
        Percentile of a site's absolute changes (per tensor) that sets its clipping value.
    pooled : float (default: 0)
        0: clip every site to the median over sites of their per-site percentiles (a minority of
        sites cannot move it). 1: FeTS's rule, the percentile of all sites' changes pooled, which
        the largest sites' changes set.

    FeTS skips clipping in its first round because its database holds no previous aggregate yet;
    we always know the model the sites started from, so round 1 is clipped too.
    """

    def __init__(self, *, percentile: float = 80.0, pooled: float = 0, **kwargs) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if pooled not in (0, 1):
            raise ValueError(f"pooled must be 0 (robust, per-site percentiles) or 1 (FeTS's pooled rule), got {pooled}")
        super().__init__(**kwargs)
        self.percentile = float(percentile)
        self.pooled = bool(pooled)

    def summary(self) -> None:
        rule = "all sites' |change| pooled" if self.pooled else "the median over sites of each site's |change|"
        log.info("FetsClippedAvg: clip each change to the %.0fth percentile of %s", self.percentile, rule)
        super().summary()

    def bound(self, magnitudes: np.ndarray) -> float:
        """The clipping value of one tensor from its |changes|, one row per site."""
        if self.pooled:
            return float(np.percentile(magnitudes.reshape(-1), self.percentile))
        per_site = np.percentile(magnitudes.reshape(len(magnitudes), -1), self.percentile, axis=1)
        return float(np.median(per_site))

    def combine(self, server_round: int, replies: list[Message], weights: list[float]) -> dict[str, np.ndarray]:
        reference = self.global_views()
        updates = [record_views(r.content[self.arrayrecord_key]) for r in replies]
        shares = normalise(weights)
        result: dict[str, np.ndarray] = {}
        for name, start in reference.items():
            if start.dtype.kind != "f" or start.size == 0:
                result[name] = weighted_average([{name: u[name]} for u in updates], shares)[name]
                continue
            changes = np.stack([np.subtract(u[name], start) for u in updates]).astype(start.dtype, copy=False)
            bound = start.dtype.type(self.bound(np.abs(changes)))
            np.clip(changes, -bound, bound, out=changes)
            mean_change = weighted_average([{name: c} for c in changes], shares)[name]
            result[name] = start + mean_change
        return result
