"""Case-level classifiers (tumor grade, MGMT, any label per case) and a head for multi-task U-Nets.

- `resclassifier`: the residual encoder of our U-Net (same `ResidualBlock`s, GroupNorm, strided
  convolutions) followed by `ClassificationHead`. Any input size works (global average pooling).
- `densenet121`: MONAI's 3D DenseNet121, the model of the FeTS Task 1 classification plan, built
  with GroupNorm (8 groups) and non-in-place ReLU so that DP-SGD can train it: every registered
  model is DP-valid (tests/test_models.py checks it). We build it with GroupNorm rather than
  registering MONAI's BatchNorm original and converting it with Opacus' `ModuleValidator.fix`: the
  architecture is then the same with DP on or off, checkpoints load into either, and nothing is
  rewritten behind the user's back. `dp_problem(model)` says what keeps any other model (e.g. a
  BatchNorm DenseNet built by hand) out of DP-SGD.
- `ClassificationHead`: global average pooling + linear, to put on any feature map, e.g. the
  bottleneck of `ResUNet` (`unet.encoder[-1]`'s output, `width * 2**(depth-1)` channels).
- `ProfileHead`: the multi-task U-Nets' other head (`class_head = "profile"`): a linear score on the
  segmented tumour's label fractions and intensities (`tumour_profile`), detached from the segmentation.

Every classifier returns logits `[B, n_classes]`; binary tasks use `n_classes=2` (softmax; the score
of class 1 is the positive score the metrics in `evaluation.classification` take).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.models.blocks import NORM_GROUPS, ResidualBlock, make_activation
from fedbrats.shared.models.registry import register_model


class ClassificationHead(nn.Module):
    """Feature map `[B, C, x, y, z]` -> class logits `[B, n_classes]`: global average pool, dropout, linear.

    No normalisation and no buffers, so it is valid under Opacus and adds only C * n_classes + n_classes
    parameters to the network it is attached to.
    """

    def __init__(self, in_channels: int, n_classes: int = 2, dropout: float = 0.0):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2 (binary tasks use 2 logits), got {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_channels, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 5 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a feature map [B, {self.in_channels}, x, y, z], got shape {tuple(features.shape)}"
            )
        return self.linear(self.dropout(self.pool(features).flatten(1)))


#: Heads a multi-task U-Net can put its class logits on (`class_head`, run-config key `model-class-head`).
CLASS_HEADS = ("bottleneck", "profile")
#: Names of the `tumour_profile` features, in order (4 modalities: t1, t1ce, t2, flair).
PROFILE_FEATURES = (
    "ET/WT", "NCR/WT", "ED/WT", "ET/TC",
    *(f"{m}_in_TC" for m in MODALITIES), *(f"{m}_in_ED" for m in MODALITIES),
)  # fmt: skip
_EPS = 1e-6
#: Scale of the profile features inside `ProfileHead`: Adam moves a weight by about the learning rate per
#: step whatever the gradient, and a federation gives the head ~100 steps (12 demo rounds) at lr 1e-3, where
#: a logistic score on these features needs weights of order 1-10. x10 is 10x the head's effective rate
#: (on features fixed from a trained model: test AUC 0.77-0.84 at gain 1, 0.85-0.88 at 10, logistic fit 0.90).
PROFILE_GAIN = 10.0


def tumour_profile(image: torch.Tensor, region_probabilities: torch.Tensor) -> torch.Tensor:
    """Features [B, 12] of the segmented tumour (PROFILE_FEATURES): the label fractions and the
    mean intensity of each modality in the core and in the edema, from region probabilities [B, 3, ...]
    (ET, TC, WT: nested) and the image [B, 4, ...] they were predicted from.

    The radiological signs of grade (enhancement, a fluid centre, edema extent) are what a segmentation
    model learns anyway; reading them from its output takes a handful of weights to learn, not a CNN.
    Fractions and means depend neither on the voxel size nor on how much brain the patch shows around
    the tumour (absolute volumes would; the grades' sizes hardly differ anyway).
    """
    if region_probabilities.ndim != 5 or region_probabilities.shape[1] != 3:
        raise ValueError(f"expected region probabilities [B, 3 (ET, TC, WT), x, y, z], got "
                         f"{tuple(region_probabilities.shape)}")  # fmt: skip
    if image.shape[0] != region_probabilities.shape[0] or image.shape[2:] != region_probabilities.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and region probabilities "
                         f"{tuple(region_probabilities.shape)} do not match")  # fmt: skip
    p = region_probabilities.float().flatten(2)
    x = image.float().flatten(2)
    et = p[:, 0]
    tc = torch.maximum(p[:, 1], et)  # nested even where a model's regions are not (resunet's sigmoids)
    wt = torch.maximum(p[:, 2], tc)
    ncr, ed = tc - et, wt - tc
    v_et, v_tc, v_wt, v_ncr, v_ed = (v.sum(1) for v in (et, tc, wt, ncr, ed))

    def mean_in(weight: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        return (x * weight[:, None]).sum(2) / (volume[:, None] + _EPS)

    fractions = torch.stack([v_et, v_ncr, v_ed], dim=1) / (v_wt[:, None] + _EPS)
    scalars = torch.cat([fractions, (v_et / (v_tc + _EPS))[:, None]], dim=1)
    return torch.cat([scalars, mean_in(tc, v_tc), mean_in(ed, v_ed)], dim=1)


class ProfileHead(nn.Module):
    """Class logits from the segmented tumour's profile (`tumour_profile`): one linear layer.

    It reads the segmentation and never writes into it: the probabilities are detached, so the class
    loss trains these 12 x n_classes + n_classes weights only and the segmentation trains exactly as
    without a head. The weights start at zero (every class equally likely, no random direction to
    unlearn) and the features are scaled by PROFILE_GAIN. Valid under Opacus (a Linear layer, no buffers).
    """

    def __init__(self, n_classes: int = 2, in_channels: int = len(MODALITIES)):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2 (binary tasks use 2 logits), got {n_classes}")
        if in_channels != len(MODALITIES):
            raise ValueError(f"the profile head reads the {len(MODALITIES)} modalities {MODALITIES}, "
                             f"got in_channels={in_channels}")  # fmt: skip
        self.linear = nn.Linear(len(PROFILE_FEATURES), n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, image: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
        profile = tumour_profile(image.detach(), torch.sigmoid(region_logits.detach()))
        return self.linear(PROFILE_GAIN * profile)


def make_class_head(kind: str, bottleneck_channels: int, n_classes: int) -> nn.Module | None:
    """The class head a multi-task U-Net builds (`kind` in CLASS_HEADS); None when `n_classes` is 0."""
    if kind not in CLASS_HEADS:
        raise ValueError(f"class_head must be one of {', '.join(CLASS_HEADS)}, got {kind!r}")
    if not n_classes:
        return None
    return ProfileHead(n_classes) if kind == "profile" else ClassificationHead(bottleneck_channels, n_classes)


def head_logits(
    head: nn.Module, image: torch.Tensor, bottleneck: torch.Tensor, regions: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Class logits of a multi-task U-Net's head: from the bottleneck, or from the full-resolution region
    logits `regions()` (asked for only by a profile head) and the input image."""
    return head(image, regions()) if isinstance(head, ProfileHead) else head(bottleneck)


@register_model("resclassifier")
class ResClassifier(nn.Module):
    """Residual 3D classifier: a residual stem, `depth - 1` strided residual blocks, a classification head.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        n_classes: output logits (2 for a binary label such as the grade).
        width: channels of the stem; doubled at each strided block. A multiple of 8 (GroupNorm).
        depth: resolution levels including the full one (the input is halved depth - 1 times).
        dropout: dropout of the pooled features before the linear layer (0 disables).
        act: "leakyrelu" (slope 0.01) or "relu".
        se: squeeze-and-excitation in every residual block.

    Width 16, depth 4 (channels 16..128) has 892 k parameters; tests use width 8, depth 2.
    """

    def __init__(
        self,
        in_channels: int = len(MODALITIES),
        n_classes: int = 2,
        width: int = 16,
        depth: int = 4,
        dropout: float = 0.0,
        act: str = "leakyrelu",
        se: bool = False,
    ):
        super().__init__()
        if width < NORM_GROUPS or width % NORM_GROUPS:
            raise ValueError(
                f"width must be a positive multiple of {NORM_GROUPS} (GroupNorm groups), got {width}"
            )
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        make_activation(act)  # fail early on an unknown name
        self.in_channels = in_channels
        channels = [width * 2**level for level in range(depth)]
        opts = {"act": act, "se": se}
        blocks = [ResidualBlock(in_channels, channels[0], **opts)]
        blocks += [ResidualBlock(channels[i - 1], channels[i], stride=2, **opts) for i in range(1, depth)]
        self.encoder = nn.Sequential(*blocks)
        self.head = ClassificationHead(channels[-1], n_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, X, Y, Z], got shape {tuple(x.shape)}")
        return self.head(self.encoder(x))


@register_model("densenet121")
def densenet121(in_channels: int = len(MODALITIES), n_classes: int = 2, dropout: float = 0.0) -> nn.Module:
    """MONAI's 3D DenseNet121 with GroupNorm (8 groups): 11.3 M parameters for 4 inputs and 2 classes.

    Inputs of at least 32 voxels a side (it halves them five times). For MONAI's BatchNorm original
    (non-private training only) build `monai.networks.nets.DenseNet121` yourself; `dp_problem` names
    what keeps such a model out of DP-SGD.
    """
    from monai.networks.nets import DenseNet121  # heavy import: paid only by runs that use it

    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (binary tasks use 2 logits), got {n_classes}")
    return DenseNet121(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=n_classes,
        act=("relu", {"inplace": False}),  # in-place activations break Opacus' backward hooks
        norm=("group", {"num_groups": NORM_GROUPS}),
        dropout_prob=dropout,
    )


def dp_problem(model: nn.Module) -> str | None:
    """Why DP-SGD (Opacus) cannot train `model` as it is (e.g. BatchNorm mixes the samples of a
    batch, so a per-sample gradient does not exist), or None when it can."""
    from opacus.validators import ModuleValidator

    from fedbrats.shared.models.slicewise import register_dp_check

    register_dp_check()  # what Opacus cannot see in slice-wise 2D models (dropout under vmap)
    errors = [  # eval mode is a state, not a reason: training switches it
        e
        for e in ModuleValidator.validate(model, strict=False)
        if "needs to be in training mode" not in str(e)
    ]
    if not errors:
        return None
    counts: dict[str, int] = {}
    for error in errors:  # Opacus explains at length; the first sentence names the problem
        first = str(error).split(". ")[0].rstrip(".")
        counts[first] = counts.get(first, 0) + 1
    name = getattr(model, "model_name", type(model).__name__)
    problems = "; ".join(f"{text} ({n} module{'s' if n > 1 else ''})" for text, n in counts.items())
    return (
        f"model {name!r} cannot be trained with DP-SGD: {problems}; use a GroupNorm model "
        "(e.g. the registered densenet121) or convert it with opacus.validators.ModuleValidator.fix"
    )
