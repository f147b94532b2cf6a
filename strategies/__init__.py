"""Aggregation strategies, built by name from the run configuration.

Flower's message strategies are used as they are; our round loop in ``fedbrats.server.federation``
does the site selection, update checks and bookkeeping, and asks the strategy to configure
messages and aggregate replies, plus the round-loop hooks of ``fedbrats.strategies.hooks``
(checkpoint state, per-reply checks, minimum replies, the metrics it needs, its instructions in
each round's config). A strategy's parameters come from ``strategy_params`` (``--set strategy-<p>=V``).

Adding a strategy (details in ``strategies/README.md``):

1. one file per algorithm here; subclass ``ReweightedFedAvg`` (``base.py``) when only the site
   weights or the merge differ, else a Flower ``Strategy``, with ``StrategyHooks`` first among the
   bases; override only the hooks that differ from the defaults;
2. register it: ``@register_strategy("name")`` (``fedbrats.strategies.registry``) on the class or a
   factory taking keyword parameters (floats) plus Flower's node minimums; a taken name is refused;
   document the parameters in a numpy-style ``Parameters`` block;
3. import the module below, so registration happens on ``import fedbrats.strategies``;
4. tests in ``tests/test_strategies.py``: hand-computed result on tiny arrays, and, if it keeps
   state, a resume test (``test_a_resumed_strategy_continues_identically``). The hooks test there
   covers every registered name already.
"""

# Importing the strategy modules registers them.
from fedbrats.strategies import (  # noqa: F401
    fedavg,
    fedbn,
    fedcostwavg,
    fednova,
    fedpidavg,
    fets_clipped,
    flower,
    scaffold,
)
from fedbrats.strategies.hooks import RoundHooks, StrategyHooks, hooks_of
from fedbrats.strategies.registry import STRATEGIES, available_strategies, build_strategy, register_strategy

__all__ = [
    "STRATEGIES", "RoundHooks", "StrategyHooks", "available_strategies", "build_strategy", "hooks_of",
    "register_strategy",
]  # fmt: skip
