"""Training losses on the three regions (ET, TC, WT), with deep supervision (DESIGN section 4).

`RegionLoss`: soft Dice (sigmoid, smooth_nr = smooth_dr = 1e-5) + focal (gamma 2), MONAI's
`DiceFocalLoss`, on region logits [B, 3, ...] against region masks [B, 3, ...].

Dice is computed per sample and channel, then averaged (MONAI `batch=False`): the loss is a mean of
per-sample losses, which is what Opacus' per-sample gradients assume. A batch-pooled Dice would mix
patients inside one gradient and void the DP guarantee, so it is deliberately not offered.

Known floor: for a sample whose region is empty (no ET in the patch) soft Dice with 1e-5 smoothing
is about 1 for any realistic prediction (1 - 1e-5 / (sum p + 1e-5)), with a vanishing gradient; it
adds a constant to the value, not a training signal. A "perfect" loss is therefore near 0 only
when every region is present in every sample.

`HierarchicalDiceLoss` (residual-FCN seed paper): the model outputs label logits
[B, 4, ...] (background, NCR, ED, ET, whatever the dataset's label numbers), softmax over them,
then P(WT) = NCR + ED + ET, P(TC) = NCR + ET, P(ET) = ET; mean of the three soft Dice losses.
`hierarchical_probabilities` gives the same region probabilities for inference. No registered model
outputs label logits yet (every one gives 3 sigmoid region logits, trained with `RegionLoss`); this
loss waits for the seed papers' softmax-over-labels model (tests/test_losses.py says so).

Deep supervision: pass the model's list of logits (full resolution first). Level i has weight
0.5^i, weights normalised to sum 1 so the value is on the same scale as a single output; the target
is resized to each level's size by nearest neighbour (default) or max-pooling (keeps tiny regions
alive at coarse levels). MONAI's `DeepSupervisionLoss` does the same without normalising and
without max-pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.constants import REGIONS

#: Soft Dice smoothing of numerator and denominator (DESIGN section 4).
DICE_SMOOTH = 1e-5
TARGET_MODES = ("nearest", "maxpool")

Outputs = torch.Tensor | Sequence[torch.Tensor]


def deep_supervision_weights(levels: int, decay: float = 0.5) -> list[float]:
    """Weights decay^i for i < levels, normalised to sum 1."""
    raw = [decay**i for i in range(levels)]
    total = sum(raw)
    return [w / total for w in raw]


def resize_target(target: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Region masks [B, C, ...] at a coarser `size`: nearest neighbour or max-pool (any voxel of the block)."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    if mode == "nearest":
        return F.interpolate(target, size=tuple(size), mode="nearest-exact")
    if mode == "maxpool":
        return F.adaptive_max_pool3d(target, tuple(size))
    raise ValueError(f"unknown target resize mode {mode!r}; expected one of {TARGET_MODES}")


class _DeepSupervised(nn.Module):
    """Applies `self.single(output, target)` to one output or to each deep-supervision level."""

    def __init__(self, ds_decay: float, ds_target: str):
        super().__init__()
        if ds_target not in TARGET_MODES:
            raise ValueError(f"unknown ds_target {ds_target!r}; expected one of {TARGET_MODES}")
        if not 0.0 < ds_decay <= 1.0:
            raise ValueError(f"ds_decay must be in (0, 1], got {ds_decay}")
        self.ds_decay = ds_decay
        self.ds_target = ds_target

    def single(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, outputs: Outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) == 0:
            raise ValueError("got an empty list of outputs")
        if target.ndim != outputs[0].ndim or target.shape[0] != outputs[0].shape[0]:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match output shape {tuple(outputs[0].shape)}"
            )
        if target.shape[2:] != outputs[0].shape[2:]:
            raise ValueError(
                f"the first output must be full resolution: output {tuple(outputs[0].shape)}, "
                f"target {tuple(target.shape)}"
            )
        target = target.float()
        weights = deep_supervision_weights(len(outputs), self.ds_decay)
        total = outputs[0].new_zeros(())
        for weight, output in zip(weights, outputs, strict=True):
            total = total + weight * self.single(
                output.float(), resize_target(target, output.shape[2:], self.ds_target)
            )
        return total


class RegionLoss(_DeepSupervised):
    """Soft Dice + focal on sigmoid region logits (ET, TC, WT), MONAI's DiceFocalLoss.

    Args:
        dice_weight, focal_weight: weights of the two terms.
        gamma: focal exponent.
        ds_decay: weight ratio between successive deep-supervision levels.
        ds_target: "nearest" or "maxpool", how targets are resized for coarse levels.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 1.0,
        focal_weight: float = 1.0,
        gamma: float = 2.0,
        ds_decay: float = 0.5,
        ds_target: str = "nearest",
    ):
        super().__init__(ds_decay, ds_target)
        from monai.losses import DiceFocalLoss  # MONAI is paid when a loss is built, not when models register

        self.loss = DiceFocalLoss(
            sigmoid=True,
            smooth_nr=DICE_SMOOTH,
            smooth_dr=DICE_SMOOTH,
            gamma=gamma,
            lambda_dice=dice_weight,
            lambda_focal=focal_weight,
        )

    def single(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.shape != target.shape:
            raise ValueError(f"logits {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
        return self.loss(output, target)


def hierarchical_probabilities(label_logits: torch.Tensor) -> torch.Tensor:
    """Region probabilities [B, 3, ...] (ET, TC, WT) from logits over (background, NCR, ED, ET)."""
    if label_logits.ndim < 3 or label_logits.shape[1] != 4:
        raise ValueError(
            f"expected label logits [B, 4, ...] (background, NCR, ED, ET), got {tuple(label_logits.shape)}"
        )
    p = torch.softmax(label_logits, dim=1)
    ncr, ed, et = p[:, 1], p[:, 2], p[:, 3]
    return torch.stack([et, ncr + et, ncr + ed + et], dim=1)


class HierarchicalDiceLoss(_DeepSupervised):
    """Mean soft Dice of the three nested regions derived from a softmax over the labels."""

    def __init__(self, *, ds_decay: float = 0.5, ds_target: str = "nearest"):
        super().__init__(ds_decay, ds_target)
        from monai.losses import DiceLoss  # as in RegionLoss

        self.dice = DiceLoss(smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)

    def single(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = hierarchical_probabilities(output)
        if probabilities.shape != target.shape:
            raise ValueError(
                f"region target must be [B, {len(REGIONS)}, ...] like the logits' spatial size, "
                f"got {tuple(target.shape)} for logits {tuple(output.shape)}"
            )
        return self.dice(probabilities, target)


_DEFAULT_REGION_LOSS: RegionLoss | None = None


def region_loss(outputs: Outputs, target: torch.Tensor) -> torch.Tensor:
    """Default `RegionLoss()` (Dice + focal, deep-supervision aware) as a function."""
    global _DEFAULT_REGION_LOSS
    if _DEFAULT_REGION_LOSS is None:
        _DEFAULT_REGION_LOSS = RegionLoss()
    return _DEFAULT_REGION_LOSS(outputs, target)
