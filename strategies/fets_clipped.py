"""Clipped aggregation, the FeTS challenge's reference outlier guard.

FeTS Challenge Task 1 (``clipped_aggregation`` in ``FeTS_Challenge.py``): per tensor, every site's
change from the global model is clipped to the 80th percentile of the absolute changes of all
sites in the round, then the clipped models are averaged weighted by training cases.
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
    """FedAvg of updates whose per-element change is clipped to a percentile of the round's changes.

    Parameters
    ----------
    percentile : float (default: 80.0)
        Percentile of the absolute changes (all sites of the round pooled, per tensor) that bounds
        each element's change.

    FeTS skips clipping in its first round because its database holds no previous aggregate yet;
    we always know the model the sites started from, so round 1 is clipped too.
    """

    def __init__(self, *, percentile: float = 80.0, **kwargs) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(**kwargs)
        self.percentile = float(percentile)

    def summary(self) -> None:
        log.info("FetsClippedAvg: clip each change to the %.0fth percentile of |change|", self.percentile)
        super().summary()

    def combine(self, server_round: int, replies: list[Message], weights: list[float]) -> dict[str, np.ndarray]:
        reference = self.global_views()
        updates = [record_views(r.content[self.arrayrecord_key]) for r in replies]
        shares = normalise(weights)
        largest = max((x.size for x in reference.values() if x.dtype.kind == "f"), default=0)
        changes_buffer = np.empty(len(updates) * largest, np.float32)  # reused for every tensor
        magnitude_buffer = np.empty_like(changes_buffer)
        result: dict[str, np.ndarray] = {}
        for name, start in reference.items():
            if start.dtype.kind != "f" or start.size == 0:
                result[name] = weighted_average([{name: u[name]} for u in updates], shares)[name]
                continue
            n = len(updates) * start.size
            changes = changes_buffer[:n].astype(start.dtype, copy=False).reshape(len(updates), *start.shape)
            for row, update in zip(changes, updates, strict=True):
                np.subtract(update[name], start, out=row)
            magnitudes = np.abs(changes.reshape(-1), out=magnitude_buffer[:n].astype(start.dtype, copy=False))
            bound = start.dtype.type(np.percentile(magnitudes, self.percentile, overwrite_input=True))
            np.clip(changes, -bound, bound, out=changes)
            mean_change = weighted_average([{name: c} for c in changes], shares)[name]
            result[name] = start + mean_change
        return result
