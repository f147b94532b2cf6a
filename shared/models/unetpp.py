"""Nested U-Net (UNet++, Zhou et al. 2018) with the slice-wise classification branch of the UNet++/BiFPN
seed paper (DESIGN section 4; `shared.models.slice_branch`).

Nodes X[i][j]: level i (resolution 1/2^i), column j. Column 0 is the residual encoder of `resunet`
(X[0][0] a residual stem, X[i][0] a residual block with stride 2). Every other node sees all earlier
nodes of its level and the node below, upsampled (dense skip pathways):

    X[i][j] = ResidualBlock(cat(X[i][0], ..., X[i][j-1], Up(X[i+1][j-1])))

where Up is a bias-free 1x1 conv to the level's width, then trilinear x2 (as `blocks.UpBlock`).

Deep supervision: a 1x1 head on each top node X[0][1], ..., X[0][depth-1], all at full resolution. In
training mode the model returns their logits as a list (deepest column first); in eval mode their mean
(the paper: "the final segmentation map was selected from all segmentation branches averaged"). Without
deep supervision only X[0][depth-1] has a head. The run configuration's `deep-supervision` defaults to
false (the resunet default): set it true for the paper's network.

Slice branch (`slice_branch`): reads the concatenated top nodes X[0][1..depth-1] (full resolution);
conv block to 2 x width channels (the paper doubles 128 to 256; half of that here, since this conv runs
on full-resolution patches), 3 BiLSTM layers, three logits per axial slice. Training mode returns
`(segmentation, slice logits [B, 3, Z])`; eval mode returns region logits only, with the slices the
branch calls negative removed when `fp_removal` (the attribute can be switched off after loading).

Size: width 16, depth 4 has 1.64 M parameters with the branch (1.53 M without); width 32, depth 5 has 25.5 M.
Tests use width 8, depth 2-3 on 8^3-16^3.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.constants import MODALITIES, REGIONS
from fedbrats.shared.models.blocks import ResidualBlock, VolumeInput, check_architecture
from fedbrats.shared.models.registry import register_model
from fedbrats.shared.models.slice_branch import (
    SliceBranch,
    remove_false_positives,
    segmentation_and_slice_loss,
)

#: BiLSTM layers of the branch (paper, table 3).
LSTM_LAYERS = 3


class NestedNode(nn.Module):
    """X[i][j] from the level's earlier nodes and the node below: 1x1 conv, trilinear x2, concat, residual block."""

    def __init__(self, channels: int, below_channels: int, column: int, **opts):
        super().__init__()
        self.reduce = nn.Conv3d(below_channels, channels, 1, bias=False)
        self.block = ResidualBlock((column + 1) * channels, channels, **opts)

    def forward(self, same_level: list[torch.Tensor], below: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(
            self.reduce(below), size=same_level[0].shape[2:], mode="trilinear", align_corners=False
        )
        return self.block(torch.cat([*same_level, up], dim=1))


@functools.cache
def _equal_weight_region_loss():
    from fedbrats.shared.models.losses import RegionLoss

    return RegionLoss(ds_decay=1.0)  # every nested output is full resolution and final: equal weights


@register_model("unetpp")
class UNetPlusPlus(VolumeInput, nn.Module):
    """UNet++ with GroupNorm, residual nodes, deep supervision and the slice-wise classification branch.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: output logits (3: ET, TC, WT).
        width: channels at full resolution; a multiple of 8 (GroupNorm with 8 groups).
        depth: resolution levels including the full one; inputs must be multiples of 2^(depth-1).
        deep_supervision: a head on every top node (averaged at inference), else on the last one only.
        dropout: channel dropout inside every residual block, and between the BiLSTM layers.
        act: "leakyrelu" (slope 0.01) or "relu".
        se: squeeze-and-excitation in every residual block.
        slice_branch: the slice-wise classification branch (training loss and false-positive removal).
        fp_removal: at inference, slices the branch calls negative lose that region (needs the branch).
    """

    def __init__(
        self,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        width: int = 32,
        depth: int = 5,
        deep_supervision: bool = True,
        dropout: float = 0.0,
        act: str = "leakyrelu",
        se: bool = False,
        slice_branch: bool = True,
        fp_removal: bool = True,
    ):
        super().__init__()
        check_architecture(width, depth, dropout, act)
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels, "width": width, "depth": depth,
            "deep_supervision": deep_supervision, "dropout": dropout, "act": act, "se": se,
            "slice_branch": slice_branch, "fp_removal": fp_removal,
        }  # fmt: skip
        self.in_channels = in_channels
        self.depth = depth
        self.deep_supervision = deep_supervision
        self.fp_removal = fp_removal
        channels = [width * 2**level for level in range(depth)]
        opts = {"act": act, "dropout": dropout, "se": se}

        self.encoder = nn.ModuleList([ResidualBlock(in_channels, channels[0], **opts)])
        for level in range(1, depth):
            self.encoder.append(ResidualBlock(channels[level - 1], channels[level], stride=2, **opts))
        # nested[j - 1][i] is node X[i][j]; column j has depth - j nodes
        self.nested = nn.ModuleList(
            nn.ModuleList(
                NestedNode(channels[i], channels[i + 1], column, **opts) for i in range(depth - column)
            )
            for column in range(1, depth)
        )
        heads = depth - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(channels[0], out_channels, 1) for _ in range(heads))
        self.slice_branch = SliceBranch(
            (depth - 1) * channels[0], 2 * width, out_channels=out_channels, lstm_layers=LSTM_LAYERS,
            act=act, dropout=dropout,
        ) if slice_branch else None  # fmt: skip

    def _top_nodes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """X[0][1], ..., X[0][depth-1]."""
        nodes: list[list[torch.Tensor]] = []
        for block in self.encoder:
            x = block(x)
            nodes.append([x])
        for column, level_nodes in enumerate(self.nested, start=1):
            for i, node in enumerate(level_nodes):
                nodes[i].append(node(nodes[i][:column], nodes[i + 1][column - 1]))
        return nodes[0][1:]

    def _segmentation(self, top: list[torch.Tensor]) -> list[torch.Tensor]:
        """Head logits, deepest column first."""
        return [head(node) for head, node in zip(self.heads, reversed(top), strict=False)]

    @staticmethod
    def _combined(outputs: list[torch.Tensor]) -> torch.Tensor:
        return outputs[0] if len(outputs) == 1 else sum(outputs) / len(outputs)

    def _slices(self, top: list[torch.Tensor]) -> torch.Tensor:
        return self.slice_branch(torch.cat(top, dim=1))

    def segment_and_classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(region logits as at inference but before false-positive removal, slice logits [B, 3, Z] or None)."""
        self.check_input(x)
        top = self._top_nodes(x)
        return self._combined(self._segmentation(top)), self._slices(
            top
        ) if self.slice_branch is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | tuple:
        self.check_input(x)
        top = self._top_nodes(x)
        outputs = self._segmentation(top)
        branch = self.slice_branch is not None and (self.training or self.fp_removal)
        slices = self._slices(top) if branch else None
        if not self.training:
            logits = self._combined(outputs)
            return logits if slices is None else remove_false_positives(logits, slices)
        segmentation = outputs if self.deep_supervision else outputs[0]
        return segmentation if slices is None else (segmentation, slices)

    @staticmethod
    def training_loss(outputs, regions: torch.Tensor) -> torch.Tensor:
        """Dice + focal on every nested output (equal weights) + focal + BCE on the slice labels (paper eq. 3)."""
        return segmentation_and_slice_loss(outputs, regions, _equal_weight_region_loss())
