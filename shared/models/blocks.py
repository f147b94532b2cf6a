"""Shared 3D building blocks: residual block, squeeze-and-excitation, up block, the residual U-Net's encoder
and decoder and its input check.

Every architecture in `shared.models` is composed from these, in the manner of MONAI's BasicUNet
(`TwoConv`, `Down`, `UpCat`), so the choices that matter for federated and private training live
in one place:

- GroupNorm, never BatchNorm: batch statistics break with batches of 1-2 patches and Opacus
  refuses them (a per-sample gradient cannot depend on the other samples of the batch);
- trilinear upsampling followed by a convolution, never transposed convolution (checkerboard-free
  and a plain conv for the per-sample gradient machinery);
- activations not in place: Opacus' backward hooks see module outputs as views, and an in-place
  op on them is an autograd error during DP training;
- no buffers, so every entry of `state_dict()` is a trainable parameter (DP wrappers on the server
  clip and noise every array they receive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Groups of every GroupNorm (DESIGN section 4); channel counts must be multiples of it.
NORM_GROUPS = 8

ACTIVATIONS = ("leakyrelu", "relu")


def make_activation(name: str) -> nn.Module:
    """The non-linearity by name ("leakyrelu" with slope 0.01, or "relu")."""
    if name == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def make_norm(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm with `groups` groups; refuses channel counts it cannot split evenly."""
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by {groups} groups, got {channels} channels")
    return nn.GroupNorm(groups, channels)


def conv3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    """3x3x3 convolution, padding 1; no bias because a GroupNorm follows."""
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): reweight channels by a gate from their global means.

    Optional in the residual block (run-configuration key ``model-se``), as in the seed papers' TuNet
    cascade (DESIGN section 4, not built yet); cheap (2 C^2 / reduction parameters).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.squeeze = nn.AdaptiveAvgPool3d(1)
        self.excite = nn.Sequential(
            nn.Conv3d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv3d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(self.squeeze(x))


class ResidualBlock(nn.Module):
    """conv-norm-act-(dropout)-conv-norm (+SE), plus a projected shortcut, then act (He et al. 2016).

    `stride=2` makes it the downsampling step of an encoder level (a learned downsampling rather
    than max-pooling); the shortcut is then a strided 1x1 conv with its own GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        act: str = "leakyrelu",
        dropout: float = 0.0,
        se: bool = False,
    ):
        super().__init__()
        self.conv1 = conv3(in_channels, out_channels, stride)
        self.norm1 = make_norm(out_channels)
        self.act1 = make_activation(act)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3(out_channels, out_channels)
        self.norm2 = make_norm(out_channels)
        self.se = SEBlock(out_channels) if se else nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), make_norm(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.act1(self.norm1(self.conv1(x))))
        y = self.se(self.norm2(self.conv2(y)))
        return self.act2(y + self.shortcut(x))


class UpBlock(nn.Module):
    """Decoder step: trilinear x2 upsampling, 1x1 conv to the skip's width, concat, residual block.

    Like MONAI's `UpCat` with `upsample="nontrainable"`. A bias-free 1x1 conv and trilinear
    interpolation are both linear and commute exactly, so the conv runs first, at the coarse
    resolution (8x fewer voxels), with the same result as upsample-then-conv.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        act: str = "leakyrelu",
        dropout: float = 0.0,
        se: bool = False,
    ):
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, skip_channels, 1, bias=False)
        self.block = ResidualBlock(2 * skip_channels, out_channels, act=act, dropout=dropout, se=se)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.block(torch.cat([skip, x], dim=1))


def level_channels(width: int, depth: int) -> list[int]:
    """Channels of each resolution level of a U-Net: width, 2 width, ..., width 2^(depth-1)."""
    return [width * 2**level for level in range(depth)]


def residual_encoder(in_channels: int, channels: list[int], **opts) -> nn.ModuleList:
    """A residual stem at full resolution, then one stride-2 residual block per level (`resunet`'s encoder)."""
    encoder = nn.ModuleList([ResidualBlock(in_channels, channels[0], **opts)])
    for level in range(1, len(channels)):
        encoder.append(ResidualBlock(channels[level - 1], channels[level], stride=2, **opts))
    return encoder


def residual_decoder(channels: list[int], **opts) -> nn.ModuleList:
    """One `UpBlock` per level, coarsest first: decoder[i] brings level depth-1-i up to level depth-2-i."""
    return nn.ModuleList(
        UpBlock(channels[level], channels[level - 1], channels[level - 1], **opts)
        for level in range(len(channels) - 1, 0, -1)
    )


def encode(encoder: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every encoder level, full resolution first (the skips; the last is the bottleneck)."""
    skips = []
    for block in encoder:
        x = block(x)
        skips.append(x)
    return skips


class VolumeInput:
    """The input contract of a 3D U-Net with `self.depth` levels and `self.config["in_channels"]` modalities."""

    depth: int
    config: dict

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the shape when the input cannot pass through the U-Net."""
        in_channels = self.config["in_channels"]
        if x.ndim != 5 or x.shape[1] != in_channels:
            raise ValueError(f"expected input [B, {in_channels}, X, Y, Z], got shape {tuple(x.shape)}")
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(
                f"spatial sizes {tuple(x.shape[2:])} must be multiples of 2^(depth-1) = {self.size_multiple}"
            )


def check_architecture(width: int, depth: int, dropout: float, act: str, *, min_depth: int = 2,
                       depth_reason: str = "one downsampling") -> None:  # fmt: skip
    """Refuse a network size the blocks cannot build, naming the argument: one check for every model."""
    if width < NORM_GROUPS or width % NORM_GROUPS:
        raise ValueError(f"width must be a positive multiple of {NORM_GROUPS} (GroupNorm groups), got {width}")
    if depth < min_depth:
        raise ValueError(f"depth must be at least {min_depth} ({depth_reason}), got {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    make_activation(act)  # fail early on an unknown name
