"""The self-ensemble U-Net of the bag-of-tricks seed paper (DESIGN section 4).

A residual U-Net (`resunet`'s encoder and decoder, built by the same functions of `blocks`) with a 1x1 head at EVERY decoder scale, the
bottleneck included. The predictions are combined recursively, coarse to fine (paper eq. 4):

    y_S = head_S(bottleneck),   y_s = Up(y_{s+1}) + head_s(decoder_s),   y = y_1,

so each scale only models the residual of the coarser one, and upsampling happens once per scale
rather than every prediction to full size.

Heads predict logits over the four labels (background, NCR, ED, ET), softmax over them, as the
paper's multitask loss needs: cross-entropy over the labels plus binary cross-entropy over the
regions "reorganised" from the softmax. The regions are nested unions of labels (ET = {ET},
TC = {NCR, ET}, WT = {NCR, ED, ET}, as `losses.hierarchical_probabilities`), so a region's logit is
exactly logsumexp(labels inside) - logsumexp(labels outside): its sigmoid is the summed softmax, in
log space (no log(0) for confident voxels).

- eval mode: region logits [B, 3, X, Y, Z] (ET, TC, WT), like every model, so inference,
  post-processing and uncertainty maps are unchanged; the regions are nested by construction.
- training mode: label logits [B, 4, ...]; with `deep_supervision` a list: y_1 (full resolution),
  then the partial sums y_2, ..., y_{S-1} at their own sizes (1/2, 1/4, ...).

`SelfEnsembleUNet.training_loss` reads both (4 channels: label logits; 3: region logits, e.g.
`client.trainer.loss_on`, which scores in eval mode).

Size: width 16, depth 4 has 1.35 M parameters: `resunet` at that size with its head replaced by a
4-label head (4 (C_s + 1) parameters) at every scale (tests/test_model_selfensemble.py checks the
number); tests use width 8, depth 2-3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from fedbrats.shared.models.losses import deep_supervision_weights, resize_target
from fedbrats.shared.models.registry import register_model

#: Label channels of the softmax head: background, NCR (necrotic/non-enhancing core), ED (edema), ET.
LABEL_CHANNELS = ("background", "NCR", "ED", "ET")
#: Labels inside each region (indices into LABEL_CHANNELS), in REGIONS order.
REGION_MEMBERS = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
#: Smallest label probability taken when label log-probabilities come from region logits (eval mode).
_EPS = 1e-7


def region_logits(label_logits: torch.Tensor) -> torch.Tensor:
    """Region logits [B, 3, ...] (ET, TC, WT) of label logits [B, 4, ...]: sigmoid gives the summed softmax."""
    if label_logits.ndim < 3 or label_logits.shape[1] != len(LABEL_CHANNELS):
        raise ValueError(
            f"expected label logits [B, 4, ...] {LABEL_CHANNELS}, got {tuple(label_logits.shape)}"
        )
    out = []
    for region in REGIONS:
        inside = list(REGION_MEMBERS[region])
        outside = [i for i in range(len(LABEL_CHANNELS)) if i not in inside]
        out.append(torch.logsumexp(label_logits[:, inside], 1) - torch.logsumexp(label_logits[:, outside], 1))
    return torch.stack(out, dim=1)


def _full_regions(segmentation: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Full-resolution region logits of any forward output (eval: regions; training: labels, maybe a list)."""
    full = segmentation[0] if isinstance(segmentation, list) else segmentation
    return region_logits(full) if full.shape[1] == len(LABEL_CHANNELS) else full


def label_targets(regions: torch.Tensor) -> torch.Tensor:
    """Label indices [B, ...] from nested region masks [B, 3, ...]: ET -> 3, TC without ET -> 1, WT without TC -> 2."""
    et, tc, wt = (regions[:, REGIONS.index(r)] > 0.5 for r in ("ET", "TC", "WT"))
    labels = torch.zeros_like(wt, dtype=torch.long)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = 3
    return labels


def _label_log_probs(regions_logits: torch.Tensor) -> torch.Tensor:
    """Label log-probabilities from region logits (the eval-mode output): p(NCR) = p(TC) - p(ET), ..."""
    p = {r: torch.sigmoid(regions_logits[:, REGIONS.index(r)]) for r in REGIONS}
    labels = [1 - p["WT"], p["TC"] - p["ET"], p["WT"] - p["TC"], p["ET"]]
    return torch.log(torch.stack(labels, dim=1).clamp_min(_EPS))


