"""Aggregation strategies, built by name from the run configuration.

Flower's message strategies are used as they are; our loop in `server.federation` does the
node selection, update checks and bookkeeping, and asks the strategy only to configure
messages and aggregate replies. A strategy's parameters come from ``strategy_params``.
"""

# Importing the strategy modules registers them.
from fedbrats.strategies import (  # noqa: F401
    fedbn,
    fedcostwavg,
    fednova,
    fedpidavg,
    fets_clipped,
    flower,
    scaffold,
)
from fedbrats.strategies.registry import STRATEGIES, available_strategies, build_strategy, register_strategy

__all__ = ["STRATEGIES", "available_strategies", "build_strategy", "register_strategy"]
