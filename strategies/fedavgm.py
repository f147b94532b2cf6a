"""FedAvgM (server momentum) on our weighted mean, the momentum step fused into its single pass.

Hsu et al., "Measuring the effects of non-identical data distribution for federated visual
classification" (arXiv:1909.06335), in Flower's form (``flwr.serverapp.strategy.FedAvgM``, following
PyTorch's SGD): pseudo-gradient ``g = x - avg``, velocity ``v = mu v + g`` (the first round's ``v = g``),
``x_new = x - lr v``. Flower's class copies every update, averages them, then makes four more
model-sized arrays for the step (7x one pass over the updates, 4.4 models of extra memory); here each
block of the weighted mean gets the step while it is in cache. Same operations as Flower's, so the
result differs from Flower's only by the weighted mean's float32 rounding (``arithmetic.weighted_average``).
Registered (``fedavgm``, ``fets_fedavgm``) in ``flower.py`` with the other Flower names.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Message

from fedbrats.strategies.arithmetic import BlockFinish, cast_like, record_views, weighted_average
from fedbrats.strategies.base import ReweightedFedAvg

log = logging.getLogger("fedbrats.strategies")


class BlockwiseFedAvgM(ReweightedFedAvg):
    """FedAvgM with its velocity checkpointed by array name.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Server step size ``lr``.
    server_momentum : float (default: 0.0)
        Momentum ``mu``; 0 keeps no velocity (then ``lr`` alone scales the step, as in Flower).

    The model the step starts from is the one sent to the sites in this round (``configure_train``),
    so a resumed run needs only the velocity.
    """

    #: FeTS's FedAvgM starts the velocity at zero after a plain FedAvg first round (``FetsFedAvgM``).
    zero_first_velocity = False

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_learning_rate = float(server_learning_rate)
        self.server_momentum = float(server_momentum)
        self.server_opt = self.server_momentum != 0.0 or self.server_learning_rate != 1.0
        self.momentum: dict[str, np.ndarray] | None = None  # velocity per (floating-point) array name

    def summary(self) -> None:
        log.info("%s: server learning rate %.3g, momentum %.3g", type(self).__name__, self.server_learning_rate,
                 self.server_momentum)
        super().summary()

    def combine(self, server_round: int, replies: list[Message], weights: list[float]) -> dict[str, np.ndarray]:
        updates = [record_views(r.content[self.arrayrecord_key]) for r in replies]
        if not self.server_opt:
            return weighted_average(updates, weights)
        start = self.global_views()
        if self.momentum is None and self.zero_first_velocity:  # FeTS: plain FedAvg, then v = 0
            average = weighted_average(updates, weights)
            self.momentum = {n: np.zeros_like(x) for n, x in start.items() if x.dtype.kind == "f"}
            return average
        first = self.momentum is None
        if first and self.server_momentum > 0.0:
            self.momentum = {n: np.empty_like(x) for n, x in start.items() if x.dtype.kind == "f"}
        result = weighted_average(updates, weights, self._step({n: np.ravel(x) for n, x in start.items()}, first))
        for name, x in start.items():  # integer buffers (step counters): Flower's step, unfused and rounded
            if x.dtype.kind != "f":
                result[name] = cast_like(np.asarray(x - self.server_learning_rate * (x - result[name])), x)
        return result

    def _step(self, start: dict[str, np.ndarray], first: bool) -> BlockFinish:
        lr, mu = self.server_learning_rate, self.server_momentum
        velocity = {name: np.ravel(v) for name, v in (self.momentum or {}).items()}  # views
        scratch: list[np.ndarray] = []

        def step(name: str, where: slice, block: np.ndarray) -> None:
            """``block`` holds avg; it becomes ``x - lr v`` with ``v = mu v + (x - avg)``, as Flower computes it."""
            x = start[name][where]
            if not scratch or scratch[0].size < block.size or scratch[0].dtype != block.dtype:
                scratch[:] = [np.empty(block.size, block.dtype)]
            gradient = scratch[0][: block.size]
            np.subtract(x, block, out=gradient)  # Flower: old - new
            if mu > 0.0:
                v = velocity[name][where]
                if first:
                    np.copyto(v, gradient)
                else:
                    v *= mu  # Flower: mu * mv + pg
                    v += gradient
                gradient = v
            np.multiply(gradient, lr, out=block)
            np.subtract(x, block, out=block)  # Flower: old - lr * pg

        return step

    # --- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if self.momentum is None:
            return {}, {"momentum_names": []}
        arrays = {f"momentum/{name}": np.ascontiguousarray(v) for name, v in self.momentum.items()}
        return arrays, {"momentum_names": list(self.momentum)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        names = list(meta.get("momentum_names", []))
        self.momentum = {name: np.array(arrays[f"momentum/{name}"]) for name in names} or None


class FetsFedAvgM(BlockwiseFedAvgM):
    """FedAvgM as shipped in the FeTS challenge (``FedAvgM_Selection``, Isik-Polat et al., FeTS 2021).

    Not identical to Flower's FedAvgM with the same momentum: FeTS's first round is plain FedAvg and
    starts the velocity at zero, while Flower's first round already seeds the velocity with that
    round's pseudo-gradient. From round 2 both apply ``v = mu v + (x - avg)``, ``x -= lr v``.
    """

    zero_first_velocity = True
