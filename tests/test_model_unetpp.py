"""UNet++ with the slice-wise classification branch (seed paper): shapes, loss, slice labels, false-positive
removal, DP (Opacus validation, per-sample gradients, a DP-SGD step), checkpoints, a federated round."""

from __future__ import annotations

import pytest
import torch

from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.slice_branch import (
    REMOVED_LOGIT,
    BiLSTM,
    remove_false_positives,
    slice_labels,
    slice_loss,
)
from fedbrats.shared.models.unetpp import UNetPlusPlus
from fedbrats.shared.tasks import model_loss

from . import model_checks as checks

TINY = {"width": 8, "depth": 3}
SIZE = 16
loss = UNetPlusPlus.training_loss


def tiny(**extra) -> UNetPlusPlus:
    return checks.tiny_model("unetpp", TINY, **extra)


def batch(n: int = 2, size: int = SIZE):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 4, size, size, size, generator=g)
    regions = torch.zeros(n, 3, size, size, size)
    regions[:, 2, 4:12, 4:12, 3:9] = 1  # WT on slices 3..8
    regions[:, 1, 6:10, 6:10, 4:8] = 1  # TC on slices 4..7
    regions[0, 0, 7:9, 7:9, 5:7] = 1  # ET on slices 5..6 of the first sample only
    return images, regions


# ---- shapes ---------------------------------------------------------------------------------------------


def test_training_returns_nested_outputs_and_slice_logits_eval_one_tensor():
    model = tiny(deep_supervision=True)
    x, _ = batch()
    segmentation, slices = model.train()(x)
    assert [tuple(s.shape) for s in segmentation] == [(2, 3, SIZE, SIZE, SIZE)] * 2  # X[0][2], X[0][1]
    assert slices.shape == (2, 3, SIZE)
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, SIZE, SIZE, SIZE)
    logits, eval_slices = model.segment_and_classify(x)
    assert torch.allclose(logits, (segmentation[0] + segmentation[1]) / 2, atol=1e-5)  # heads averaged
    assert torch.equal(out, remove_false_positives(logits, eval_slices))


def test_without_branch_or_deep_supervision_the_outputs_are_plain():
    x, _ = batch(1)
    plain = tiny(slice_branch=False, deep_supervision=False)
    assert plain.slice_branch is None and len(plain.heads) == 1
    assert plain.train()(x).shape == (1, 3, SIZE, SIZE, SIZE)
    assert plain.eval()(x).shape == (1, 3, SIZE, SIZE, SIZE)
    assert not any(k.startswith("slice_branch") for k in plain.state_dict())
    assert create_model("unetpp", width=8, depth=4).eval()(torch.randn(1, 4, 16, 24, 8)).shape == (
        1,
        3,
        16,
        24,
        8,
    )


