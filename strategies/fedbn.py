"""FedBN: each site keeps its own normalisation layers; everything else is federated.

Li et al., "FedBN: federated learning on non-IID features via local batch normalization",
ICLR 2021 (arXiv:2102.07623). Scanner and protocol differences between hospitals shift intensity
statistics; letting every site keep its normalisation affine parameters absorbs that shift.

The server side is FedAvg plus ``"fedbn": True`` in the train and evaluate configs: the server
still averages the normalisation parameters (harmless, nobody uses the average), and each site
overwrites them with its own before training and before evaluation. The helpers below are pure
and shared by the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedbrats.strategies.hooks import StrategyHooks
from fedbrats.strategies.registry import register_strategy

log = logging.getLogger("fedbrats.strategies")

#: Fallback when only names are known: ``norm1.weight``, ``gn.bias``, ``bn2.running_mean``, ``ln.weight`` ...
#: It does NOT catch norms inside a Sequential (our ResUNet's ``shortcut.1.weight``): prefer
#: ``norm_param_names(model)``, which looks at module types.
NORM_PATTERN = r"(^|\.)(norm\d*|gn\d*|bn\d*|ln\d*|groupnorm\d*|batchnorm\d*|instancenorm\d*|layernorm\d*)\.[^.]+$"

V = TypeVar("V")


def norm_param_names(model: Any) -> list[str]:
    """State-dict names of every tensor owned by a normalisation module (GroupNorm, BatchNorm,
    InstanceNorm, LayerNorm), found by module type, so any naming works."""
    import torch.nn as nn  # the server side of FedBN needs no torch

    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)  # _NormBase: batch and instance norms
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, norm_types):
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
            names += [prefix + n for n, _ in module.named_buffers(recurse=False)]
    return sorted(names)


def split_norm_params(
    names: Iterable[str], *, norm_names: Iterable[str] | None = None, pattern: str = NORM_PATTERN
) -> tuple[list[str], list[str]]:
    """``(norm_names, other_names)`` of `names`, in their order.

    `norm_names` (e.g. from ``norm_param_names(model)``) wins; otherwise `pattern` is matched
    against each name."""
    names = list(names)
    if norm_names is not None:
        chosen = set(norm_names)
        is_norm = [n in chosen for n in names]
    else:
        regex = re.compile(pattern)
        is_norm = [bool(regex.search(n)) for n in names]
    return [n for n, k in zip(names, is_norm, strict=True) if k], [n for n, k in zip(names, is_norm, strict=True) if not k]


def keep_local_norms(incoming: Mapping[str, V], local_norms: Mapping[str, V] | None) -> dict[str, V]:
    """The incoming global state with this site's own normalisation entries put back.

    `local_norms` is None on a site's first round (nothing kept yet): the global values are used.
    A kept name the global model lacks is an error (the architecture changed under the site)."""
    state = dict(incoming)
    if not local_norms:
        return state
    unknown = sorted(set(local_norms) - set(state))
    if unknown:
        raise ValueError(f"kept normalisation parameters not in the global model: {unknown[:5]}")
    state.update(local_norms)
    return state


@register_strategy("fedbn")
class FedBN(StrategyHooks, FedAvg):
    """FedAvg that tells sites to keep their own normalisation parameters (config ``"fedbn": True``).

    No parameters beyond FedAvg's. Without the client side (see module docstring) it is plain FedAvg.
    The flag travels in the round's train and evaluate configs (the ``train_config`` and
    ``evaluate_config`` hooks), which the round loop asks for every round.
    """

    required_metrics = ("num-examples",)

    def summary(self) -> None:
        log.info("FedBN: sites keep their own normalisation layers")
        super().summary()

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        config["fedbn"] = True
        return config

    def evaluate_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        config["fedbn"] = True
        return config
