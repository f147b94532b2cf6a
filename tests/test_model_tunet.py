"""TuNet cascade: shapes, the cascade's wiring, its loss, one step, DP-SGD, checkpoints, a federated round."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.evaluation.inference import predict_case
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.tunet import TuNet
from fedbrats.shared.tasks import model_loss

from . import model_checks as checks
from .model_checks import nested_batch as batch

TINY = {"width": 8, "depth": 3}
loss = TuNet.training_loss


def tiny(**extra) -> TuNet:
    return checks.tiny_model("tunet", TINY, **extra)


def test_region_logits_in_train_and_eval_with_a_clear_error_on_bad_input():
    model = tiny()
    x, _ = batch(size=32)
    out = model.train()(x[:, :, :, :, :16])
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32, 16)
    assert tiny(depth=2).eval()(x[:1, :, :16, :16, :16]).shape == (1, 3, 16, 16, 16)
    assert model.size_multiple == 4
    with pytest.raises(ValueError, match=r"multiples of 2\^\(depth-1\) = 4"):
        model(torch.randn(1, 4, 16, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, X, Y, Z\]"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="out_channels must be 3"):
        create_model("tunet", out_channels=4)
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("tunet", width=12)


def test_the_cascade_feeds_each_network_the_previous_probability_maps():
    model = tiny().eval()
    assert [model.wnet.encoder[0].conv1.in_channels, model.cnet.encoder[0].conv1.in_channels,
            model.enet.encoder[0].conv1.in_channels] == [4, 5, 6]  # fmt: skip
    assert all(m.se.__class__.__name__ == "SEBlock" for m in model.modules() if hasattr(m, "se"))
    x, _ = batch(n=1)
    with torch.no_grad():
        before = model(x)
        model.wnet.head.bias += 3.0  # only W-Net's output moves: WT directly, TC and ET through P(WT)
        after = model(x)
    assert not torch.allclose(after[:, 2], before[:, 2]) and not torch.allclose(after[:, 1], before[:, 1])
    assert not torch.allclose(after[:, 0], before[:, 0])
    with torch.no_grad():
        model.enet.head.bias += 3.0  # E-Net is last: only ET moves
        last = model(x)
    assert torch.equal(last[:, 1:], after[:, 1:]) and not torch.allclose(last[:, 0], after[:, 0])


def test_loss_is_the_sum_of_three_soft_dice_losses_and_the_task_uses_it():
    x, regions = batch()
    logits = torch.randn_like(regions)
    monai = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, reduction="none")(logits, regions)
    assert loss(logits, regions).item() == pytest.approx(monai.flatten(1).sum(1).mean().item(), rel=1e-5)
    assert 0.0 <= loss(logits, regions).item() <= 3.0
    assert loss(regions * 40 - 20, regions).item() < 1e-3  # near-perfect logits
    assert model_loss("tunet") is TuNet.training_loss
    with pytest.raises(ValueError, match="differ in shape"):
        loss(logits[:, :2], regions)


def test_one_optimiser_step_lowers_the_loss_on_a_fixed_batch():
    checks.one_step_lowers_loss(tiny(), loss, *batch())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_validation_and_per_sample_gradients():
    model = tiny(depth=2)
    checks.assert_opacus_valid(model, strict=False)
    checks.assert_per_sample_gradients(model, loss, *batch(size=8))  # what DP-SGD builds


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
def test_one_dp_sgd_round_trains_and_spends_budget(tmp_path):
    model = tiny(depth=2)
    checks.dp_sgd_steps(model, loss, *batch(n=4, size=8), tmp_path, steps=2)
    assert not hasattr(next(model.parameters()), "grad_sample")


def test_checkpoint_round_trip(tmp_path):
    model = tiny(dropout=0.1, act="relu")
    _, meta = checks.checkpoint_round_trip(model, tmp_path / "tunet.safetensors", batch(n=1)[0],
                                           patch_size=[16, 16, 16])  # fmt: skip
    assert meta["model_config"]["act"] == "relu"


def test_parameters_at_width_16_depth_4():
    assert count_parameters(create_model("tunet", width=16, depth=4)) == 4_185_819  # the docstring's number


@pytest.mark.slow
def test_one_federated_round_then_predict_a_case(tmp_path):
    checkpoint, _, root = checks.federated_round(tmp_path, "tunet", model_depth=2, warmup_steps=2)
    model, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == "tunet" and isinstance(model, TuNet)
    case = next(p for p in sorted(root.iterdir()) if p.is_dir())
    written = predict_case(checkpoint, case, tmp_path / "pred", tta=False, device="cpu")
    labels = nib.load(written["labels"])
    assert labels.shape == nib.load(next(case.glob("*_flair.nii.gz"))).shape
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2, 4}
    unc = np.asarray(nib.load(written["uncertainty_ET"]).dataobj)
    assert unc.min() >= 0 and unc.max() <= 100