def test_input_that_does_not_fit_is_refused_with_its_shape():
    model = tiny()
    assert model.size_multiple == 4
    with pytest.raises(ValueError, match=r"\(16, 18, 16\) must be multiples of 2\^\(depth-1\) = 4"):
        model(torch.randn(1, 4, 16, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, X, Y, Z\], got shape \(1, 3, 16, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("unetpp", width=12)


def test_parameter_counts_the_docstring_states():
    assert count_parameters(create_model("unetpp", width=16, depth=4)) == 1_638_748
    assert count_parameters(create_model("unetpp", width=16, depth=4, slice_branch=False)) == 1_530_713


# ---- slice labels, loss, false-positive removal ----------------------------------------------------------------


def test_slice_labels_from_masks_by_hand():
    _, regions = batch()
    labels = slice_labels(regions)
    assert labels.shape == (2, 3, SIZE)
    z = torch.arange(SIZE)
    wt = ((z >= 3) & (z <= 8)).float()
    tc = ((z >= 4) & (z <= 7)).float()
    et = ((z >= 5) & (z <= 6)).float()
    assert torch.equal(labels[0], torch.stack([et, tc, wt]))
    assert torch.equal(labels[1], torch.stack([torch.zeros(SIZE), tc, wt]))  # no ET in the second sample
    one_voxel = torch.zeros(1, 3, 4, 4, 5)
    one_voxel[0, 1, 3, 0, 2] = 1  # a single voxel makes its slice positive
    assert (
        slice_labels(one_voxel)[0, 1].tolist() == [0, 0, 1, 0, 0] and slice_labels(one_voxel)[0, 0].sum() == 0
    )


def test_slice_loss_is_focal_plus_bce_and_small_when_right():
    labels = torch.tensor([[[0.0, 1.0]]])
    logits = torch.tensor([[[0.0, 0.0]]])
    # p = 0.5 everywhere: BCE = log 2, focal = 0.25 log 2
    assert float(slice_loss(logits, labels)) == pytest.approx(1.25 * torch.log(torch.tensor(2.0)).item())
    assert float(slice_loss(torch.tensor([[[-9.0, 9.0]]]), labels)) < 1e-3
    with pytest.raises(ValueError, match="differ in shape"):
        slice_loss(logits, labels[..., :1])


class FixedSlices(torch.nn.Module):
    """A stand-in branch whose verdicts are given."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(features.shape[0], -1, -1)


def test_fp_removal_clears_a_region_on_a_slice_the_branch_calls_negative():
    model = tiny().eval()
    x, _ = batch(1)
    verdicts = torch.full((1, 3, SIZE), 5.0)
    verdicts[0, 0, 7] = -5.0  # ET negative on slice 7 only
    model.slice_branch = FixedSlices(verdicts)
    kept, _ = model.segment_and_classify(x)
    out = model(x)
    assert torch.all(out[0, 0, :, :, 7] == REMOVED_LOGIT) and torch.sigmoid(out[0, 0, :, :, 7]).max() == 0
    assert torch.equal(out[0, 0, :, :, :7], kept[0, 0, :, :, :7]) and torch.equal(out[0, 1:], kept[0, 1:])
    model.fp_removal = False  # switchable after loading
    assert torch.equal(model(x), kept)
    with pytest.raises(ValueError, match="do not fit"):
        remove_false_positives(kept, verdicts[..., :4])


def test_the_linear_bilstm_computes_what_torchs_lstm_computes():
    """Our BiLSTM (Linear cells, so that Opacus can clip per patient) is PyTorch's bidirectional LSTM."""
    torch.manual_seed(0)
    ours = BiLSTM(3, 4, layers=2)
    torchs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    with torch.no_grad():
        for layer in range(2):
            for suffix, cells in (("", ours.forward_cells), ("_reverse", ours.backward_cells)):
                getattr(torchs, f"weight_ih_l{layer}{suffix}").copy_(cells[layer].input.weight)
                getattr(torchs, f"bias_ih_l{layer}{suffix}").copy_(cells[layer].input.bias)
                getattr(torchs, f"weight_hh_l{layer}{suffix}").copy_(cells[layer].recurrent.weight)
                getattr(torchs, f"bias_hh_l{layer}{suffix}").zero_()
    seq = torch.randn(2, 6, 3)
    assert torch.allclose(ours(seq), torchs(seq)[0], atol=1e-6)


# ---- training ----------------------------------------------------------------------------------------------


def test_the_task_uses_the_models_loss_and_one_adam_step_lowers_it():
    assert model_loss("unetpp") is UNetPlusPlus.training_loss
    model = tiny(deep_supervision=True)
    x, regions = batch()

    def branch_and_every_head_learn():
        assert model.slice_branch.classify.weight.grad.abs().sum() > 0
        assert model.heads[1].weight.grad.abs().sum() > 0

    checks.one_step_lowers_loss(model, loss, x, regions, lr=3e-3, after_backward=branch_and_every_head_learn)
    with torch.no_grad():
        scored = loss(model.eval()(x), regions)  # eval output: segmentation loss only
    assert float(scored) > 0


# ---- differential privacy -------------------------------------------------------------------------------------


def test_opacus_validates_it_and_it_holds_no_buffers():
    checks.assert_opacus_valid(tiny())


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_match_single_sample_backward(mode):
    """What DP-SGD relies on, here through the BiLSTM whose Linear cells are reused at every slice."""
    checks.assert_per_sample_gradients(tiny(depth=2, deep_supervision=True), loss, *batch(2, 8), mode=mode)


def test_one_dp_sgd_step_through_the_sites_privacy_path(tmp_path):
    model = tiny(depth=2)
    checks.dp_sgd_steps(model, loss, *batch(4, 8), tmp_path)
    assert set(model.state_dict()) == set(
        tiny(depth=2).state_dict()
    )  # the same architecture with DP on or off


# ---- checkpoints and the federation ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_model_from_metadata(tmp_path):
    model = tiny(deep_supervision=True, fp_removal=False)
    _, meta = checks.checkpoint_round_trip(model, tmp_path / "unetpp.safetensors", batch(1)[0], round=1)
    assert meta["model_config"]["slice_branch"] is True and meta["model_config"]["fp_removal"] is False


@pytest.mark.slow
def test_one_federated_round_through_the_real_site_handlers(tmp_path):
    checkpoint, _, _ = checks.federated_round(tmp_path, "unetpp", cases_per_site=2, model_depth=2,
                                              deep_supervision=True, val_fraction=0.5)  # fmt: skip
    model, meta = load_checkpoint(checkpoint)
    assert type(model) is UNetPlusPlus and meta["model_config"]["deep_supervision"] is True
