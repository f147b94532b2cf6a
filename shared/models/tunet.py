"""TuNet (seed paper "TuNet", DESIGN section 4): a cascade W-Net -> C-Net -> E-Net trained end to end.

Each sub-network is a U-Net-like encoder-decoder with squeeze-and-excitation in every block (the
paper's best variant, TuNet + SEB, with residual blocks as its REB variants) and one sigmoid output:

- W-Net sees the four modalities and gives the whole-tumor (WT) logit;
- C-Net sees the modalities plus P(WT) and gives the tumor-core (TC) logit;
- E-Net sees the modalities plus P(WT) and P(TC) and gives the enhancing-tumor (ET) logit.

The probability maps are passed with their gradient, so the three networks regularise each other
(the paper's argument for joining them rather than training three separate binary models). As in
the paper, every encoder level concatenates the max-pooled features with the sub-network's input
downsampled to that level. SE is always on: it is what the paper found to help every variant, so
there is no `se` argument (`model-se` does not apply to this model).

Forward returns region logits [B, 3, X, Y, Z] (ET from E-Net, TC from C-Net, WT from W-Net) in train
and eval mode alike, so sliding-window inference, post-processing (ET < 500 voxels -> necrosis) and
the per-region uncertainty maps of `shared.evaluation.postprocess` work unchanged. The loss is the
paper's: the sum of the three soft Dice losses (`TuNet.training_loss`, which `shared.tasks` uses).

Size: width 16, depth 4 (the paper's 16 base filters) has 4.19 M parameters, 1.40 M per sub-network,
about three times `resunet` at that size (tests/test_model_tunet.py checks the number); tests use width 8,
depth 2-3. Training costs about three U-Nets too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.constants import MODALITIES, REGIONS
from fedbrats.shared.models.blocks import (
    ResidualBlock,
    UpBlock,
    VolumeInput,
    check_architecture,
)
from fedbrats.shared.models.losses import DICE_SMOOTH
from fedbrats.shared.models.registry import register_model

#: Sub-networks in cascade order, the region each segments, and how many probability maps it receives.
CASCADE = (("wnet", "WT", 0), ("cnet", "TC", 1), ("enet", "ET", 2))


class SubNet(nn.Module):
    """One binary U-Net of the cascade: SE residual blocks, max-pooling, the input re-injected per level."""

    def __init__(self, in_channels: int, width: int, depth: int, *, act: str, dropout: float):
        super().__init__()
        channels = [width * 2**level for level in range(depth)]
        opts = {"act": act, "dropout": dropout, "se": True}
        self.encoder = nn.ModuleList([ResidualBlock(in_channels, channels[0], **opts)])
        for level in range(1, depth):  # max-pooled features + the input downsampled to this level
            self.encoder.append(ResidualBlock(channels[level - 1] + in_channels, channels[level], **opts))
        self.decoder = nn.ModuleList(
            UpBlock(channels[level], channels[level - 1], channels[level - 1], **opts)
            for level in range(depth - 1, 0, -1)
        )
        self.head = nn.Conv3d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.encoder[0](x)]
        level_input = x
        for block in self.encoder[1:]:
            level_input = F.avg_pool3d(level_input, 2)
            skips.append(block(torch.cat([F.max_pool3d(skips[-1], 2), level_input], dim=1)))
        y = skips.pop()
        for up in self.decoder:
            y = up(y, skips.pop())
        return self.head(y)


@register_model("tunet")
class TuNet(VolumeInput, nn.Module):
    """The TuNet cascade; region logits (ET, TC, WT) in both modes.

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: region logits; must be 3 (ET, TC, WT), one per sub-network.
        width: channels of each sub-network at full resolution; a multiple of 8 (GroupNorm groups).
        depth: resolution levels of each sub-network; inputs must be multiples of 2^(depth-1).
        dropout: channel dropout inside every residual block (0 disables).
        act: "leakyrelu" (slope 0.01) or "relu" (the paper's).
    """

    def __init__(
        self,
        in_channels: int = len(MODALITIES),
        out_channels: int = len(REGIONS),
        width: int = 16,
        depth: int = 4,
        dropout: float = 0.0,
        act: str = "leakyrelu",
    ):
        super().__init__()
        check_architecture(width, depth, dropout, act)
        if out_channels != len(REGIONS):
            raise ValueError(
                f"TuNet gives one logit per region {REGIONS}: out_channels must be 3, got {out_channels}"
            )
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "width": width, "depth": depth,
                       "dropout": dropout, "act": act}  # fmt: skip
        self.depth = depth
        for name, _, maps in CASCADE:
            self.add_module(name, SubNet(in_channels + maps, width, depth, act=act, dropout=dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        logits: dict[str, torch.Tensor] = {}
        maps: list[torch.Tensor] = []
        for name, region, _ in CASCADE:
            logits[region] = getattr(self, name)(torch.cat([x, *maps], dim=1))
            maps.append(torch.sigmoid(logits[region]))
        return torch.cat([logits[r] for r in REGIONS], dim=1)

    @staticmethod
    def training_loss(outputs: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """L = L_WT + L_TC + L_ET, each the soft Dice loss of one sigmoid output (paper eq. 5).

        Dice per sample, then the mean over the batch: a mean of per-patient losses, as DP-SGD needs.
        """
        if not isinstance(outputs, torch.Tensor):
            raise ValueError(
                f"TuNet's loss takes its region logits [B, 3, ...], got {type(outputs).__name__}"
            )
        if outputs.shape != regions.shape:
            raise ValueError(
                f"region logits {tuple(outputs.shape)} and masks {tuple(regions.shape)} differ in shape"
            )
        return soft_dice_loss(outputs, regions).sum(dim=1).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice [B, C] of sigmoid(logits) per sample and channel, smoothing DICE_SMOOTH on both sides
    (MONAI's DiceLoss(sigmoid=True, batch=False) without its import cost)."""
    p, y = torch.sigmoid(logits.float()).flatten(2), target.float().flatten(2)
    return 1.0 - (2.0 * (p * y).sum(-1) + DICE_SMOOTH) / (p.sum(-1) + y.sum(-1) + DICE_SMOOTH)
