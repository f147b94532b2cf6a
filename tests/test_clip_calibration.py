"""`fedbrats privacy calibrate`: per-patient gradient norms as DP-SGD clips them, quantiles, the median suggestion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from rich.console import Console
from torch import nn

from fedbrats.cli import main
from fedbrats.client.clip_calibration import calibrate, per_sample_norms
from fedbrats.shared.config import RunConfig

from .local_grid import tiny_phantom

TINY = dict(model="resunet", model_width=8, model_depth=2, patch_size=16, batch_size=2, cache="memory")


def test_per_sample_norms_are_each_samples_own_gradient_norm():
    """With a loss that is a mean over samples, sample i's norm is that of its own loss' gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)  # frozen: not counted
    x, y = torch.randn(3, 5), torch.randn(3, 2)
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    nn.functional.mse_loss(gsm(x), y, reduction="none").sum(1).mean().backward()
    measured = per_sample_norms(gsm)
    gsm.to_standard_module()
    for i in range(3):
        net.zero_grad()
        nn.functional.mse_loss(net(x[i : i + 1]), y[i : i + 1], reduction="none").sum().backward()
        expected = torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]).norm()
        assert measured[i].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), cases_per_site=3)


def test_norms_cover_the_trained_parameters_only(phantom):
    quiet = Console(quiet=True)
    full = calibrate(RunConfig(**TINY), phantom, steps=2, device="cpu", console=quiet)
    head = calibrate(RunConfig(**TINY, trainable="head.*"), phantom, steps=2, device="cpu", console=quiet)
    assert len(full.norms) == len(head.norms) == 4  # 2 batches of 2 patients
    assert head.trained_parameters == 8 * 3 + 3 < full.trained_parameters == full.parameters
    # the same patients and weights: a subset of the coordinates has a smaller norm
    assert all(0 < h <= f * (1 + 1e-6) for h, f in zip(head.norms, full.norms, strict=True))
    quantiles = list(full.quantiles.values())
    assert quantiles == sorted(quantiles) and full.suggested_max_grad_norm == pytest.approx(
        np.median(full.norms)
    )
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        calibrate(RunConfig(**TINY), phantom, steps=0, console=quiet)


def test_cli_prints_the_suggestion_and_writes_json(phantom, tmp_path, capsys):
    out = tmp_path / "clip.json"
    sets = [f"--set={k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["privacy", "calibrate", "--data", str(phantom), "--partition", str(phantom / "partitioning_1.csv"),
                 "--site", "1", "--steps", "1", "--preset", "demo", *sets, "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "suggested dp-max-grad-norm" in printed and "median" in printed
    written = json.loads(out.read_text())
    assert (
        written["samples"] == 2
        and written["batches"] == 1
        and set(written["quantiles"]) == {"10%", "50%", "90%"}
    )
    assert written["suggested_dp_max_grad_norm"] == pytest.approx(np.median(written["norms"]))
    assert written["initial_model"] == "seeded random init (seed 0)" and "median" in written["heuristic"]
