"""From the run configuration to what a site trains: the one place RunConfig becomes a TrainConfig and a model.

The learning-rate schedule spans the whole run and its position is a function of the server round
only: round r starts at the sum of the steps of rounds 1 .. r-1, which a site can count itself (it
knows its number of training cases; with ``epoch-decay`` the epochs of each round follow
`strategies.selection.epochs_at`, as the server's round loop sends them). Nothing a discarded or
repeated round did can move it, and a second run at the same site starts at step 0 again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from fedbrats.client.trainer import TrainConfig
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.patch_pool import batches_per_pass, parse_patch_pool
from fedbrats.shared.models import create_model
from fedbrats.strategies.selection import epochs_at

__all__ = [
    "epochs_in_round", "model_for", "schedule_steps", "start_step", "steps_in_round", "steps_per_epoch", "train_config",
]  # fmt: skip


def model_for(config: RunConfig) -> nn.Module:
    """A freshly initialised model of the run (`config.model` with every constructor argument from the config)."""
    return create_model(config.model, **config.model_config)


def steps_per_epoch(config: RunConfig, n_cases: int) -> int:
    """Optimiser steps in one local epoch; under DP-SGD the int(1/q) Poisson steps Opacus counts."""
    if config.dp:
        from fedbrats.client.privacy import round_steps  # Opacus is paid for by DP sites only

        return round_steps(max(n_cases, 1), config.batch_size, epochs=1)
    if config.patch_pool:  # random patch size: about one pass over the cases per epoch
        return batches_per_pass(n_cases, parse_patch_pool(config.patch_pool))
    return max(1, math.ceil(n_cases / config.batch_size))


def epochs_in_round(config: RunConfig, server_round: int) -> int:
    """Local epochs of `server_round` (FeTS "train less each round"), as the server's round loop computes them."""
    return epochs_at(server_round, config.local_epochs, decay=config.epoch_decay)


def steps_in_round(config: RunConfig, n_cases: int, server_round: int) -> int:
    """Optimiser steps a site with `n_cases` training cases takes in `server_round`."""
    if config.local_steps > 0:
        return config.local_steps
    return epochs_in_round(config, server_round) * steps_per_epoch(config, n_cases)


def start_step(config: RunConfig, n_cases: int, server_round: int) -> int:
    """The schedule position at which `server_round` starts (0 in round 1), whatever happened before."""
    if server_round < 1:
        raise ValueError(f"rounds are counted from 1, got server round {server_round}")
    if config.local_steps > 0:
        return (server_round - 1) * config.local_steps
    return sum(steps_in_round(config, n_cases, r) for r in range(1, server_round))


def schedule_steps(config: RunConfig, n_cases: int) -> int:
    """Length of the whole schedule (every round of the run), so each site's lr reaches 0 at the last round."""
    return start_step(config, n_cases, config.rounds + 1)


def train_config(config: RunConfig, n_cases: int, round_config: Mapping[str, Any] | None = None) -> TrainConfig:
    """The local training settings of one round at a site with `n_cases` training cases.

    `round_config` is what the server sent (``server-round``, ``lr``, ``local-epochs``, ``proximal-mu``);
    its values override the run configuration's for this round. Without it: round 1.
    """
    sent = dict(round_config or {})
    server_round = int(sent.get("server-round", 1))
    epochs = None if config.local_steps > 0 else int(sent.get("local-epochs", epochs_in_round(config, server_round)))
    return TrainConfig(
        epochs=epochs,
        steps=config.local_steps or None,
        lr=float(sent.get("lr", config.lr)),
        warmup_steps=config.warmup_steps,
        schedule=config.lr_schedule,
        total_steps=schedule_steps(config, n_cases),
        batch_size=config.batch_size,
        seed=config.seed,
        proximal_mu=float(sent.get("proximal-mu", config.proximal_mu)),
        optimizer=config.local_optimizer,
        momentum=config.sgd_momentum,
        patch_pool=parse_patch_pool(config.patch_pool),
    )
