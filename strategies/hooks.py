"""What our round loop asks of a strategy beyond Flower's ``Strategy``: one explicit interface.

Flower's ``Strategy`` configures messages and aggregates replies. Our loop
(``fedbrats.server.federation``) also checkpoints the strategy, drops one site's reply that the
strategy cannot use (instead of failing the round), refuses a round with fewer usable replies than
the strategy needs, and lets the strategy add its own instructions to the config each round sends.
Those needs are the `RoundHooks` protocol. Our strategies inherit `StrategyHooks` (the defaults)
and override what differs; Flower's built-ins get the same defaults through `hooks_of`, so the loop
calls methods and never probes a strategy with ``hasattr``.

The hooks, with their defaults:

- ``required_metrics``: metric names every training reply must carry (default: none beyond what
  Flower checks itself);
- ``min_replies``: the fewest usable replies the strategy can aggregate (default 1; Bulyan 4f + 3);
- ``reply_problem(reply)``: why this strategy cannot use a reply, or None (default: a missing or
  non-finite required metric);
- ``train_config(server_round, config)`` / ``evaluate_config(server_round, config)``: the config
  the selected sites receive this round; the loop fills in round, lr, epochs and steps, and a strategy
  adds its own instructions (FedBN's ``"fedbn"``, ``"report-loss"`` for loss-weighted averages);
- ``state_dict()`` / ``load_state_dict(arrays, meta)``: what a restarted server needs to continue
  identically (momentum, moments, loss history, control variate), as numpy arrays plus JSON meta.
  Stateless by default, and a stateless strategy refuses a checkpoint that carries state (a run
  resumed under another strategy would otherwise drop that state silently).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from fedbrats.strategies.arithmetic import missing_metrics

__all__ = ["HOOK_NAMES", "FlowerDefaults", "RoundHooks", "StrategyHooks", "hooks_of"]

StrategyState = tuple[dict[str, np.ndarray], dict[str, Any]]


@runtime_checkable
class RoundHooks(Protocol):
    """The round loop's view of a strategy (see the module docstring for each hook)."""

    @property
    def required_metrics(self) -> tuple[str, ...]: ...

    @property
    def min_replies(self) -> int: ...

    def reply_problem(self, reply: Message) -> str | None: ...

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord: ...

    def evaluate_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord: ...

    def state_dict(self) -> StrategyState: ...

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None: ...


#: The names a strategy must define, all together, to count as implementing `RoundHooks`.
HOOK_NAMES = ("required_metrics", "min_replies", "reply_problem", "train_config", "evaluate_config",
              "state_dict", "load_state_dict")  # fmt: skip


def _refuse_state(owner: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    if arrays or meta:
        found = sorted(arrays)[:3] + sorted(meta)[:3]
        raise ValueError(
            f"the checkpoint holds strategy state ({found}) but {owner} keeps none: "
            "was the run started with another strategy?"
        )


class StrategyHooks:
    """The defaults of `RoundHooks`, as a mixin: put it first among a strategy's bases.

    ``class MyAvg(StrategyHooks, FedAvg)`` and override only the hooks that differ."""

    required_metrics: tuple[str, ...] = ()
    min_replies: int = 1

    def reply_problem(self, reply: Message) -> str | None:
        return missing_metrics(reply, self.required_metrics) if self.required_metrics else None

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        return config

    def evaluate_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        return config

    def state_dict(self) -> StrategyState:
        return {}, {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        _refuse_state(type(self).__name__, arrays, meta)


class FlowerDefaults(StrategyHooks):
    """The default hooks for a strategy that has none of its own (Flower's built-ins)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        _refuse_state(type(self.strategy).__name__, arrays, meta)


def hooks_of(strategy: Strategy) -> RoundHooks:
    """The round-loop hooks of `strategy`: itself when it implements `RoundHooks`, else the defaults.

    A strategy that defines some hooks but not all is an error, not silently defaulted: its
    ``state_dict`` would otherwise never be checkpointed."""
    if isinstance(strategy, RoundHooks):
        return strategy
    partial = [name for name in HOOK_NAMES if hasattr(strategy, name)]
    if partial:
        missing = [name for name in HOOK_NAMES if name not in partial]
        raise TypeError(
            f"{type(strategy).__name__} defines {partial} but not {missing}: inherit "
            "fedbrats.strategies.hooks.StrategyHooks to get the defaults"
        )
    return FlowerDefaults(strategy)
