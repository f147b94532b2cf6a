"""UNet++ with the slice-wise classification branch (seed paper): shapes, loss, slice labels, false-positive
removal, DP (Opacus validation, per-sample gradients, a DP-SGD step), checkpoints, a federated round."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedbrats.shared.checkpoint import load_checkpoint, save_checkpoint
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.classifier import dp_problem
from fedbrats.shared.models.slice_branch import (
    REMOVED_LOGIT,
    BiLSTM,
    remove_false_positives,
    slice_labels,
    slice_loss,
)
from fedbrats.shared.models.unetpp import UNetPlusPlus
from fedbrats.shared.tasks import model_loss

TINY = {"width": 8, "depth": 3}
SIZE = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**extra) -> UNetPlusPlus:
    torch.manual_seed(0)
    return create_model("unetpp", **{**TINY, **extra})


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
    model = tiny(deep_supervision=True).train()
    x, regions = batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = UNetPlusPlus.training_loss(model(x), regions)
    before.backward()
    assert (
        model.slice_branch.classify.weight.grad.abs().sum() > 0 and model.heads[1].weight.grad.abs().sum() > 0
    )
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = UNetPlusPlus.training_loss(model(x), regions)
        scored = UNetPlusPlus.training_loss(model.eval()(x), regions)  # eval output: segmentation loss only
    assert float(after) < float(before.detach()) and float(scored) > 0


# ---- differential privacy -------------------------------------------------------------------------------------


def test_opacus_validates_it_and_it_holds_no_buffers():
    model = tiny()
    assert ModuleValidator.validate(model, strict=True) == [] and dp_problem(model) is None
    assert list(model.buffers()) == []


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_match_single_sample_backward(mode):
    """What DP-SGD relies on, here through the BiLSTM whose Linear cells are reused at every slice."""
    model = tiny(depth=2, deep_supervision=True)
    reference = copy.deepcopy(model)
    x, regions = batch(2, 8)
    UNetPlusPlus.training_loss(wrap_model(model, mode, loss_reduction="mean")(x), regions).backward()
    for i in range(2):
        reference.zero_grad()
        UNetPlusPlus.training_loss(reference(x[i : i + 1]), regions[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name


def test_one_dp_sgd_step_through_the_sites_privacy_path(tmp_path):
    from fedbrats.client.ledger import PrivacyLedger
    from fedbrats.client.privacy import DPConfig, train_private
    from fedbrats.client.trainer import TrainConfig

    model = tiny(depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    x, regions = batch(4, 8)
    data = torch.utils.data.TensorDataset(x, regions)
    dp = DPConfig(epsilon=100.0, noise_multiplier=1.0, max_grad_norm=1.0, planned_rounds=1)
    result = train_private(model, data, TrainConfig(steps=1, batch_size=2, lr=1e-3), dp, PrivacyLedger.at(tmp_path),
                           round=1, loss_fn=UNetPlusPlus.training_loss)  # fmt: skip
    assert result.steps == 1 and result.epsilon > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert set(model.state_dict()) == set(
        tiny(depth=2).state_dict()
    )  # the same architecture with DP on or off


# ---- checkpoints and the federation ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_model_from_metadata(tmp_path):
    model = tiny(deep_supervision=True, fp_removal=False)
    path = save_checkpoint(tmp_path / "unetpp.safetensors", model, extra={"round": 1})
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is UNetPlusPlus and meta["model_name"] == "unetpp"
    assert meta["model_config"]["slice_branch"] is True and meta["model_config"]["fp_removal"] is False
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x, _ = batch(1)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.slow
def test_one_federated_round_through_the_real_site_handlers(tmp_path):
    from fedbrats.server.app import run_server
    from fedbrats.server.history import read_history
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.data.phantom import generate_phantom

    from .local_grid import LocalGrid

    root = tmp_path / "phantom"
    generate_phantom(root, sites=2, cases_per_site=2, voxel_size=5.0, seed=3, progress=False)
    config = RunConfig(rounds=1, data_dir=str(root), partition=str(root / "partitioning_1.csv"),
                       out_dir=str(tmp_path / "run"), model="unetpp", model_width=8, model_depth=2,
                       deep_supervision=True, patch_size=16, batch_size=2, local_steps=1, cache="memory",
                       val_fraction=0.5, min_sites=1)  # fmt: skip
    checkpoint = run_server(LocalGrid(config.to_flower(), sites=2), config)
    record = read_history(tmp_path / "run" / "history.jsonl")[0]
    assert record["status"] == "ok" and all(t["dropped"] is None for t in record["train"])
    assert set(record["mean_dice"]) == {"ET", "TC", "WT"}
    model, meta = load_checkpoint(checkpoint)
    assert type(model) is UNetPlusPlus and meta["model_config"]["deep_supervision"] is True
