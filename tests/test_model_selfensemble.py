"""Self-ensemble U-Net: shapes, the recursive ensemble, labels vs regions, its multitask loss, one step,
DP-SGD, checkpoints, a federated round."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.evaluation.inference import predict_case
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.losses import hierarchical_probabilities
from fedbrats.shared.models.selfensemble import SelfEnsembleUNet, label_targets, region_logits
from fedbrats.shared.tasks import model_loss

from . import model_checks as checks
from .model_checks import nested_batch as batch

TINY = {"width": 8, "depth": 3}
loss = SelfEnsembleUNet.training_loss


def tiny(**extra) -> SelfEnsembleUNet:
    return checks.tiny_model("selfensemble", TINY, **extra)


def test_label_logits_in_training_region_logits_in_eval():
    x, _ = batch(size=32)
    x = x[:, :, :, :, :16]
    model = tiny()
    assert model.train()(x).shape == (2, 4, 32, 32, 16)  # background, NCR, ED, ET
    assert model.eval()(x).shape == (2, 3, 32, 32, 16)  # ET, TC, WT
    deep = tiny(depth=4, deep_supervision=True)
    shapes = [tuple(o.shape) for o in deep.train()(x)]
    assert shapes == [(2, 4, 32, 32, 16), (2, 4, 16, 16, 8), (2, 4, 8, 8, 4)]
    assert deep.eval()(x).shape == (2, 3, 32, 32, 16)
    assert deep.size_multiple == 8
    with pytest.raises(ValueError, match=r"multiples of 2\^\(depth-1\) = 4"):
        model(torch.randn(1, 4, 16, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, X, Y, Z\]"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="out_channels must be 3"):
        create_model("selfensemble", out_channels=4)


def test_eval_regions_are_the_summed_softmax_and_nested():
    model, (x, _) = tiny(se=True), batch(n=1)
    with torch.no_grad():
        labels = model.train()(x)
        regions = torch.sigmoid(model.eval()(x))
    # losses.py's independent formula
    assert torch.allclose(regions, hierarchical_probabilities(labels), atol=1e-5)
    et, tc, wt = regions[:, 0], regions[:, 1], regions[:, 2]
    assert bool((et <= tc + 1e-6).all() and (tc <= wt + 1e-6).all())
    confident = torch.tensor([[60.0, -60.0, -60.0, -60.0]]).view(1, 4, 1, 1, 1)  # sure background: no log(0)
    assert torch.isfinite(region_logits(confident)).all() and region_logits(confident).max() < -50


def test_predictions_of_every_scale_are_added_coarse_to_fine():
    """y_s = Up(y_{s+1}) + y~_s: with the finer heads zeroed, the output is the bottleneck's prediction upsampled."""
    model, (x, _) = tiny(), batch(n=1)
    captured = {}
    model.heads[-1].register_forward_hook(lambda m, i, out: captured.setdefault("bottleneck", out))
    with torch.no_grad():
        for head in model.heads[:-1]:
            head.weight.zero_()
            head.bias.zero_()
        y = model.train()(x)
    expected = captured["bottleneck"]
    for size in (8, 16):
        expected = F.interpolate(expected, size=(size,) * 3, mode="trilinear", align_corners=False)
    assert torch.allclose(y, expected, atol=1e-6)
    with torch.no_grad():
        model.heads[0].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        assert torch.allclose(model(x) - y, torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 4, 1, 1, 1), atol=1e-5)


def test_labels_from_nested_regions():
    voxels = [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]  # (ET, TC, WT) of 4 voxels
    regions = torch.tensor(voxels).T.reshape(1, 3, 4, 1, 1)  # background, WT only (edema), TC without ET, ET
    assert label_targets(regions).flatten().tolist() == [0, 2, 1, 3]


def test_multitask_loss_is_cross_entropy_plus_region_bce_in_both_modes():
    model, (x, regions) = tiny(), batch()
    with torch.no_grad():
        labels = model.train()(x)
        expected = F.cross_entropy(labels, label_targets(regions)) + F.binary_cross_entropy(
            hierarchical_probabilities(labels), regions
        )
        assert loss(labels, regions).item() == pytest.approx(expected.item(), rel=1e-5)
        # region logits, as client.trainer.loss_on scores in eval mode
        assert loss(model.eval()(x), regions).item() == pytest.approx(expected.item(), rel=1e-4)
    assert model_loss("selfensemble") is SelfEnsembleUNet.training_loss
    with pytest.raises(ValueError, match="label logits .* or region logits"):
        loss(torch.zeros(2, 5, 16, 16, 16), regions)
    deep = tiny(deep_supervision=True)
    outs = deep.train()(x)
    assert loss(outs, regions).item() > 0 and len(outs) == 2


def test_one_optimiser_step_lowers_the_loss_on_a_fixed_batch():
    checks.one_step_lowers_loss(tiny(deep_supervision=True), loss, *batch())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_validation_and_per_sample_gradients():
    model = tiny(deep_supervision=True, se=True)
    checks.assert_opacus_valid(model, strict=False)
    checks.assert_per_sample_gradients(model, loss, *batch(size=8))


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
def test_one_dp_sgd_round_trains_and_spends_budget(tmp_path):
    checks.dp_sgd_steps(tiny(depth=2), loss, *batch(n=4, size=8), tmp_path, steps=2)


def test_checkpoint_round_trip(tmp_path):
    model = tiny(deep_supervision=True, se=True)
    _, meta = checks.checkpoint_round_trip(
        model, tmp_path / "se.safetensors", batch(n=1)[0], patch_size=[16, 16, 16]
    )
    assert meta["model_config"]["se"] is True


def test_parameters_at_width_16_depth_4():
    assert count_parameters(create_model("selfensemble", width=16, depth=4)) == 1_350_416


@pytest.mark.slow
def test_one_federated_round_then_predict_a_case(tmp_path):
    checkpoint, record, root = checks.federated_round(
        tmp_path, "selfensemble", model_depth=2, deep_supervision=True
    )
    model, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == "selfensemble" and meta["model_config"]["deep_supervision"] is True
    case = next(p for p in sorted(root.iterdir()) if p.is_dir())
    written = predict_case(checkpoint, case, tmp_path / "pred", tta=False, device="cpu")
    assert written["labels"].is_file() and written["uncertainty_WT"].is_file()
    assert all(0.0 <= e["dice-WT"] <= 1.0 for e in record["evaluate"])


def test_multitask_head_on_the_bottleneck_learns_with_the_papers_loss():
    from fedbrats.shared.tasks import MultitaskTask

    model = tiny(n_classes=2)
    x, regions = batch(size=16)
    segmentation, logits = model(x)
    assert segmentation.shape[1] == 4 and logits.shape == (x.shape[0], 2)  # label logits in training
    task = MultitaskTask(weight=1.0, model_loss_fn=model_loss("selfensemble"))
    task.loss((segmentation, logits), (regions, torch.zeros(x.shape[0]))).backward()
    assert model.class_head.linear.weight.grad.abs().sum() > 0 and model.heads[0].weight.grad.abs().sum() > 0
    model.eval()
    assert model(x)[0].shape[1] == 3  # region logits in eval, as without the head
    assert count_parameters(model) - count_parameters(tiny()) == 2 * (model.class_head.in_channels + 1)
    with pytest.raises(ValueError, match="n_classes must be 0"):
        tiny(n_classes=1)
