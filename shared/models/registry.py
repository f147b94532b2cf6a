"""The model registry: build a registered model by name with its full configuration recorded."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fedbrats.shared.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: Model used when the run config names none: the self-ensemble U-Net (bag of tricks) closed the
#: federated ET gap on the phantom at resunet's size and cost (benchmarks/RESULTS.md, "The ET gap").
DEFAULT_MODEL = "selfensemble"


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator: make it available to `create_model(name, **config)`."""

    return MODELS.register(name)


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def create_model(name: str, **config: Any) -> nn.Module:
    """Build a registered model; unknown names and unknown config keys raise ValueError naming the known ones."""
    factory = MODELS.get(name)
    signature = inspect.signature(factory)
    accepted = [p for p in signature.parameters if p != "self"]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(config) - set(accepted))
    if unknown and not open_ended:
        raise ValueError(f"model {name!r} got unknown config key(s) {unknown}; accepted: {accepted}")
    bound = signature.bind(**config)
    bound.apply_defaults()
    model = factory(**config)
    model.model_name = name
    model.config = dict(bound.arguments)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
