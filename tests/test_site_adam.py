"""`SiteAdam` is `torch.optim.Adam` without the import of `torch._dynamo` a deployed train message would pay."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedbrats.client.adam import SiteAdam


def _train(optimizer_class, weight_decay: float, late: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv3d(8, 3, 1))
    optimizer = optimizer_class(net.parameters(), lr=1e-2, weight_decay=weight_decay)
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
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"steps": 2, "dynamo": False}
