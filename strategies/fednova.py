"""FedNova: normalised averaging, so sites that take more local steps do not drag the model their way.

Wang et al., "Tackling the objective inconsistency problem in heterogeneous federated
optimization", NeurIPS 2020 (arXiv:2007.07481). With ``p_j = s_j/S`` and ``tau_j`` the site's local
steps: ``d_j = (x - x_j) / tau_j``, ``x_new = x - tau_eff * sum_j p_j d_j``, ``tau_eff = sum_j p_j tau_j``.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Message

from fedbrats.strategies.arithmetic import (
    metric,
    missing_metrics,
    normalise,
    record_views,
    weighted_average,
    weighted_sum,
)
from fedbrats.strategies.base import ReweightedFedAvg
from fedbrats.strategies.registry import register_strategy

log = logging.getLogger("fedbrats.strategies")


@register_strategy("fednova")
class FedNova(ReweightedFedAvg):
    """FedNova in its plain-SGD form (sites report ``local-steps``).

    With equal ``tau_j`` it is FedAvg (up to float rounding). The normalisation assumes each local step moves the
    model by a comparable amount, as plain SGD does; with Adam (our trainer's default) the step
    size adapts per parameter and ``1/tau_j`` only approximates the paper's normalisation vector,
    so treat FedNova with Adam as a heuristic. No parameters.
    """

    required_metrics = ("num-examples", "local-steps")

    def reply_problem(self, reply: Message) -> str | None:
        problem = missing_metrics(reply, self.required_metrics)
        if problem is None and metric(reply, "local-steps") <= 0:
            problem = f"local-steps must be > 0, got {metric(reply, 'local-steps')}"
        return problem

    def summary(self) -> None:
        log.info("FedNova: updates normalised by local-steps")
        super().summary()

    def combine(self, server_round: int, replies: list[Message], weights: list[float]) -> dict[str, np.ndarray]:
        start = self.global_views()
        shares = normalise(weights)
        steps = [metric(r, "local-steps") for r in replies]
        tau_eff = sum(p * tau for p, tau in zip(shares, steps, strict=True))
        # x - tau_eff * sum_j p_j (x - x_j) / tau_j  ==  (1 - tau_eff Q) x + sum_j tau_eff q_j x_j
        # with q_j = p_j / tau_j and Q = sum_j q_j: one weighted sum, the global model one more term
        q = [p / tau for p, tau in zip(shares, steps, strict=True)]
        updates = [record_views(r.content[self.arrayrecord_key]) for r in replies]
        floats = [name for name, x in start.items() if x.dtype.kind == "f"]
        stepped = weighted_sum([{n: start[n] for n in floats}] + [{n: u[n] for n in floats} for u in updates],
                               [1.0 - tau_eff * sum(q)] + [tau_eff * qj for qj in q])
        others = [name for name in start if name not in stepped]
        averaged = weighted_average([{n: u[n] for n in others} for u in updates], q) if others else {}
        return {name: stepped[name] if name in stepped else averaged[name] for name in start}  # integers: averaged
