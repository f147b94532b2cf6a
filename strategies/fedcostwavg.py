"""FedCostWAvg: weight sites by their data and by how much their training cut the cost.

Mächler et al., "FedCostWAvg: a new averaging for better federated learning", FeTS 2021 winner
(BrainLes 2021). ``M = sum_j [a s_j/S + (1-a) k_j/K] M_j`` with ``s_j`` the site's training
cases, ``k_j = loss_before_j / loss_after_j`` the incoming global model's loss on site j over its
loss after local training, ``K = sum_j k_j``.
"""

from __future__ import annotations

import logging

from flwr.app import Message

from fedbrats.strategies.arithmetic import metric, mix
from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.registry import register_strategy

log = logging.getLogger("fedbrats.strategies")

#: A loss after training at or below this is treated as this (a perfect fit would get infinite weight).
MIN_LOSS = 1e-8


@register_strategy("fedcostwavg")
class FedCostWAvg(ReweightedFedAvg):
    """Cost-weighted FedAvg.

    Parameters
    ----------
    alpha : float (default: 0.5)
        Share of the data-size term; ``1 - alpha`` goes to the cost-improvement term.

    Sites must report ``loss-before`` (loss of the model they received) and ``loss-after`` (loss
    after their local training), both on the same cases with the same loss function.
    Degenerate cases: a loss after training <= 1e-8 counts as 1e-8; if every ``k_j`` is zero
    (all losses before are zero) the cost term is dropped and the weights are the data sizes.
    """

    required_metrics = ("num-examples", "loss-before", "loss-after")

    def __init__(self, *, alpha: float = 0.5, **kwargs) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(**kwargs)
        self.alpha = float(alpha)

    def summary(self) -> None:
        log.info("FedCostWAvg: alpha (data size) %.3g, 1 - alpha (cost ratio) %.3g", self.alpha, 1 - self.alpha)
        super().summary()

    def site_weights(self, server_round: int, replies: list[Message]) -> list[float]:
        sizes = [metric(r, self.weighted_by_key) for r in replies]
        ratios = [
            max(metric(r, "loss-before"), 0.0) / max(metric(r, "loss-after"), MIN_LOSS) for r in replies
        ]
        return mix([(self.alpha, sizes), (1.0 - self.alpha, ratios)])
