"""FedPIDAvg: FedCostWAvg plus an integral term over each site's recent losses.

Mächler et al., "FedPIDAvg: a PID controller inspired aggregation method for federated learning",
FeTS 2022 winner (arXiv:2304.12117). ``M = sum_j [a s_j/S + b k_j/K + c m_j/I] M_j`` with ``s_j``
the site's training cases (proportional term), ``k_j = loss_before_j - loss_after_j`` the drop of
the cost in this round (derivative term) and ``m_j`` the sum of the site's losses after local
training over its last five rounds (integral term); ``S, K, I`` are the sums over the round's sites.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Message

from fedbrats.strategies.arithmetic import metric, mix, site_of
from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.registry import register_strategy

log = logging.getLogger("fedbrats.strategies")


@register_strategy("fedpidavg")
class FedPIDAvg(ReweightedFedAvg):
    """PID-weighted FedAvg with a per-site loss history that survives a server restart.

    Parameters
    ----------
    alpha, beta, gamma : float (default: 0.45, 0.45, 0.1)
        Coefficients of the data-size, loss-drop and loss-history terms.
    window : float (default: 5)
        Number of a site's most recent losses summed in the integral term (this round included).

    Sites report ``loss-before`` and ``loss-after`` as for FedCostWAvg. Degenerate cases:
    a site whose loss rose (``k_j < 0``) gets no derivative weight (``k_j = 0``), as in the FeTS 2022
    code; a term whose values sum to zero (no site improved) is dropped and the other coefficients
    rescaled so the weights still sum to one. The history counts rounds a site took part in, keyed
    by site name, so a site that skipped rounds keeps its last ``window`` losses.
    """

    required_metrics = ("num-examples", "loss-before", "loss-after")

    def __init__(
        self, *, alpha: float = 0.45, beta: float = 0.45, gamma: float = 0.1, window: float = 5, **kwargs
    ) -> None:
        if min(alpha, beta, gamma) < 0 or alpha + beta + gamma <= 0:
            raise ValueError(f"alpha, beta, gamma must be >= 0 with a positive sum, got {alpha}, {beta}, {gamma}")
        if int(window) < 1 or window != int(window):
            raise ValueError(f"window must be a whole number >= 1, got {window}")
        super().__init__(**kwargs)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.window = int(window)
        self.history: dict[str, list[float]] = {}

    def summary(self) -> None:
        log.info(
            "FedPIDAvg: alpha %.3g (data) beta %.3g (loss drop) gamma %.3g (last %d losses)",
            self.alpha, self.beta, self.gamma, self.window,
        )
        super().summary()

    def site_weights(self, server_round: int, replies: list[Message]) -> list[float]:
        sizes = [metric(r, self.weighted_by_key) for r in replies]
        drops = [max(0.0, metric(r, "loss-before") - metric(r, "loss-after")) for r in replies]
        for reply in replies:
            past = self.history.setdefault(site_of(reply), [])
            past.append(metric(reply, "loss-after"))
            del past[: -self.window]
        integrals = [max(0.0, sum(self.history[site_of(r)])) for r in replies]
        return mix([(self.alpha, sizes), (self.beta, drops), (self.gamma, integrals)])

    # --- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {"history": {site: list(losses) for site, losses in self.history.items()}}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.history = {str(site): [float(x) for x in losses] for site, losses in meta.get("history", {}).items()}
