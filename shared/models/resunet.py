"""The default segmentation model: a residual 3D U-Net (DESIGN section 4).

Encoder: a residual stem at full resolution, then one residual block with stride 2 per level
(channels double each level: width, 2 width, ..., width 2^(depth-1)). Decoder: one `UpBlock`
per level (trilinear x2, 1x1 conv, concat with the skip, residual block). A 1x1 head gives 3
region logits (ET, TC, WT).

Size: width 32, depth 5 (channels 32..512) has 21.7 M parameters (21.9 M with SE) and
takes 128^3 patches; tests use width 8, depth 3 (83 k) on 32^3.

Deep supervision: in training mode the model returns a list of logits, full resolution first,
then one per coarser decoder level at its OWN size (1/2, 1/4, ... of the input; depth-2 extra
outputs). `fedbrats.shared.models.losses.RegionLoss` resizes the target to each. In eval mode it returns the
full-resolution tensor only, so inference code never sees the list.

Multi-task (`n_classes` > 0): a `ClassificationHead` on the bottleneck (the deepest encoder output),
or with `class_head = "profile"` a `ProfileHead` on the segmented tumour's profile, gives case-level
class logits as well; forward then returns (segmentation output, class logits
[B, n_classes]). `first_output` in shared.evaluation.inference picks the segmentation part, so
sliding-window inference works unchanged. n_classes = 0 (the default) builds no head at all: the
segmentation model and its checkpoints are exactly those of before.
"""

from __future__ import annotations

import torch
from torch import nn

from fedbrats.shared.constants import MODALITIES, REGIONS
from fedbrats.shared.models.blocks import (
    VolumeInput,
    check_architecture,
    encode,
    level_channels,
    residual_decoder,
    residual_encoder,
)
from fedbrats.shared.models.classifier import head_logits, make_class_head
from fedbrats.shared.models.registry import register_model


@register_model("resunet")
class ResUNet(VolumeInput, nn.Module):
    """Residual 3D U-Net with GroupNorm, trilinear upsampling and optional deep supervision.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: output logits (3: ET, TC, WT).
        width: channels at full resolution; a multiple of 8 (GroupNorm with 8 groups).
        depth: resolution levels including the full one; inputs must be multiples of 2^(depth-1).
        deep_supervision: in training mode, also return logits of the coarser decoder levels.
        dropout: channel dropout inside every residual block (0 disables).
        act: "leakyrelu" (slope 0.01) or "relu".
        se: squeeze-and-excitation in every residual block.
        n_classes: case-level class logits from the bottleneck (multi-task); 0: segmentation only.
        class_head: "bottleneck" (pooled bottleneck features) or "profile" (the segmented tumour's
            label fractions and intensities, `classifier.tumour_profile`; the segmentation is not trained by it).
    """

    def __init__(
        self,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        width: int = 32,
        depth: int = 5,
        deep_supervision: bool = False,
        dropout: float = 0.0,
        act: str = "leakyrelu",
        se: bool = False,
        n_classes: int = 0,
        class_head: str = "bottleneck",
    ):
        super().__init__()
        check_architecture(width, depth, dropout, act)
        if n_classes < 0 or n_classes == 1:
            raise ValueError(f"n_classes must be 0 (no classification head) or >= 2, got {n_classes}")
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels, "width": width, "depth": depth,
            "deep_supervision": deep_supervision, "dropout": dropout, "act": act, "se": se, "n_classes": n_classes,
            "class_head": class_head,
        }  # fmt: skip
        self.depth = depth
        self.deep_supervision = deep_supervision
        channels = level_channels(width, depth)
        opts = {"act": act, "dropout": dropout, "se": se}
        self.encoder = residual_encoder(in_channels, channels, **opts)
        self.decoder = residual_decoder(channels, **opts)  # decoder[i]: level depth-1-i up to depth-2-i
        self.head = nn.Conv3d(channels[0], out_channels, 1)
        # one head per coarser decoder output, finest first (levels 1 .. depth-2)
        self.ds_heads = nn.ModuleList(
            nn.Conv3d(channels[level], out_channels, 1) for level in range(1, depth - 1)
        ) if deep_supervision else nn.ModuleList()  # fmt: skip
        self.class_head = make_class_head(class_head, channels[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | tuple:
        self.check_input(x)
        skips = encode(self.encoder, x)
        bottleneck = skips.pop()
        segmentation = self._decode(bottleneck, skips)
        if self.class_head is None:
            return segmentation
        full = segmentation[0] if isinstance(segmentation, list) else segmentation
        return segmentation, head_logits(self.class_head, x, bottleneck, lambda: full)

    def _decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        decoded = []
        for up in self.decoder:
            x = up(x, skips.pop())
            decoded.append(x)
        logits = self.head(x)
        if not (self.deep_supervision and self.training):
            return logits
        # decoded[-1] is full resolution; decoded[-2] is 1/2, decoded[-3] is 1/4, ...
        coarse = [head(decoded[-2 - i]) for i, head in enumerate(self.ds_heads)]
        return [logits, *coarse]
