"""FedAvg with a say in the site weights: the base of our FeTS aggregations and FedNova.

Flower's FedAvg configures the messages and checks reply consistency; a subclass says only what
differs: ``site_weights`` (how much each site counts) or ``combine`` (how the arrays are merged).
The round loop's hooks (``fedbrats.strategies.hooks``) come with it: every strategy here says which
metrics it needs (``required_metrics``), so an incomplete reply is dropped with a reason
(``reply_problem``) instead of failing the round, and one that needs the sites' losses asks for them
in the round's config (``train_config``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedbrats.strategies.arithmetic import (
    metric,
    missing_metrics,
    normalise,
    ordered,
    record_views,
    site_of,
    to_record,
    weighted_average,
)
from fedbrats.strategies.hooks import StrategyHooks

log = logging.getLogger("fedbrats.strategies")


class ReweightedFedAvg(StrategyHooks, FedAvg):
    """Weighted FedAvg (weights: ``num-examples``) computed with our shared arithmetic.

    Equal to Flower's FedAvg to float32 rounding for replies in the same order; replies are put in a
    fixed order (by site name) first, so the result does not depend on arrival order.
    """

    required_metrics: tuple[str, ...] = ("num-examples",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.global_arrays: ArrayRecord | None = None
        self.last_weights: dict[str, float] = {}  # normalised weight per site in the last round, for reports

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays  # the model the sites start from; updates are measured against it
        return super().configure_train(server_round, arrays, config, grid)

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        if "loss-before" in self.required_metrics:
            config["report-loss"] = True  # sites measure losses (extra forward passes) only when asked
        return config

    def reply_problem(self, reply: Message) -> str | None:
        """Why this strategy cannot use `reply` (a missing metric, ...), or None."""
        return missing_metrics(reply, self.required_metrics)

    def global_views(self) -> dict[str, np.ndarray]:
        if self.global_arrays is None:
            raise RuntimeError(f"{type(self).__name__}: configure_train must run before aggregate_train")
        return record_views(self.global_arrays)

    def site_weights(self, server_round: int, replies: list[Message]) -> list[float]:
        return [metric(r, self.weighted_by_key) for r in replies]

    def combine(self, server_round: int, replies: list[Message], weights: list[float]) -> dict[str, np.ndarray]:
        updates = [record_views(r.content[self.arrayrecord_key]) for r in replies]
        return weighted_average(updates, weights)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        usable = []
        for reply in valid:
            problem = self.reply_problem(reply)
            if problem:
                log.warning("round %d: %s leaves out %s: %s", server_round, type(self).__name__, site_of(reply), problem)
            else:
                usable.append(reply)
        if not usable:
            return None, None
        usable = ordered(usable)
        weights = self.site_weights(server_round, usable)
        self.last_weights = {site_of(r): w for r, w in zip(usable, normalise(weights), strict=True)}
        log.info(
            "round %d: %s weights %s",
            server_round,
            type(self).__name__,
            ", ".join(f"{site}={w:.4g}" for site, w in self.last_weights.items()),
        )
        arrays = self.combine(server_round, usable, weights)
        metrics = self.train_metrics_aggr_fn([r.content for r in usable], self.weighted_by_key)
        return to_record(arrays), metrics
