"""`resfcn2d`: the residual fully convolutional 2D network of the hierarchical-Dice seed paper.

The paper's best network is a "Residual U-Net" on axial slices: U-Net's pairs of convolutions replaced by
residual stacks of two convolutions (Fig. 7), max-pooling down, concatenation skips, a 5-way softmax over
the labels, trained with the hierarchical Dice loss: P(WT) = NCR + ED + ET, P(TC) = NCR + ET,
P(ET) = ET, the mean of the three soft Dice losses (`losses.HierarchicalDiceLoss`). Here, as in every
model of the house (`blocks`): GroupNorm (8 groups) instead of the paper's BatchNorm, bilinear upsampling
+ 1x1 conv instead of transposed convolution, activations not in place; 4 labels (background, NCR, ED,
ET: our label sets have no separate non-enhancing label).

`ResidualFCN2d` is the 2D network (`[N, 4, X, Y]` -> label logits `[N, 4, X, Y]`); the registered
`ResFCN2d` runs it on every axial slice (`slicewise.Slicewise`) and speaks the pipeline's contract:
training mode returns the label logits `[B, 4, X, Y, Z]` its `training_loss` reads; eval mode returns
region logits `[B, 3, X, Y, Z]` (ET, TC, WT), the logit of the hierarchical probabilities clamped to
[1e-6, 1 - 1e-6], so the usual sigmoid gives them back and ET <= TC <= WT holds voxel by voxel.

Size: width 16, depth 4 (channels 16..128) has 472,840 parameters; width 32, depth 5 (the default,
channels 32..512) has 7,591,944 (2D kernels: about a third of `resunet` at the same size); tests use
width 8, depth 2-3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.constants import MODALITIES, REGIONS
from fedbrats.shared.models.blocks import check_architecture, make_activation, make_norm
from fedbrats.shared.models.losses import DICE_SMOOTH, HierarchicalDiceLoss, hierarchical_probabilities
from fedbrats.shared.models.registry import register_model
from fedbrats.shared.models.slicewise import Slicewise

#: Label logits of the softmax head: background, NCR (necrotic/non-enhancing core), ED (edema), ET.
LABEL_CHANNELS = ("background", "NCR", "ED", "ET")
#: Region probabilities are clamped to [EPS, 1 - EPS] before the logit (finite in fp32).
EPS = 1e-6


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution, padding 1; no bias because a GroupNorm follows."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class SEBlock2d(nn.Module):
    """Squeeze-and-excitation on a 2D feature map (per slice), as `blocks.SEBlock` in 3D."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.excite = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(x)


class ResidualBlock2d(nn.Module):
    """The paper's residual stack: conv-norm-act-(dropout)-conv-norm (+SE), plus a shortcut, then act."""

    def __init__(self, in_channels: int, out_channels: int, *, act: str = "leakyrelu", dropout: float = 0.0,
                 se: bool = False):  # fmt: skip
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm1 = make_norm(out_channels)
        self.act1 = make_activation(act)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2 = make_norm(out_channels)
        self.se = SEBlock2d(out_channels) if se else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), make_norm(out_channels)
            )
        self.act2 = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.act1(self.norm1(self.conv1(x))))
        y = self.se(self.norm2(self.conv2(y)))
        return self.act2(y + self.shortcut(x))


class UpBlock2d(nn.Module):
    """Decoder step: 1x1 conv to the skip's width, bilinear x2, concat with the skip, residual block
    (the conv runs first, at the coarse size: both are linear and commute, as in `blocks.UpBlock`)."""

    def __init__(self, in_channels: int, skip_channels: int, **opts):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, 1, bias=False)
        self.block = ResidualBlock2d(2 * skip_channels, skip_channels, **opts)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([skip, x], dim=1))


