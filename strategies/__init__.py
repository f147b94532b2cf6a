"""Aggregation strategies, built by name from the run configuration.

Flower's message strategies are used as they are; our loop in `server.federation` does the
node selection, update checks and bookkeeping, and asks the strategy only to configure
messages and aggregate replies. A strategy's parameters come from ``strategy_params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

StrategyFactory = Callable[..., Strategy]
_REGISTRY: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    def add(factory: StrategyFactory) -> StrategyFactory:
        _REGISTRY[name] = factory
        return factory

    return add


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def build_strategy(name: str, params: dict[str, float] | None = None) -> Strategy:
    """Create strategy `name`.

    Site selection and the minimum-sites rule live in our round loop, which hands the strategy
    only the selected sites; so the strategy's own node minimums are 1 and its fractions 1.0.
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    common: dict[str, Any] = {
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    try:
        return _REGISTRY[key](**common, **(params or {}))
    except TypeError as err:
        raise ValueError(f"bad parameters {params} for strategy {name!r}: {err}") from err


register_strategy("fedavg")(FedAvg)
register_strategy("fedprox")(FedProx)

# Our strategies and the rest of Flower's register themselves on import (they need the registry above).
from strategies import (  # noqa: E402, F401
    fedbn,
    fedcostwavg,
    fednova,
    fedpidavg,
    fets_clipped,
    flower,
    scaffold,
)
