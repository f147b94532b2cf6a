"""Segmentation models by name: `create_model("resunet", width=8, depth=3)`.

A registry (like Opacus' `create_accountant`) so the run config, checkpoints and the CLI name a
model by string. Every model takes `[B, 4, *patch]` (MODALITIES order) and returns logits
`[B, 3, *patch]` in REGIONS order (ET, TC, WT; sigmoid applied outside); with deep supervision in
training mode it returns a list whose first item is the full-resolution logits.

Every created model carries `model.model_name` and `model.config` (the full constructor keyword
arguments, defaults filled in), so `create_model(model.model_name, **model.config)` rebuilds the
same architecture and a checkpoint can store both.
"""

from fedbrats.shared.models import classifier, resunet  # noqa: F401  (register their models)
from fedbrats.shared.models import selfensemble, tunet  # noqa: F401  (seed papers: TuNet, bag-of-tricks U-Net)
from fedbrats.shared.models import bifpn, unetpp  # noqa: F401  (seed paper: UNet++ and BiFPN with slice branch)
from fedbrats.shared.models import resfcn2d  # noqa: F401  (seed paper: residual 2D FCN, hierarchical Dice)
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
