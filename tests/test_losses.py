"""Region losses: values at the extremes, deep supervision, per-sample decomposition, a tiny overfit."""

from __future__ import annotations

import pytest
import torch

from fedbrats.shared.models import create_model
from fedbrats.shared.models.losses import (
    HierarchicalDiceLoss,
    RegionLoss,
    deep_supervision_weights,
    hierarchical_probabilities,
    region_loss,
    resize_target,
)


def regions(seed: int = 0, shape=(2, 3, 16, 16, 16), p: float = 0.3) -> torch.Tensor:
    """Random region masks with every region present in every sample."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


def confident(target: torch.Tensor, margin: float = 12.0) -> torch.Tensor:
    return (2 * target - 1) * margin


def test_perfect_prediction_is_at_the_focal_floor_and_far_below_random():
    y = regions()
    perfect = region_loss(confident(y), y)
    assert 0 <= perfect < 1e-4
    assert region_loss(torch.randn_like(y), y) > 0.5


def test_empty_region_adds_the_documented_soft_dice_floor():
    y = regions()
    y[:, 0] = 0  # no ET anywhere
    dice_only = RegionLoss(focal_weight=0.0)
    # 1 - 1e-5 / (sum p + 1e-5) ~ 1 for the empty channel, 0 for the others: mean over 3 channels
    assert dice_only(confident(y), y).item() == pytest.approx(1 / 3, abs=1e-3)


def test_batch_loss_is_the_mean_of_per_sample_losses():
    """Opacus' per-sample gradients assume it; a batch-pooled Dice would break it."""
    y = regions(1)
    logits = torch.randn_like(y)
    per_sample = torch.stack([region_loss(logits[i : i + 1], y[i : i + 1]) for i in range(2)])
    assert region_loss(logits, y) == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_deep_supervision_weighted_sum_with_resized_targets():
    y = regions(2)
    full, half = torch.randn_like(y), torch.randn(2, 3, 8, 8, 8)
    loss = RegionLoss()
    w = deep_supervision_weights(2)
    assert w == pytest.approx([2 / 3, 1 / 3])
    expected = w[0] * loss(full, y) + w[1] * loss(half, resize_target(y, (8, 8, 8)))
    assert loss([full, half], y) == pytest.approx(expected.item(), rel=1e-6)
    assert loss([full], y) == pytest.approx(loss(full, y).item())
    # a perfect prediction at every level gives a perfect loss
    assert loss([confident(y), confident(resize_target(y, (8, 8, 8)))], y) < 1e-4


def test_resize_target_nearest_vs_maxpool():
    y = torch.zeros(1, 3, 8, 8, 8)
    y[0, 0, 2, 2, 2] = 1  # a single voxel that nearest-neighbour subsampling (odd indices) misses
    assert resize_target(y, (4, 4, 4), "maxpool")[0, 0].sum() == 1
    assert resize_target(y, (4, 4, 4), "nearest")[0, 0].sum() == 0
    assert resize_target(y, (8, 8, 8)) is y
    with pytest.raises(ValueError, match="maxpool"):
        resize_target(y, (4, 4, 4), "cubic")


def test_shape_mismatch_is_refused():
    y = regions()
    with pytest.raises(ValueError, match="full resolution"):
        region_loss(torch.randn(2, 3, 8, 8, 8), y)
    with pytest.raises(ValueError, match="differ"):
        region_loss(torch.randn(2, 4, 16, 16, 16), y)


def test_hierarchical_probabilities_are_nested_and_perfect_logits_give_zero():
    logits = torch.randn(2, 4, 8, 8, 8)
    p = hierarchical_probabilities(logits)
    et, tc, wt = p[:, 0], p[:, 1], p[:, 2]
    assert (et <= tc + 1e-6).all() and (tc <= wt + 1e-6).all() and (wt <= 1 + 1e-6).all()
    labels = torch.randint(0, 4, (2, 8, 8, 8))  # background, NCR, ED, ET
    labels[:, 0, 0, :4] = torch.arange(4)  # every label present
    target = torch.stack([labels == 3, (labels == 1) | (labels == 3), labels > 0], dim=1).float()
    perfect = 30.0 * torch.nn.functional.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    loss = HierarchicalDiceLoss()
    assert loss(perfect, target) < 1e-4
    assert loss(logits, target) > 0.3
    with pytest.raises(ValueError, match="background, NCR, ED, ET"):
        loss(torch.randn(2, 3, 8, 8, 8), target)


def test_hierarchical_dice_waits_for_a_model_with_label_logits():
    """Every registered model outputs region logits (ET, TC, WT), which HierarchicalDiceLoss refuses: the
    loss is kept for the seed papers' softmax-over-labels model (DESIGN section 4). When such a model is
    registered, train it with this loss and turn this test into that model's training test."""
    import inspect

    from fedbrats.shared.constants import REGIONS
    from fedbrats.shared.models import MODELS, available_models

    segmenters = 0
    for name in available_models():
        parameters = inspect.signature(MODELS.get(name)).parameters
        if "out_channels" not in parameters:  # a case-level classifier (n_classes), no voxel logits
            continue
        segmenters += 1
        out_channels = parameters["out_channels"].default
        assert out_channels == len(REGIONS), f"model {name!r} outputs {out_channels} channels: use HierarchicalDiceLoss?"
        with pytest.raises(ValueError, match="expected label logits"):
            HierarchicalDiceLoss()(torch.zeros(1, out_channels, 4, 4, 4), torch.zeros(1, len(REGIONS), 4, 4, 4))
    assert segmenters >= 1


def test_loss_decreases_on_a_tiny_overfit():
    torch.manual_seed(0)
    model = create_model("resunet", width=8, depth=3, deep_supervision=True)
    x = torch.randn(1, 4, 8, 8, 8)
    y = torch.zeros(1, 3, 8, 8, 8)
    y[:, 2, 1:7, 1:7, 2:7] = 1  # WT
    y[:, 1, 2:6, 2:6, 3:6] = 1  # TC
    y[:, 0, 3:5, 3:5, 3:6] = 1  # ET
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = region_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
