"""The slice-wise classification branch of the UNet++/BiFPN seed paper (section 2.3), shared by both networks.

Does axial slice z hold any voxel of region r (ET, TC, WT)? The branch answers from the feature maps
before the segmentation head: a 3x3x3 conv block, the mean over the two in-plane axes (one feature
vector per slice), for BiFPN a transposed conv doubling the axial axis (its features are at half
resolution), a bidirectional LSTM along the axial axis (neighbouring slices), and a 1x1 conv to three
region logits per slice: `[B, 3, Z]`.

- Labels come from the region masks (`slice_labels`): nothing to annotate.
- Loss: focal + binary cross-entropy on the slice logits (`slice_loss`), added to the segmentation loss
  (`segmentation_and_slice_loss`; paper eq. 3).
- Inference: where the branch calls a slice negative for a region, that region's voxels on the slice
  are removed (`remove_false_positives`, the paper's false-positive removal).

The LSTM is written from `nn.Linear` cells (`BiLSTM`) rather than `nn.LSTM`: Opacus cannot compute
per-sample gradients of `nn.LSTM`, and its replacement `DPLSTM` would differ from `nn.LSTM` in its
state_dict. A plain-Linear LSTM is the same module with DP on or off, needs no Opacus import, and
Opacus' Linear sampler (or functorch) handles the reuse across time steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.shared.constants import REGIONS
from fedbrats.shared.models.blocks import conv3, make_activation, make_norm

#: Logit given to the voxels of a region on a slice the branch calls negative: sigmoid 0, exact in fp16,
#: and finite, so averaging over flips or windows cannot make inf - inf.
REMOVED_LOGIT = -1e4
#: Focal exponent of the slice loss (as the segmentation focal term).
FOCAL_GAMMA = 2.0

#: What a model with the branch returns in training mode: (segmentation output, slice logits [B, 3, Z]).
SliceOutputs = tuple


class LSTMDirection(nn.Module):
    """One direction of one LSTM layer: the input projection once for all steps, the recurrent one per step."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input = nn.Linear(input_size, 4 * hidden_size)  # gates i, f, g, o (PyTorch's order)
        self.recurrent = nn.Linear(hidden_size, 4 * hidden_size, bias=False)

    def forward(self, sequence: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """[B, L, input_size] -> hidden states [B, L, hidden_size], read backwards when `reverse`."""
        gates_in = self.input(sequence)
        h = sequence.new_zeros(sequence.shape[0], self.hidden_size)
        c = h
        steps = range(sequence.shape[1] - 1, -1, -1) if reverse else range(sequence.shape[1])
        states = []
        for t in steps:
            i, f, g, o = (gates_in[:, t] + self.recurrent(h)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        if reverse:
            states.reverse()
        return torch.stack(states, dim=1)


class BiLSTM(nn.Module):
    """Stacked bidirectional LSTM, batch first: [B, L, C] -> [B, L, 2 hidden]; dropout between layers."""

    def __init__(self, input_size: int, hidden_size: int, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a BiLSTM needs at least 1 layer, got {layers}")
        sizes = [input_size] + [2 * hidden_size] * (layers - 1)
        self.forward_cells = nn.ModuleList(LSTMDirection(n, hidden_size) for n in sizes)
        self.backward_cells = nn.ModuleList(LSTMDirection(n, hidden_size) for n in sizes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        for layer, (ahead, back) in enumerate(zip(self.forward_cells, self.backward_cells, strict=True)):
            if layer:
                sequence = self.dropout(sequence)
            sequence = torch.cat([ahead(sequence), back(sequence, reverse=True)], dim=2)
        return sequence


class SliceBranch(nn.Module):
    """Feature map [B, C, X, Y, Z'] -> slice logits [B, 3, Z] (Z = 2 Z' with `axial_upsample`).

    Args:
        in_channels: channels of the feature map it reads.
        channels: channels of the conv block; also the LSTM's hidden size per direction.
        out_channels: regions (3: ET, TC, WT).
        lstm_layers: stacked BiLSTM layers (paper: 3 in UNet++, 2 in BiFPN).
        axial_upsample: a transposed conv (kernel 3, stride 2) doubling the axial axis, for a feature map
            at half the input's resolution (BiFPN).
        act, dropout: activation of the conv blocks; dropout between LSTM layers.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        out_channels: int = len(REGIONS),
        lstm_layers: int = 2,
        axial_upsample: bool = False,
        act: str = "leakyrelu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv = nn.Sequential(conv3(in_channels, channels), make_norm(channels), make_activation(act))
        self.upsample = nn.Sequential(
            nn.ConvTranspose1d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
            make_norm(channels),
            make_activation(act),
        ) if axial_upsample else None  # fmt: skip
        self.lstm = BiLSTM(channels, channels, lstm_layers, dropout)
        self.classify = nn.Conv1d(2 * channels, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        per_slice = self.conv(features).mean(dim=(2, 3))  # [B, C, Z']: in-plane average pooling
        if self.upsample is not None:
            per_slice = self.upsample(per_slice)
        sequence = self.lstm(per_slice.transpose(1, 2))  # along the axial axis
        return self.classify(sequence.transpose(1, 2))


def slice_labels(regions: torch.Tensor) -> torch.Tensor:
    """Region masks [B, 3, X, Y, Z] -> slice labels [B, 3, Z]: 1 where the axial slice holds any voxel of the region."""
    if regions.ndim != 5:
        raise ValueError(
            f"expected region masks [B, {len(REGIONS)}, X, Y, Z], got shape {tuple(regions.shape)}"
        )
    return (regions.amax(dim=(2, 3)) > 0).to(torch.float32)


def slice_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Focal + binary cross-entropy on slice logits [B, 3, Z], each the mean over samples, regions and slices
    (a mean of per-sample losses, as DP-SGD's per-sample gradients assume)."""
    if logits.shape != labels.shape:
        raise ValueError(
            f"slice logits {tuple(logits.shape)} and slice labels {tuple(labels.shape)} differ in shape"
        )
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p = torch.sigmoid(logits)
    p_true = p * labels + (1 - p) * (1 - labels)
    return bce.mean() + ((1 - p_true) ** gamma * bce).mean()


def remove_false_positives(logits: torch.Tensor, slice_logits: torch.Tensor) -> torch.Tensor:
    """Region logits [B, 3, X, Y, Z] with every slice the branch calls negative (probability < 0.5) set to
    `REMOVED_LOGIT` for that region."""
    if slice_logits.shape != (*logits.shape[:2], logits.shape[-1]):
        raise ValueError(
            f"slice logits {tuple(slice_logits.shape)} do not fit region logits {tuple(logits.shape)} "
            "(expected [B, 3, Z] with the logits' Z)"
        )
    negative = (slice_logits < 0)[:, :, None, None, :]
    return torch.where(negative, logits.new_tensor(REMOVED_LOGIT), logits)


def segmentation_and_slice_loss(
    outputs: SliceOutputs | torch.Tensor | Sequence[torch.Tensor],
    regions: torch.Tensor,
    segmentation_loss: Callable[[torch.Tensor | Sequence[torch.Tensor], torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Segmentation loss + slice loss (paper eq. 3) of a training output `(segmentation, slice logits)`;
    a bare segmentation output (no branch, or eval mode) gets the segmentation loss only."""
    if isinstance(outputs, tuple):
        if len(outputs) != 2:
            raise ValueError(f"expected (segmentation, slice logits), got a tuple of {len(outputs)}")
        segmentation, slices = outputs
        return segmentation_loss(segmentation, regions) + slice_loss(slices, slice_labels(regions))
    return segmentation_loss(outputs, regions)
