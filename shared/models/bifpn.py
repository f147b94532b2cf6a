"""The BiFPN network of the UNet++/BiFPN seed paper (section 2.1), with its slice-wise classification branch.

- Encoder: residual blocks of stride 2 (`blocks.ResidualBlock`), channels doubling: scales 1/2, 1/4, ...,
  1/2^(depth-1) (the paper's four at depth 5: 16..128 channels for a 16-channel width).
- Lateral 1x1 conv + GroupNorm to the pyramid's common width (4 x width; the paper uses 256 for width 16),
  then `bifpn_layers` BiFPN layers (EfficientDet, Tan et al. 2020): a top-down then a bottom-up path,
  each node a fast normalised fusion of its inputs, sum_i w_i I_i / (eps + sum_j w_j) with w = ReLU(raw),
  followed by a conv block. Down: max-pooling x2; up: trilinear x2.
- Decoder (the semantic branch of Panoptic FPN, Kirillov et al. 2019): each level goes through conv
  blocks (3x3x3 conv, GroupNorm, activation) each followed by trilinear x2 until it reaches half the input
  resolution; the levels are concatenated, a 1x1 conv gives the three region logits, trilinear x2 brings
  them to the input's size.
- Slice branch (`slice_branch`): reads the concatenated half-resolution features; conv block to the
  pyramid width, in-plane average, a transposed conv doubling the axial axis back to the input's slices,
  2 BiLSTM layers, three logits per slice (paper table 2). Training mode returns
  `(region logits, slice logits [B, 3, Z])`; eval mode region logits, with false-positive removal when
  `fp_removal` (an attribute that can be switched off after loading).

No transposed 3D convolution and no BatchNorm: GroupNorm throughout, trilinear upsampling, valid under
Opacus (the fusion weights sit in their own module taking one stacked input, as functorch needs).

Size: width 16, depth 4 has 2.51 M parameters with the branch (2.00 M without); width 16, depth 5 (the paper's
four scales, its default here) 4.30 M. Tests use width 8, depth 3 on 8^3-16^3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.constants import MODALITIES, REGIONS
from fedbrats.shared.models.blocks import (
    ResidualBlock,
    VolumeInput,
    check_architecture,
    conv3,
    make_activation,
    make_norm,
)
from fedbrats.shared.models.registry import register_model
from fedbrats.shared.models.slice_branch import (
    SliceBranch,
    remove_false_positives,
    segmentation_and_slice_loss,
)

#: BiLSTM layers of the branch (paper, table 2).
LSTM_LAYERS = 2
#: Fast normalised fusion's epsilon (EfficientDet).
FUSION_EPS = 1e-4


def conv_block(in_channels: int, out_channels: int, act: str) -> nn.Sequential:
    """3x3x3 conv, GroupNorm, activation."""
    return nn.Sequential(conv3(in_channels, out_channels), make_norm(out_channels), make_activation(act))


class FastFusion(nn.Module):
    """Fast normalised fusion of k same-shaped inputs stacked on dim 1: [B, k, C, ...] -> [B, C, ...]."""

    def __init__(self, inputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(inputs))

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + FUSION_EPS)
        return (stacked * w.view(1, -1, *([1] * (stacked.ndim - 2)))).sum(dim=1)


class BiFPNLayer(nn.Module):
    """One BiFPN layer over `levels` feature maps of `channels` channels, finest first."""

    def __init__(self, levels: int, channels: int, act: str):
        super().__init__()
        # top_down[k] makes level levels-2-k; bottom_up[k] makes level k+1 (3 inputs, 2 at the top)
        self.top_down_fusion = nn.ModuleList(FastFusion(2) for _ in range(levels - 1))
        self.top_down_conv = nn.ModuleList(conv_block(channels, channels, act) for _ in range(levels - 1))
        self.bottom_up_fusion = nn.ModuleList(
            FastFusion(3 if i < levels - 1 else 2) for i in range(1, levels)
        )
        self.bottom_up_conv = nn.ModuleList(conv_block(channels, channels, act) for _ in range(levels - 1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(features)
        top_down = list(features)
        for k, (fuse, conv) in enumerate(zip(self.top_down_fusion, self.top_down_conv, strict=True)):
            i = n - 2 - k
            up = F.interpolate(
                top_down[i + 1], size=features[i].shape[2:], mode="trilinear", align_corners=False
            )
            top_down[i] = conv(fuse(torch.stack([features[i], up], dim=1)))
        out = [top_down[0]]
        for i, (fuse, conv) in enumerate(
            zip(self.bottom_up_fusion, self.bottom_up_conv, strict=True), start=1
        ):
            down = F.max_pool3d(out[-1], 2)
            inputs = [features[i], top_down[i], down] if i < n - 1 else [features[i], down]
            out.append(conv(fuse(torch.stack(inputs, dim=1))))
        return out


class UpsampleStage(nn.Module):
    """Panoptic FPN decoder step: conv block, then trilinear x2."""

    def __init__(self, in_channels: int, out_channels: int, act: str):
        super().__init__()
        self.block = conv_block(in_channels, out_channels, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.block(x), scale_factor=2, mode="trilinear", align_corners=False)


@register_model("bifpn")
class BiFPNNet(VolumeInput, nn.Module):
    """Residual encoder, BiFPN layers, Panoptic-FPN decoder to half resolution, and the slice branch.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: output logits (3: ET, TC, WT).
        width: channels of the first encoder scale; a multiple of 8 (GroupNorm with 8 groups).
        depth: resolution levels including the full one: depth - 1 encoder scales (at least 2); inputs
            must be multiples of 2^(depth-1).
        dropout: channel dropout inside every residual block, and between the BiLSTM layers.
        act: "leakyrelu" (slope 0.01) or "relu".
        se: squeeze-and-excitation in every residual block.
        slice_branch: the slice-wise classification branch (training loss and false-positive removal).
        fp_removal: at inference, slices the branch calls negative lose that region (needs the branch).
        bifpn_layers: BiFPN layers between encoder and decoder (paper: 3).
    """

    def __init__(
        self,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        width: int = 16,
        depth: int = 5,
        dropout: float = 0.0,
        act: str = "leakyrelu",
        se: bool = False,
        slice_branch: bool = True,
        fp_removal: bool = True,
        bifpn_layers: int = 3,
    ):
        super().__init__()
        check_architecture(width, depth, dropout, act, min_depth=3,
                           depth_reason="two encoder scales for a feature pyramid")  # fmt: skip
        if bifpn_layers < 1:
            raise ValueError(f"bifpn_layers must be at least 1, got {bifpn_layers}")
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels, "width": width, "depth": depth,
            "dropout": dropout, "act": act, "se": se, "slice_branch": slice_branch, "fp_removal": fp_removal,
            "bifpn_layers": bifpn_layers,
        }  # fmt: skip
        self.in_channels = in_channels
        self.depth = depth
        self.fp_removal = fp_removal
        scales = depth - 1
        channels = [width * 2**s for s in range(scales)]
        pyramid = 4 * width
        opts = {"act": act, "dropout": dropout, "se": se}

        self.encoder = nn.ModuleList(
            ResidualBlock(channels[s - 1] if s else in_channels, channels[s], stride=2, **opts)
            for s in range(scales)
        )
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv3d(c, pyramid, 1, bias=False), make_norm(pyramid)) for c in channels
        )
        self.bifpn = nn.ModuleList(BiFPNLayer(scales, pyramid, act) for _ in range(bifpn_layers))
        # level s (scale 1/2^(s+1)) needs s x2 steps to reach half resolution; level 0 one conv block
        self.decoder = nn.ModuleList(
            nn.Sequential(*[UpsampleStage(pyramid, pyramid, act) for _ in range(s)])
            if s else conv_block(pyramid, pyramid, act)
            for s in range(scales)
        )  # fmt: skip
        self.head = nn.Conv3d(scales * pyramid, out_channels, 1)
        self.slice_branch = SliceBranch(
            scales * pyramid, pyramid, out_channels=out_channels, lstm_layers=LSTM_LAYERS, axial_upsample=True,
            act=act, dropout=dropout,
        ) if slice_branch else None  # fmt: skip

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated decoder features at half the input's resolution."""
        pyramid = []
        for block, lateral in zip(self.encoder, self.lateral, strict=True):
            x = block(x)
            pyramid.append(lateral(x))
        for layer in self.bifpn:
            pyramid = layer(pyramid)
        return torch.cat([decode(level) for decode, level in zip(self.decoder, pyramid, strict=True)], dim=1)

    def _segmentation(self, features: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(self.head(features), size=size, mode="trilinear", align_corners=False)

    def segment_and_classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(region logits before false-positive removal, slice logits [B, 3, Z] or None), in either mode."""
        self.check_input(x)
        features = self._features(x)
        slices = self.slice_branch(features) if self.slice_branch is not None else None
        return self._segmentation(features, x.shape[2:]), slices

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple:
        self.check_input(x)
        features = self._features(x)
        logits = self._segmentation(features, x.shape[2:])
        if self.slice_branch is None or not (self.training or self.fp_removal):
            return logits
        slices = self.slice_branch(features)
        return (logits, slices) if self.training else remove_false_positives(logits, slices)

    @staticmethod
    def training_loss(outputs, regions: torch.Tensor) -> torch.Tensor:
        """Dice + focal on the region logits + focal + BCE on the slice labels (paper eq. 3)."""
        from fedbrats.shared.models.losses import region_loss

        return segmentation_and_slice_loss(outputs, regions, region_loss)
