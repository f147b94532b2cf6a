"""Segmentation models by name: `create_model("resunet", width=8, depth=3)`.

A registry (like Opacus' `create_accountant`) so the run config, checkpoints and the CLI name a
model by string. Every model takes `[B, 4, *patch]` (MODALITIES order) and returns logits
`[B, 3, *patch]` in REGIONS order (ET, TC, WT; sigmoid applied outside); with deep supervision in
training mode it returns a list whose first item is the full-resolution logits.

Every created model carries `model.model_name` and `model.config` (the full constructor keyword
arguments, defaults filled in), so `create_model(model.model_name, **model.config)` rebuilds the
same architecture and a checkpoint can store both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: Model used when the run config names none.
DEFAULT_MODEL = "resunet"


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator: make it available to `create_model(name, **config)`."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **config: Any) -> nn.Module:
    """Build a registered model; unknown names and unknown config keys raise ValueError naming the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    factory = _REGISTRY[name]
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


# Importing the architecture modules registers them.
from shared.models import resunet  # noqa: E402,F401
from shared.models.resunet import ResUNet  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "ResUNet",
    "available_models",
    "count_parameters",
    "create_model",
    "register_model",
]
