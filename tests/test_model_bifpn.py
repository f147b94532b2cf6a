"""The BiFPN network with the slice-wise classification branch (seed paper): shapes, fusion, loss, slice labels,
false-positive removal, DP (Opacus validation, per-sample gradients, a DP-SGD step), checkpoints, a federated round."""

from __future__ import annotations

import pytest
import torch

from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.bifpn import FUSION_EPS, BiFPNNet, FastFusion
from fedbrats.shared.models.losses import region_loss
from fedbrats.shared.models.slice_branch import REMOVED_LOGIT, slice_labels, slice_loss
from fedbrats.shared.tasks import model_loss

from . import model_checks as checks

TINY = {"width": 8, "depth": 3, "bifpn_layers": 2}
SIZE = 16
loss = BiFPNNet.training_loss


def tiny(**extra) -> BiFPNNet:
    return checks.tiny_model("bifpn", TINY, **extra)


def batch(n: int = 2, size: int = SIZE):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 4, size, size, size, generator=g)
    regions = torch.zeros(n, 3, size, size, size)
    regions[:, 2, 2:10, 3:11, 2:7] = 1  # WT on slices 2..6
    regions[:, 1, 4:8, 4:8, 3:5] = 1  # TC on slices 3..4
    regions[n - 1, 0, 5, 5, 4] = 1  # ET: one voxel on slice 4 of the last sample
    return images, regions


# ---- shapes ---------------------------------------------------------------------------------------------


def test_training_returns_logits_and_full_length_slice_logits_eval_one_tensor():
    model = tiny()
    x, _ = batch()
    logits, slices = model.train()(x)
    assert logits.shape == (2, 3, SIZE, SIZE, SIZE)
    assert slices.shape == (2, 3, SIZE)  # features at half resolution, axial axis upsampled back to 16 slices
    assert model.slice_branch.upsample is not None
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, SIZE, SIZE, SIZE)
    rectangular = create_model("bifpn", width=8, depth=4, bifpn_layers=1).eval()
    assert rectangular(torch.randn(1, 4, 16, 24, 8)).shape == (1, 3, 16, 24, 8)


def test_encoder_scales_follow_depth_and_the_branch_is_optional():
    assert (
        len(create_model("bifpn", width=8, depth=5, bifpn_layers=1).encoder) == 4
    )  # the paper's four scales
    plain = tiny(slice_branch=False)
    x, _ = batch(1)
    assert plain.slice_branch is None and plain.train()(x).shape == (1, 3, SIZE, SIZE, SIZE)
    assert not any(k.startswith("slice_branch") for k in plain.state_dict())
    assert len(tiny(bifpn_layers=3).bifpn) == 3


def test_input_or_configuration_that_does_not_fit_is_refused():
    model = tiny()
    assert model.size_multiple == 4
    with pytest.raises(ValueError, match=r"\(16, 16, 10\) must be multiples of 2\^\(depth-1\) = 4"):
        model(torch.randn(1, 4, 16, 16, 10))
    with pytest.raises(ValueError, match=r"\[B, 4, X, Y, Z\]"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="depth must be at least 3"):
        create_model("bifpn", depth=2)
    with pytest.raises(ValueError, match="bifpn_layers must be at least 1"):
        create_model("bifpn", bifpn_layers=0)


def test_parameter_counts_the_docstring_states():
    assert count_parameters(create_model("bifpn", width=16, depth=4)) == 2_508_545
    assert count_parameters(create_model("bifpn", width=16, depth=4, slice_branch=False)) == 1_998_974
    assert count_parameters(create_model("bifpn", width=16, depth=5)) == 4_296_656


def test_fast_normalised_fusion_is_a_relu_weighted_average():
    fusion = FastFusion(3)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([3.0, 1.0, -2.0]))  # a negative weight counts as 0
    a, b, c = torch.ones(1, 2, 2, 2, 2), torch.full((1, 2, 2, 2, 2), 5.0), torch.full((1, 2, 2, 2, 2), 100.0)
    expected = (3 * a + 1 * b) / (4 + FUSION_EPS)
    assert torch.allclose(fusion(torch.stack([a, b, c], dim=1)), expected)


# ---- slice labels, loss, false-positive removal ----------------------------------------------------------------


def test_slice_labels_by_hand_and_the_loss_is_region_plus_slice_loss():
    x, regions = batch()
    labels = slice_labels(regions)
    assert labels[0, 0].sum() == 0 and labels[1, 0].nonzero().flatten().tolist() == [4]
    assert labels[0, 1].nonzero().flatten().tolist() == [3, 4]
    assert labels[1, 2].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert model_loss("bifpn") is BiFPNNet.training_loss
    outputs = tiny().train()(x)
    expected = region_loss(outputs[0], regions) + slice_loss(outputs[1], labels)
    assert torch.allclose(BiFPNNet.training_loss(outputs, regions), expected)


def test_fp_removal_clears_a_region_on_a_slice_the_branch_calls_negative():
    model = tiny().eval()
    x, _ = batch(1)
    classify = (
        model.slice_branch.classify
    )  # the branch's last layer: constant verdicts, WT negative everywhere
    with torch.no_grad():
        classify.weight.zero_()
        classify.bias.copy_(torch.tensor([4.0, 4.0, -4.0]))
    kept, slices = model.segment_and_classify(x)
    assert slices.shape == (1, 3, SIZE)
    out = model(x)
    assert torch.all(out[0, 2] == REMOVED_LOGIT) and torch.equal(out[0, :2], kept[0, :2])
    model.fp_removal = False
    assert torch.equal(model(x), kept)


# ---- training ----------------------------------------------------------------------------------------------


def test_one_adam_step_lowers_the_loss_and_reaches_fusion_weights():
    model = tiny()

    def fusion_and_branch_learn():
        assert model.bifpn[0].bottom_up_fusion[0].weight.grad.abs().sum() > 0
        assert model.slice_branch.upsample[0].weight.grad.abs().sum() > 0

    checks.one_step_lowers_loss(model, loss, *batch(), lr=3e-3, after_backward=fusion_and_branch_learn)


# ---- differential privacy -------------------------------------------------------------------------------------


def test_opacus_validates_it_and_it_holds_no_buffers():
    checks.assert_opacus_valid(tiny())


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_match_single_sample_backward(mode):
    """Fusion weights, the transposed conv and the reused LSTM cells included."""
    checks.assert_per_sample_gradients(tiny(bifpn_layers=1), loss, *batch(2, 8), mode=mode)


def test_one_dp_sgd_step_through_the_sites_privacy_path(tmp_path):
    model = tiny(bifpn_layers=1)
    checks.dp_sgd_steps(model, loss, *batch(4, 8), tmp_path)
    assert set(model.state_dict()) == set(
        tiny(bifpn_layers=1).state_dict()
    )  # same architecture, DP on or off


# ---- checkpoints and the federation ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_model_from_metadata(tmp_path):
    model = tiny(se=True)
    _, meta = checks.checkpoint_round_trip(model, tmp_path / "bifpn.safetensors", batch(1)[0], round=2)
    assert meta["model_config"]["bifpn_layers"] == 2 and meta["model_config"]["se"] is True


@pytest.mark.slow
def test_one_federated_round_through_the_real_site_handlers(tmp_path):
    checkpoint, _, _ = checks.federated_round(tmp_path, "bifpn", cases_per_site=2, model_depth=3,
                                              model_bifpn_layers=1, val_fraction=0.5)  # fmt: skip
    model, meta = load_checkpoint(checkpoint)
    assert type(model) is BiFPNNet and meta["model_config"]["bifpn_layers"] == 1
