"""The strategy registry: strategies by name, built with our round loop's node minimums."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedbrats.shared.registry import Registry

StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator: make a strategy class or factory available to `build_strategy(name)`."""
    return STRATEGIES.register(name)


def available_strategies() -> list[str]:
    return STRATEGIES.names()


def build_strategy(name: str, params: dict[str, float] | None = None) -> Strategy:
    """Create strategy `name`.

    Site selection and the minimum-sites rule live in our round loop, which hands the strategy
    only the selected sites; so the strategy's own node minimums are 1 and its fractions 1.0.
    """
    factory = STRATEGIES.get(name)
    common: dict[str, Any] = {
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    try:
        return factory(**common, **(params or {}))
    except TypeError as err:
        raise ValueError(f"bad parameters {params} for strategy {name!r}: {err}") from err

