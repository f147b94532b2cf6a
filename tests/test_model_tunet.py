"""TuNet cascade: shapes, the cascade's wiring, its loss, one step, DP-SGD, checkpoints, a federated round."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceLoss
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedbrats.client.ledger import PrivacyLedger
from fedbrats.client.privacy import DPConfig, train_private
from fedbrats.client.trainer import TrainConfig
from fedbrats.server.app import run_server
from fedbrats.server.history import read_history
from fedbrats.shared.checkpoint import load_checkpoint, save_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.evaluation.inference import predict_case
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.tunet import TuNet
from fedbrats.shared.tasks import model_loss

from .local_grid import LocalGrid

TINY = {"width": 8, "depth": 3}
loss = TuNet.training_loss


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**extra) -> TuNet:
    torch.manual_seed(0)
    return create_model("tunet", **{**TINY, **extra})


def batch(n: int = 2, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and nested region masks (ET in TC in WT) that depend on the image, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, size, generator=g)
    wt = x[:, 3] > 0.3
    tc = wt & (x[:, 1] > 0.0)
    et = tc & (x[:, 0] > 0.3)
    return x, torch.stack([et, tc, wt], dim=1).float()


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
    model, (x, regions) = tiny(), batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = loss(model(x), regions)
    first.backward()
    optimiser.step()
    with torch.no_grad():
        assert loss(model(x), regions).item() < first.item()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_validation_and_per_sample_gradients():
    model = tiny(depth=2)
    assert ModuleValidator.validate(model, strict=False) == []
    reference = copy.deepcopy(model)
    x, regions = batch(size=8)
    gsm = wrap_model(model, "functorch", loss_reduction="mean")  # what DP-SGD builds
    loss(gsm(x), regions).backward()
    for i in range(2):
        reference.zero_grad()
        loss(reference(x[i : i + 1]), regions[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
def test_one_dp_sgd_round_trains_and_spends_budget(tmp_path):
    model = tiny(depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    x, regions = batch(n=4, size=8)
    dp = DPConfig(epsilon=100.0, noise_multiplier=1.0, max_grad_norm=1.0, planned_rounds=1)
    result = train_private(model, torch.utils.data.TensorDataset(x, regions), TrainConfig(steps=2, batch_size=2),
                           dp, PrivacyLedger.at(tmp_path), round=1, loss_fn=loss)  # fmt: skip
    assert result.steps == 2 and 0 < result.epsilon < 100.0
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert not hasattr(next(model.parameters()), "grad_sample")


def test_checkpoint_round_trip(tmp_path):
    model = tiny(dropout=0.1, act="relu").eval()
    path = save_checkpoint(tmp_path / "tunet.safetensors", model, extra={"patch_size": [16, 16, 16]})
    loaded, meta = load_checkpoint(path)
    assert meta["model_name"] == "tunet" and meta["model_config"]["act"] == "relu"
    assert type(loaded) is TuNet and not loaded.training
    x, _ = batch(n=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_parameters_at_width_16_depth_4():
    assert count_parameters(create_model("tunet", width=16, depth=4)) == 4_185_819  # the docstring's number


@pytest.mark.slow
def test_one_federated_round_then_predict_a_case(tmp_path):
    root = tmp_path / "phantom"
    generate_phantom(root, sites=2, cases_per_site=3, voxel_size=5.0, seed=3, progress=False)
    config = RunConfig(rounds=1, min_sites=1, data_dir=str(root), partition=str(root / "partitioning_1.csv"),
                       out_dir=str(tmp_path / "run"), model="tunet", model_width=8, model_depth=2, patch_size=16,
                       batch_size=2, local_steps=1, cache="memory", warmup_steps=2)  # fmt: skip
    grid = LocalGrid(config.to_flower(), sites=2)
    checkpoint = run_server(grid, config)
    assert not any(reply.has_error() for reply in grid.replies)
    record = read_history(tmp_path / "run" / "history.jsonl")[0]
    assert record["status"] == "ok" and {e["site"] for e in record["evaluate"]} == {"1", "2"}
    model, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == "tunet" and isinstance(model, TuNet)
    case = next(p for p in sorted(root.iterdir()) if p.is_dir())
    written = predict_case(checkpoint, case, tmp_path / "pred", tta=False, device="cpu")
    labels = nib.load(written["labels"])
    assert labels.shape == nib.load(next(case.glob("*_flair.nii.gz"))).shape
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2, 4}
    unc = np.asarray(nib.load(written["uncertainty_ET"]).dataobj)
    assert unc.min() >= 0 and unc.max() <= 100
