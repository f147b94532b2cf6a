"""`SiteAdam` and `SiteSGD` are `torch.optim.Adam` and `torch.optim.SGD` without the import of `torch._dynamo`
a deployed train message would pay; `local-optimizer` chooses between them at every site."""

from __future__ import annotations

import pytest
import torch

from fedbrats.client.optimizers import SiteAdam, SiteSGD
from fedbrats.client.settings import train_config
from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.shared.config import RunConfig

from .fresh_python import fresh_python


def _train(optimizer_class, weight_decay: float, late: bool, **options) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv3d(8, 3, 1))
    optimizer = optimizer_class(net.parameters(), lr=1e-2, weight_decay=weight_decay, **options)
    for step in range(6):
        optimizer.zero_grad(set_to_none=True)
        x = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(step))
        net(x).square().mean().backward()
        if late and step < 2:
            net[2].weight.grad = None  # a parameter whose first gradient comes at step 3
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
@pytest.mark.parametrize("late", [False, True])
def test_site_adam_takes_torch_adams_steps_bit_for_bit(weight_decay, late):
    ours, torchs = _train(SiteAdam, weight_decay, late), _train(torch.optim.Adam, weight_decay, late)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ours, _train(SiteAdam, weight_decay + 1e-1, late), strict=True))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("late", [False, True])
def test_site_sgd_takes_torch_sgds_steps_bit_for_bit(momentum, late):
    ours = _train(SiteSGD, 1e-4, late, momentum=momentum)
    assert all(torch.equal(a, b) for a, b in zip(ours, _train(torch.optim.SGD, 1e-4, late, momentum=momentum),
                                                 strict=True))  # fmt: skip
    assert not all(torch.equal(a, b) for a, b in zip(ours, _train(SiteSGD, 1e-4, late, momentum=0.5), strict=True))


def test_local_optimizer_reaches_the_sites_training_and_bad_values_are_refused():
    config = RunConfig.from_flower({"local-optimizer": "sgd", "sgd-momentum": "0.9", "lr": "0.05"})
    local = train_config(config, n_cases=4)
    assert (local.optimizer, local.momentum, local.lr) == ("sgd", 0.9, 0.05)
    torch.manual_seed(0)
    data = [(torch.randn(4, 8, 8, 8), (torch.rand(3, 8, 8, 8) > 0.5).float()) for _ in range(2)]
    model = torch.nn.Conv3d(4, 3, 1)
    before = model.weight.detach().clone()
    result = train_local(model, data, TrainConfig(steps=2, batch_size=2, lr=0.05, optimizer="sgd", momentum=0.9,
                                                  schedule="constant"))  # fmt: skip
    assert result.steps == 2 and not torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="local-optimizer must be one of adam, sgd, got 'rmsprop'"):
        RunConfig.from_flower({"local-optimizer": "rmsprop"})
    with pytest.raises(ValueError, match="sgd.momentum"):
        RunConfig.from_flower({"sgd-momentum": "1.0"})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="rmsprop")


def test_zero_grad_without_set_to_none_keeps_zeroed_tensors():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = SiteAdam([w])
    w.sum().backward()
    optimizer.zero_grad(set_to_none=False)
    assert w.grad is not None and not w.grad.any()
    with pytest.raises(ValueError, match="empty parameter list"):
        SiteAdam([])


PROBE = """
import json, sys, torch
from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.shared.models.registry import create_model
data = [(torch.randn(4, 16, 16, 16), (torch.rand(3, 16, 16, 16) > 0.5).float()) for _ in range(2)]
result = train_local(create_model("resunet", width=8, depth=2), data, TrainConfig(steps=2, batch_size=2))
print(json.dumps({"steps": result.steps, "dynamo": "torch._dynamo" in sys.modules}))
"""


@pytest.mark.slow
def test_local_training_does_not_import_torch_dynamo(tmp_path):
    """A site's non-private training step must not pull in torch._dynamo (1.6 CPU s a deployed message)."""
    assert fresh_python(PROBE, tmp_path) == {"steps": 2, "dynamo": False}


def test_dp_sgd_wraps_the_optimizer_local_optimizer_names():
    from fedbrats.client.privacy import _torch_optimizer

    params = [torch.nn.Parameter(torch.ones(2))]
    sgd = _torch_optimizer(TrainConfig(optimizer="sgd", momentum=0.9), params, 0.1)
    adam = _torch_optimizer(TrainConfig(), params, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 0.1
