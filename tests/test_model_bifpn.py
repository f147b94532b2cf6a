"""The BiFPN network with the slice-wise classification branch (seed paper): shapes, fusion, loss, slice labels,
false-positive removal, DP (Opacus validation, per-sample gradients, a DP-SGD step), checkpoints, a federated round."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedbrats.shared.checkpoint import load_checkpoint, save_checkpoint
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.bifpn import FUSION_EPS, BiFPNNet, FastFusion
from fedbrats.shared.models.classifier import dp_problem
from fedbrats.shared.models.losses import region_loss
from fedbrats.shared.models.slice_branch import REMOVED_LOGIT, slice_labels, slice_loss
from fedbrats.shared.tasks import model_loss

TINY = {"width": 8, "depth": 3, "bifpn_layers": 2}
SIZE = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**extra) -> BiFPNNet:
    torch.manual_seed(0)
    return create_model("bifpn", **{**TINY, **extra})


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
    model = tiny().train()
    x, regions = batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = BiFPNNet.training_loss(model(x), regions)
    before.backward()
    assert model.bifpn[0].bottom_up_fusion[0].weight.grad.abs().sum() > 0
    assert model.slice_branch.upsample[0].weight.grad.abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = BiFPNNet.training_loss(model(x), regions)
    assert float(after) < float(before.detach())


# ---- differential privacy -------------------------------------------------------------------------------------


def test_opacus_validates_it_and_it_holds_no_buffers():
    model = tiny()
    assert ModuleValidator.validate(model, strict=True) == [] and dp_problem(model) is None
    assert list(model.buffers()) == []


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_match_single_sample_backward(mode):
    """Fusion weights, the transposed conv and the reused LSTM cells included."""
    model = tiny(bifpn_layers=1)
    reference = copy.deepcopy(model)
    x, regions = batch(2, 8)
    BiFPNNet.training_loss(wrap_model(model, mode, loss_reduction="mean")(x), regions).backward()
    for i in range(2):
        reference.zero_grad()
        BiFPNNet.training_loss(reference(x[i : i + 1]), regions[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name


def test_one_dp_sgd_step_through_the_sites_privacy_path(tmp_path):
    from fedbrats.client.ledger import PrivacyLedger
    from fedbrats.client.privacy import DPConfig, train_private
    from fedbrats.client.trainer import TrainConfig

    model = tiny(bifpn_layers=1)
    before = [p.detach().clone() for p in model.parameters()]
    x, regions = batch(4, 8)
    data = torch.utils.data.TensorDataset(x, regions)
    dp = DPConfig(epsilon=100.0, noise_multiplier=1.0, max_grad_norm=1.0, planned_rounds=1)
    result = train_private(model, data, TrainConfig(steps=1, batch_size=2, lr=1e-3), dp, PrivacyLedger.at(tmp_path),
                           round=1, loss_fn=BiFPNNet.training_loss)  # fmt: skip
    assert result.steps == 1 and result.epsilon > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert set(model.state_dict()) == set(
        tiny(bifpn_layers=1).state_dict()
    )  # same architecture, DP on or off


# ---- checkpoints and the federation ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_model_from_metadata(tmp_path):
    model = tiny(se=True)
    path = save_checkpoint(tmp_path / "bifpn.safetensors", model, extra={"round": 2})
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is BiFPNNet and meta["model_name"] == "bifpn"
    assert meta["model_config"]["bifpn_layers"] == 2 and meta["model_config"]["se"] is True
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
                       out_dir=str(tmp_path / "run"), model="bifpn", model_width=8, model_depth=3,
                       model_bifpn_layers=1, patch_size=16, batch_size=2, local_steps=1, cache="memory",
                       val_fraction=0.5, min_sites=1)  # fmt: skip
    checkpoint = run_server(LocalGrid(config.to_flower(), sites=2), config)
    record = read_history(tmp_path / "run" / "history.jsonl")[0]
    assert record["status"] == "ok" and all(t["dropped"] is None for t in record["train"])
    assert set(record["mean_dice"]) == {"ET", "TC", "WT"}
    model, meta = load_checkpoint(checkpoint)
    assert type(model) is BiFPNNet and meta["model_config"]["bifpn_layers"] == 1
