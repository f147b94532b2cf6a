"""`resfcn2d` and the slice-wise wrapper: shapes, slice-by-slice equality, the hierarchical loss, DP-SGD
per patient (not per slice), checkpoints, and one federated round on a tiny phantom."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedbrats.shared.checkpoint import load_checkpoint, save_checkpoint
from fedbrats.shared.models import available_models, count_parameters, create_model
from fedbrats.shared.models.classifier import dp_problem
from fedbrats.shared.models.losses import hierarchical_probabilities
from fedbrats.shared.models.resfcn2d import ResFCN2d
from fedbrats.shared.models.slicewise import Slicewise, fold_slices, unfold_slices
from fedbrats.shared.tasks import model_loss

TINY = {"width": 8, "depth": 3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**extra) -> ResFCN2d:
    torch.manual_seed(0)
    return create_model("resfcn2d", **{**TINY, **extra})


def _batch(b: int = 2, size: int = 16, z: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, z, generator=g)
    wt = x[:, 3:4] > 0.3  # nested regions that depend on the input
    tc = wt & (x[:, 1:2] > 0.0)
    et = tc & (x[:, 0:1] > 0.5)
    return x, torch.cat([et, tc, wt], 1).float()


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
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = loss_fn(model(x), regions)
    loss.backward()
    before = float(loss.detach())
    optimiser.step()
    with torch.no_grad():
        after = loss_fn(model(x), regions)
        on_eval = loss_fn(model.eval()(x), regions)  # what loss_on (FedCostWAvg, FedPIDAvg) computes
    assert float(after) < before
    assert float(on_eval) == pytest.approx(float(after), abs=1e-4)
    with pytest.raises(ValueError, match="label logits"):
        loss_fn(torch.randn(2, 5, 8, 8, 2), regions[..., :8, :8, :2])


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model = tiny(se=True)
    with torch.no_grad():
        model.gain.mul_(1.5)
    path = save_checkpoint(tmp_path / "c.safetensors", model, extra={"patch_size": [16, 16, 16]})
    loaded, meta = load_checkpoint(path)
    assert meta["model_name"] == "resfcn2d" and meta["model_config"] == model.config
    x, _ = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# ---- DP-SGD: the patient, not the slice, is the unit ---------------------------------------------------------


def test_opacus_validation_passes_and_dropout_is_refused_with_the_reason():
    # as in a fresh process: dp_problem registers the check itself
    ModuleValidator.VALIDATORS.pop(ResFCN2d, None)
    reason = dp_problem(tiny(dropout=0.1).eval())
    assert reason is not None and "dropout" in reason and "model-dropout = 0" in reason
    model = tiny()
    assert ModuleValidator.validate(model.train(), strict=True) == [] and dp_problem(model) is None
    assert list(model.buffers()) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("force_functorch", [True, False])
def test_per_sample_gradients_are_per_patient(force_functorch):
    """What DP-SGD needs: Opacus' per-sample gradient of each patient = that patient's own gradient,
    in both grad-sample modes (the wrapper's own parameter makes Opacus treat it as one unit)."""
    model = tiny(se=True)
    reference = copy.deepcopy(model)
    x, regions = _batch(b=3, size=8, z=4)
    loss_fn = model_loss("resfcn2d")
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True,
                           force_functorch=force_functorch)  # fmt: skip
    loss_fn(gsm(x), regions).backward()
    for i in range(3):
        reference.zero_grad()
        loss_fn(reference(x[i : i + 1]), regions[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad_sample.shape[0] == 3, name  # one per patient, not one per slice (3 x 4)
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name
    gsm.to_standard_module()


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
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_private(model, data, TrainConfig(steps=2, batch_size=2, lr=1e-3), dp, PrivacyLedger.at(tmp_path),
                           round=1, run_id="r", loss_fn=model_loss("resfcn2d"))  # fmt: skip
    assert result.steps == 2 and result.epsilon > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    ledger = PrivacyLedger.at(tmp_path / "other")
    with pytest.raises(IncompatibleModelError, match="dropout"):
        train_private(tiny(dropout=0.1), data, TrainConfig(steps=2, batch_size=2), dp, ledger, round=1, run_id="r",
                      loss_fn=model_loss("resfcn2d"))  # fmt: skip
    assert ledger.rows() == []  # refused before training: nothing spent


# ---- one federated round -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_federated_round_on_a_tiny_phantom(tmp_path):
    from fedbrats.server.app import run_server
    from fedbrats.server.history import read_history
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.data.phantom import generate_phantom

    from .local_grid import LocalGrid

    data = tmp_path / "phantom"
    generate_phantom(data, sites=2, cases_per_site=3, voxel_size=5.0, seed=3, progress=False)
    config = RunConfig(model="resfcn2d", rounds=1, min_sites=1, data_dir=str(data),
                       partition=str(data / "partitioning_1.csv"), out_dir=str(tmp_path / "run"), model_width=8,
                       model_depth=2, patch_size=16, batch_size=2, local_steps=2, local_epochs=1, cache="memory")  # fmt: skip
    checkpoint = run_server(LocalGrid(config.to_flower(), sites=2), config)
    history = read_history(tmp_path / "run" / "history.jsonl")
    assert [h["status"] for h in history] == ["ok"], history[0]["train"]
    assert all(t["dropped"] is None for t in history[0]["train"])
    assert all(0.0 <= e["dice-WT"] <= 1.0 for e in history[0]["evaluate"])
    model, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == "resfcn2d" and meta["model_config"]["width"] == 8 and meta["round"] == 1
    assert isinstance(model, ResFCN2d)