class ResidualFCN2d(nn.Module):
    """Residual 2D U-Net: `[N, in_channels, X, Y]` -> label logits `[N, 4, X, Y]`.

    Encoder: a residual stack at full resolution, then per level a 2x2 max-pooling and a residual stack
    (channels width, 2 width, ..., width 2^(depth-1)); decoder: one `UpBlock2d` per level; 1x1 head.
    """

    def __init__(self, in_channels: int = len(MODALITIES), width: int = 32, depth: int = 5, *,
                 dropout: float = 0.0, act: str = "leakyrelu", se: bool = False):  # fmt: skip
        super().__init__()
        channels = [width * 2**level for level in range(depth)]
        opts = {"act": act, "dropout": dropout, "se": se}
        self.encoder = nn.ModuleList([ResidualBlock2d(in_channels, channels[0], **opts)])
        self.encoder.extend(ResidualBlock2d(channels[i - 1], channels[i], **opts) for i in range(1, depth))
        self.decoder = nn.ModuleList(
            UpBlock2d(channels[i], channels[i - 1], **opts) for i in range(depth - 1, 0, -1)
        )
        self.head = nn.Conv2d(channels[0], len(LABEL_CHANNELS), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)


def region_logits(label_logits: torch.Tensor) -> torch.Tensor:
    """Region logits [B, 3, ...] (ET, TC, WT) whose sigmoid is the hierarchical probabilities (fp32)."""
    probabilities = hierarchical_probabilities(label_logits.float())
    return torch.logit(probabilities, eps=EPS)


@register_model("resfcn2d")
class ResFCN2d(Slicewise):
    """The paper's residual 2D U-Net on every axial slice; label logits in training, region logits in eval.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: region outputs in eval mode; must be 3 (ET, TC, WT), derived from the 4 label logits.
        width: channels at full resolution; a multiple of 8 (GroupNorm with 8 groups).
        depth: resolution levels including the full one; in-plane sizes must be multiples of 2^(depth-1).
        dropout: channel dropout inside every residual stack (0 disables; DP-SGD needs 0).
        act: "leakyrelu" (slope 0.01) or "relu".
        se: squeeze-and-excitation in every residual stack.
    """

    def __init__(
        self,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        width: int = 32,
        depth: int = 5,
        dropout: float = 0.0,
        act: str = "leakyrelu",
        se: bool = False,
    ):
        check_architecture(width, depth, dropout, act)
        if out_channels != len(REGIONS):
            raise ValueError(f"out_channels must be {len(REGIONS)} (ET, TC, WT from the hierarchical "
                             f"probabilities), got {out_channels}")  # fmt: skip
        net = ResidualFCN2d(in_channels, width, depth, dropout=dropout, act=act, se=se)
        super().__init__(net, in_channels, size_multiple=2 ** (depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = super().forward(x)
        return labels if self.training else region_logits(labels)

    @staticmethod
    def training_loss(outputs: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """The hierarchical Dice loss on label logits (training mode); on eval-mode region logits (e.g.
        `client.trainer.loss_on`) the same soft Dice of the same probabilities, recovered by the sigmoid."""
        if outputs.shape[1] == len(LABEL_CHANNELS):
            return _hierarchical_dice()(outputs, regions)
        if outputs.shape[1] != len(REGIONS):
            raise ValueError(f"expected label logits [B, 4, ...] or region logits [B, 3, ...], "
                             f"got {tuple(outputs.shape)}")  # fmt: skip
        return _region_dice()(torch.sigmoid(outputs.float()), regions.float())


_LOSSES: dict[str, nn.Module] = {}


def _hierarchical_dice() -> nn.Module:
    if "hierarchical" not in _LOSSES:
        _LOSSES["hierarchical"] = HierarchicalDiceLoss()
    return _LOSSES["hierarchical"]


def _region_dice() -> nn.Module:
    """The soft Dice that `HierarchicalDiceLoss` applies to its probabilities."""
    if "dice" not in _LOSSES:
        from monai.losses import DiceLoss

        _LOSSES["dice"] = DiceLoss(smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)
    return _LOSSES["dice"]
