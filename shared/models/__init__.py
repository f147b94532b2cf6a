"""Segmentation models by name: `create_model("resunet", width=8, depth=3)`.

A registry (like Opacus' `create_accountant`) so the run config, checkpoints and the CLI name a
model by string. Every model takes `[B, 4, *patch]` (MODALITIES order) and returns logits
`[B, 3, *patch]` in REGIONS order (ET, TC, WT; sigmoid applied outside) in eval mode; in training
mode a model may return more (deep-supervision list, slice logits, label logits) that its own
`training_loss` reads.

Every created model carries `model.model_name` and `model.config` (the full constructor keyword
arguments, defaults filled in), so `create_model(model.model_name, **model.config)` rebuilds the
same architecture and a checkpoint can store both.
"""

# Importing a model module registers its models: ours, and the seed papers' networks (issue 13).
from fedbrats.shared.models import (  # noqa: F401
    bifpn,
    classifier,
    resfcn2d,
    resunet,
    selfensemble,
    tunet,
    unetpp,
)
from fedbrats.shared.models.registry import (
    DEFAULT_MODEL,
    MODELS,
    available_models,
    count_parameters,
    create_model,
    register_model,
)
from fedbrats.shared.models.resunet import ResUNet

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ResUNet",
    "available_models",
    "count_parameters",
    "create_model",
    "register_model",
]
