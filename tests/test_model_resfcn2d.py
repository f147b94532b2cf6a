"""`resfcn2d` and the slice-wise wrapper: shapes, slice-by-slice equality, the hierarchical loss, DP-SGD
per patient (not per slice), checkpoints, and one federated round on a tiny phantom."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.models import available_models, count_parameters, create_model
from fedbrats.shared.models.classifier import dp_problem
from fedbrats.shared.models.losses import hierarchical_probabilities
from fedbrats.shared.models.resfcn2d import ResFCN2d
from fedbrats.shared.models.slicewise import Slicewise, fold_slices, unfold_slices
from fedbrats.shared.tasks import model_loss

from . import model_checks as checks

TINY = {"width": 8, "depth": 3}


def tiny(**extra) -> ResFCN2d:
    return checks.tiny_model("resfcn2d", TINY, **extra)


def _batch(b: int = 2, size: int = 16, z: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Slabs of `z` axial slices with nested regions that depend on the input."""
    return checks.nested_batch(b, size, seed, z=z, et_threshold=0.5)


# ---- the slice-wise wrapper ---------------------------------------------------------------------------


def test_fold_and_unfold_are_inverse_and_keep_slices_of_a_patient_together():
    x = torch.randn(2, 4, 6, 5, 3)
    folded = fold_slices(x)
    assert folded.shape == (6, 4, 6, 5)
    assert torch.equal(folded[1], x[0, :, :, :, 1]) and torch.equal(folded[3], x[1, :, :, :, 0])
    assert torch.equal(unfold_slices(folded, 2), x)
    pair = unfold_slices((folded, [folded[:, :1]]), 2)
    assert torch.equal(pair[0], x) and torch.equal(pair[1][0], x[:, :1])
    with pytest.raises(ValueError, match=r"\[B\*Z, ...\]"):
        unfold_slices(torch.randn(5, 3), 2)


@pytest.mark.parametrize("name", ["plain", "resfcn2d"])
def test_wrapper_output_equals_the_2d_network_slice_by_slice(name):
    torch.manual_seed(0)
    if name == "plain":
        net = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(8, 8), nn.LeakyReLU(), nn.Conv2d(8, 3, 1)
        )
        model = Slicewise(net, in_channels=4)
    else:
        model = tiny()
        net = model.net
    with torch.no_grad():
        model.gain.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))  # the gain scales each modality before the net
    x = torch.randn(2, 4, 16, 12, 5)
    model.train()  # training outputs are the 2D network's own (label logits for resfcn2d)
    with torch.no_grad():
        got = model(x)
        scaled = x * model.gain.view(1, -1, 1, 1, 1)
        expected = torch.stack([net(scaled[..., z]) for z in range(x.shape[-1])], dim=-1)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_wrapper_checks_its_input_and_leaves_the_axial_size_free():
    model = tiny()
    assert model.size_multiple == 4
    assert model(torch.randn(1, 4, 16, 8, 7)).shape == (1, 4, 16, 8, 7)  # any Z, in-plane multiples of 4
    with pytest.raises(ValueError, match=r"in-plane sizes \(16, 10\) must be multiples of 4"):
        model(torch.randn(1, 4, 16, 10, 8))
    with pytest.raises(ValueError, match=r"\[B, 4, X, Y, Z\]"):
        model(torch.randn(1, 3, 16, 16, 8))


# ---- resfcn2d -------------------------------------------------------------------------------------


def test_registered_with_its_configuration_and_bad_values_refused():
    assert "resfcn2d" in available_models()
    model = tiny()
    assert model.model_name == "resfcn2d"
    assert model.config == {"in_channels": 4, "out_channels": 3, "width": 8, "depth": 3, "dropout": 0.0,
                            "act": "leakyrelu", "se": False}  # fmt: skip
    assert model_loss("resfcn2d") is ResFCN2d.training_loss
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("resfcn2d", width=12)
    with pytest.raises(ValueError, match="out_channels must be 3"):
        create_model("resfcn2d", out_channels=4)
    with pytest.raises(ValueError, match="activation"):
        create_model("resfcn2d", act="gelu")


def test_parameter_counts_stated_in_the_docstring():
    assert count_parameters(create_model("resfcn2d", width=16, depth=4)) == 472_840
    assert count_parameters(create_model("resfcn2d")) == 7_591_944


def test_label_logits_in_training_and_hierarchical_region_logits_in_eval():
    model = tiny(se=True)
    x, _ = _batch()
    labels = model.train()(x)
    assert labels.shape == (2, 4, 16, 16, 6)
    regions = model.eval()(x)
    assert regions.shape == (2, 3, 16, 16, 6)
    probabilities = torch.sigmoid(regions)
    assert torch.allclose(probabilities, hierarchical_probabilities(labels).clamp(1e-6, 1 - 1e-6), atol=1e-5)
    et, tc, wt = probabilities.unbind(1)
    assert bool((et <= tc + 1e-6).all() and (tc <= wt + 1e-6).all())  # nested regions by construction


