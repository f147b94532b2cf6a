"""`trainable`: frozen parameters come back bit-identical (plain, FedProx, DP-SGD, SCAFFOLD), a bad pattern is
refused naming real parameters, and a site process that reuses its model carries no freezing between runs."""

from __future__ import annotations

import pytest
import torch

from fedbrats.client.ledger import PrivacyLedger
from fedbrats.client.privacy import DPConfig, train_private
from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.server.app import initial_model, run_server
from fedbrats.shared.config import RunConfig
from fedbrats.shared.models import create_model
from fedbrats.shared.models.trainable import apply_trainable, parse_patterns, trainable_names

from .local_grid import LocalGrid, tiny_phantom

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
TINY = dict(  # resunet: the parameter names and counts below are its own
    model="resunet", model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=2, local_epochs=1, cache="memory"
)
DECODER = "decoder.*,head.*"


def _model():
    torch.manual_seed(0)
    return create_model("resunet", width=8, depth=2)


def _data(n: int = 4) -> torch.utils.data.TensorDataset:
    images = torch.randn(n, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(images, (images[:, :3] > 0.8).float())


def _frozen_unchanged(model, before: dict[str, torch.Tensor], pattern: str) -> None:
    trained = set(trainable_names(model, pattern))
    after = model.state_dict()
    frozen = [n for n, _ in model.named_parameters() if n not in trained]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)  # bit-identical
    assert any(not torch.equal(after[n], before[n]) for n in trained)  # the rest did learn


def test_patterns_select_parameters_and_bad_ones_name_real_names():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    chosen = trainable_names(model, " decoder.* , head.* ")
    assert chosen == [n for n in names if n.startswith(("decoder.", "head."))] and "head.bias" in chosen
    trained, total = apply_trainable(model, "head.*")
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    assert total == sum(p.numel() for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    with pytest.raises(
        ValueError, match=r"'encoders\.\*' match no parameter.*encoder\.0\.conv1\.weight.*head\.\*"
    ):
        trainable_names(model, "head.*,encoders.*")
    with pytest.raises(ValueError, match="freeze the whole model"):
        parse_patterns(" , ")
    with pytest.raises(ValueError, match="trainable must hold parameter-name patterns"):
        RunConfig(trainable=",")
    with pytest.raises(ValueError, match="match no parameter"):
        initial_model(RunConfig(**TINY, trainable="encoder.9.*"))  # the server refuses before round 1


def test_apply_sets_every_parameter_so_nothing_leaks_between_configurations():
    model = _model()
    apply_trainable(model, "head.*")
    apply_trainable(model, "*")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("proximal_mu", [0.0, 0.1])  # FedProx' pull must ignore frozen parameters too
def test_frozen_parameters_stay_bit_identical_without_dp(proximal_mu):
    model = _model()
    apply_trainable(model, DECODER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(
        model, _data(), TrainConfig(steps=2, batch_size=2, lr=1e-2, proximal_mu=proximal_mu, weight_decay=0.1)
    )
    _frozen_unchanged(model, before, DECODER)


def test_frozen_parameters_stay_bit_identical_under_dp_sgd(tmp_path):
    model = _model()
    apply_trainable(model, DECODER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, param = next(iter(model.named_parameters()))  # a frozen encoder weight: its correction is ignored
    assert not param.requires_grad
    dp = DPConfig(epsilon=100.0, noise_multiplier=1.0, max_grad_norm=1.0, planned_rounds=10)
    train_private(model, _data(), TrainConfig(steps=2, batch_size=2, lr=1e-2, proximal_mu=0.1), dp,
                  PrivacyLedger.at(tmp_path), round=1, grad_correction={name: torch.ones_like(param)})  # fmt: skip
    _frozen_unchanged(model, before, DECODER)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), cases_per_site=3)


def _config(phantom, out, **changes):
    values = dict(rounds=1, min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                  out_dir=str(out), eval_every=1, final_evaluation=False)  # fmt: skip
    return RunConfig(**{**values, **TINY, **changes})


def _train_replies(grid):
    return [r for r in grid.replies if "arrays" in r.content]


def _check_replies(phantom, out, pattern: str, **changes) -> None:
    """Every site's reply of round 1: frozen arrays equal the initial model's bit for bit, trained ones moved."""
    config = _config(phantom, out, trainable=pattern, **changes)
    start = initial_model(config).state_dict()
    grid = LocalGrid(config.to_flower(), sites=2)
    run_server(grid, config)
    replies = _train_replies(grid)
    assert len(replies) == 2, [r.error.reason for r in grid.replies if r.has_error()]
    trained = set(trainable_names(create_model("resunet", width=8, depth=2), pattern))
    for reply in replies:
        arrays = reply.content["arrays"]
        assert all(
            torch.equal(torch.from_numpy(arrays[n].numpy()), start[n]) for n in start if n not in trained
        )
        assert any(not torch.equal(torch.from_numpy(arrays[n].numpy()), start[n]) for n in trained)


@pytest.mark.parametrize(
    "changes",
    [{}, {"strategy": "fedprox", "proximal_mu": 0.1}, {"dp": True, "dp_noise_multiplier": 1.0, "dp_epsilon": 50.0},
     {"strategy": "scaffold"}],
    ids=["fedavg", "fedprox", "dp", "scaffold"],
)  # fmt: skip
def test_sites_send_frozen_parameters_back_unchanged(phantom, tmp_path, changes):
    _check_replies(phantom, tmp_path, DECODER, **changes)


@pytest.mark.slow
def test_a_reused_site_model_trains_everything_after_a_frozen_run(phantom, tmp_path):
    """client.app keeps an idle model per model configuration: `trainable` is set on it every message."""
    _check_replies(phantom, tmp_path / "frozen", "head.*")
    _check_replies(
        phantom, tmp_path / "all", "encoder.*,decoder.*,head.*"
    )  # the same process, the same idle model
    config = _config(phantom, tmp_path / "plain")
    start = initial_model(config).state_dict()
    grid = LocalGrid(config.to_flower(), sites=2)
    run_server(grid, config)
    for reply in _train_replies(grid):
        assert all(not torch.equal(torch.from_numpy(reply.content["arrays"][n].numpy()), start[n])
                   for n in start if n.endswith("conv1.weight"))  # fmt: skip