def multitask_loss(output: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labels + BCE over the regions, both means over voxels (so over patients)."""
    if (
        output.ndim != regions.ndim
        or output.shape[0] != regions.shape[0]
        or output.shape[2:] != regions.shape[2:]
    ):
        raise ValueError(f"output {tuple(output.shape)} and region masks {tuple(regions.shape)} do not match")
    output, regions = output.float(), regions.float()
    if output.shape[1] == len(LABEL_CHANNELS):
        ce = F.cross_entropy(output, label_targets(regions))
        logits = region_logits(output)
    elif output.shape[1] == len(REGIONS):
        ce = F.nll_loss(_label_log_probs(output), label_targets(regions))
        logits = output
    else:
        raise ValueError(
            f"expected label logits [B, 4, ...] or region logits [B, 3, ...], got {tuple(output.shape)}"
        )
    return ce + F.binary_cross_entropy_with_logits(logits, regions)


@register_model("selfensemble")
class SelfEnsembleUNet(VolumeInput, nn.Module):
    """Residual U-Net whose per-scale label predictions are summed coarse to fine (the self-ensemble).

    Args:
        in_channels: input modalities (4: t1, t1ce, t2, flair).
        out_channels: region logits in eval mode; must be 3 (ET, TC, WT), derived from 4 label logits.
        width: channels at full resolution; a multiple of 8 (GroupNorm groups).
        depth: resolution levels including the full one (= scales S); inputs must be multiples of 2^(depth-1).
        deep_supervision: in training mode, also return the partial sums y_2 .. y_{S-1}.
        dropout: channel dropout inside every residual block (0 disables).
        act: "leakyrelu" (slope 0.01) or "relu".
        se: squeeze-and-excitation in every residual block.
        n_classes: case-level class logits from the bottleneck (multi-task, as resunet); 0: segmentation only.
        class_head: "bottleneck" or "profile" (the segmented tumour's profile), as resunet.
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
        if out_channels != len(REGIONS):
            raise ValueError(f"the self-ensemble U-Net's regions are {REGIONS}: out_channels must be 3, "
                             f"got {out_channels}")  # fmt: skip
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
        self.decoder = residual_decoder(channels, **opts)
        # heads[s]: label logits at level s (0 = full resolution, depth-1 = bottleneck)
        self.heads = nn.ModuleList(nn.Conv3d(c, len(LABEL_CHANNELS), 1) for c in channels)
        self.class_head = make_class_head(class_head, channels[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | tuple:
        self.check_input(x)
        skips = encode(self.encoder, x)
        bottleneck = skips.pop()
        segmentation = self._decode(bottleneck, skips)
        if self.class_head is None:
            return segmentation
        return segmentation, head_logits(self.class_head, x, bottleneck, lambda: _full_regions(segmentation))

    def _decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        y = self.heads[-1](x)  # y_S
        partial = [y]
        for level, up in zip(range(self.depth - 2, -1, -1), self.decoder, strict=True):
            x = up(x, skips.pop())
            coarser = F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
            y = coarser + self.heads[level](x)
            partial.append(y)
        if not self.training:
            return region_logits(y)
        if not self.deep_supervision:
            return y
        # partial[-1] is y_1 (full resolution), partial[-2] is y_2, ...; the bottleneck's y_S is left out
        return [partial[-1 - i] for i in range(self.depth - 1)]

    @staticmethod
    def training_loss(outputs: torch.Tensor | list[torch.Tensor], regions: torch.Tensor) -> torch.Tensor:
        """The paper's multitask loss (CE over labels + BCE over regions); deep-supervision levels weighted
        0.5^i (normalised), their targets resized by nearest neighbour, as `losses.RegionLoss` does."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) == 0:
            raise ValueError("got an empty list of outputs")
        if outputs[0].shape[2:] != regions.shape[2:]:
            raise ValueError(f"the first output must be full resolution: output {tuple(outputs[0].shape)}, "
                             f"target {tuple(regions.shape)}")  # fmt: skip
        weights = deep_supervision_weights(len(outputs))
        regions = regions.float()
        return sum(
            w * multitask_loss(o, resize_target(regions, o.shape[2:]))
            for w, o in zip(weights, outputs, strict=True)
        )