def test_one_optimiser_step_lowers_the_hierarchical_loss_and_eval_outputs_score_alike():
    model = tiny()
    x, regions = _batch()
    loss_fn = model_loss("resfcn2d")
    _, after = checks.one_step_lowers_loss(model, loss_fn, x, regions, lr=1e-2)
    with torch.no_grad():
        on_eval = loss_fn(model.eval()(x), regions)  # what loss_on (FedCostWAvg, FedPIDAvg) computes
    assert float(on_eval) == pytest.approx(after, abs=1e-4)
    with pytest.raises(ValueError, match="label logits"):
        loss_fn(torch.randn(2, 5, 8, 8, 2), regions[..., :8, :8, :2])


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model = tiny(se=True)
    with torch.no_grad():
        model.gain.mul_(1.5)
    checks.checkpoint_round_trip(model, tmp_path / "c.safetensors", _batch()[0], patch_size=[16, 16, 16])


# ---- DP-SGD: the patient, not the slice, is the unit ---------------------------------------------------------


def test_opacus_validation_passes_and_dropout_is_refused_with_the_reason():
    # as in a fresh process: dp_problem registers the check itself
    ModuleValidator.VALIDATORS.pop(ResFCN2d, None)
    reason = dp_problem(tiny(dropout=0.1).eval())
    assert reason is not None and "dropout" in reason and "model-dropout = 0" in reason
    checks.assert_opacus_valid(tiny().train())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("force_functorch", [True, False])
def test_per_sample_gradients_are_per_patient(force_functorch):
    """What DP-SGD needs: Opacus' per-sample gradient of each patient = that patient's own gradient,
    in both grad-sample modes (the wrapper's own parameter makes Opacus treat it as one unit)."""
    mode = "functorch" if force_functorch else "hooks"
    # one gradient per patient (3), not one per slice (3 x 4)
    checks.assert_per_sample_gradients(
        tiny(se=True), model_loss("resfcn2d"), *_batch(b=3, size=8, z=4), mode=mode
    )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_without_a_parameter_of_its_own_opacus_would_clip_slices():
    """Why the wrapper holds `gain`: Opacus otherwise hooks the 2D layers, whose batch is B x Z slices."""

    class Folding(nn.Module):  # the same fold without a parameter of its own
        def __init__(self):
            super().__init__()
            self.net = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):
            return unfold_slices(self.net(fold_slices(x)), x.shape[0])

    x, _ = _batch(b=2, size=8, z=5)
    for model, per_sample in ((Folding(), 10), (Slicewise(nn.Conv2d(4, 3, 3, padding=1), 4), 2)):
        gsm = GradSampleModule(model, force_functorch=True)
        gsm(x).sum().backward()
        assert {p.grad_sample.shape[0] for p in model.parameters()} == {per_sample}
        gsm.to_standard_module()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Optimal order is the:UserWarning")
def test_a_dp_round_trains_it_and_dropout_is_refused_before_any_step(tmp_path):
    from fedbrats.client.ledger import PrivacyLedger
    from fedbrats.client.privacy import DPConfig, IncompatibleModelError, train_private
    from fedbrats.client.trainer import TrainConfig

    x, regions = _batch(b=4, size=8, z=4)
    data = torch.utils.data.TensorDataset(x, regions)
    dp = DPConfig(epsilon=100.0, noise_multiplier=1.3, max_grad_norm=1.0, planned_rounds=2)
    checks.dp_sgd_steps(tiny(), model_loss("resfcn2d"), x, regions, tmp_path, steps=2, noise_multiplier=1.3,
                        planned_rounds=2, run_id="r")  # fmt: skip
    ledger = PrivacyLedger.at(tmp_path / "other")
    with pytest.raises(IncompatibleModelError, match="dropout"):
        train_private(tiny(dropout=0.1), data, TrainConfig(steps=2, batch_size=2), dp, ledger, round=1, run_id="r",
                      loss_fn=model_loss("resfcn2d"))  # fmt: skip
    assert ledger.rows() == []  # refused before training: nothing spent


# ---- one federated round -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_federated_round_on_a_tiny_phantom(tmp_path):
    checkpoint, _, _ = checks.federated_round(
        tmp_path, "resfcn2d", model_depth=2, local_steps=2, local_epochs=1
    )
    model, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == "resfcn2d" and meta["model_config"]["width"] == 8 and meta["round"] == 1
    assert isinstance(model, ResFCN2d)
