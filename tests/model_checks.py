"""The checks every segmentation model passes (issue 13), shared by tests/test_model_*.py.

Each test module keeps one test per model per check and adds its model's own assertions; the common part
(one optimiser step, Opacus validation and per-sample gradients, a DP-SGD step, the checkpoint round trip, a
federated round on a tiny phantom) lives here once, so a fix to a check reaches every model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedbrats.shared.checkpoint import load_checkpoint, save_checkpoint
from fedbrats.shared.models import create_model
from fedbrats.shared.models.classifier import dp_problem

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]



def tiny_model(name: str, tiny: dict[str, Any], **extra: Any) -> torch.nn.Module:
    """The registered model `name` at the test size `tiny` (overridden by `extra`), seeded."""
    torch.manual_seed(0)
    return create_model(name, **{**tiny, **extra})


def nested_batch(n: int = 2, size: int = 16, seed: int = 0, *, z: int | None = None,
                 et_threshold: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Images and nested region masks (ET in TC in WT) that depend on the image, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, size if z is None else z, generator=g)
    wt = x[:, 3] > 0.3
    tc = wt & (x[:, 1] > 0.0)
    et = tc & (x[:, 0] > et_threshold)
    return x, torch.stack([et, tc, wt], dim=1).float()


def one_step_lowers_loss(model: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, regions: torch.Tensor, *,
                         lr: float = 1e-3, after_backward: Callable[[], None] | None = None) -> tuple[float, float]:  # fmt: skip
    """One Adam step on a fixed batch lowers the loss; (before, after). `after_backward` checks the gradients."""
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    before = loss_fn(model(x), regions)
    before.backward()
    if after_backward is not None:
        after_backward()
    optimiser.step()
    optimiser.zero_grad()
    with torch.no_grad():
        after = loss_fn(model(x), regions)
    assert float(after) < float(before.detach())
    return float(before.detach()), float(after)


def assert_opacus_valid(model: torch.nn.Module, *, strict: bool = True, buffers: bool = False) -> None:
    """Opacus' ModuleValidator finds nothing, the sites' DP check agrees, and (unless `buffers`) no buffers."""
    assert ModuleValidator.validate(model, strict=strict) == [] and dp_problem(model) is None
    if not buffers:
        assert list(model.buffers()) == []


def assert_per_sample_gradients(model: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, regions: torch.Tensor,
                                mode: str = "functorch") -> None:  # fmt: skip
    """What DP-SGD relies on: Opacus' per-sample gradient of each patient equals that patient's own gradient."""
    reference = copy.deepcopy(model)
    gsm = wrap_model(model, mode, loss_reduction="mean")
    loss_fn(gsm(x), regions).backward()
    n = x.shape[0]
    for i in range(n):
        reference.zero_grad()
        loss_fn(reference(x[i : i + 1]), regions[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad_sample.shape[0] == n, name  # one per patient
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name
    gsm.to_standard_module()


def dp_sgd_steps(model: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, regions: torch.Tensor, ledger_dir: Path,
                 *, steps: int = 1, noise_multiplier: float = 1.0, planned_rounds: int = 1, **train: Any) -> Any:  # fmt: skip
    """DP-SGD through the sites' privacy path: the steps ran, budget was spent (within the target), weights moved."""
    from fedbrats.client.ledger import PrivacyLedger
    from fedbrats.client.privacy import DPConfig, train_private
    from fedbrats.client.trainer import TrainConfig

    before = [p.detach().clone() for p in model.parameters()]
    dp = DPConfig(
        epsilon=100.0, noise_multiplier=noise_multiplier, max_grad_norm=1.0, planned_rounds=planned_rounds
    )
    result = train_private(model, torch.utils.data.TensorDataset(x, regions), TrainConfig(steps=steps, batch_size=2,
                           lr=1e-3), dp, PrivacyLedger.at(ledger_dir), round=1, loss_fn=loss_fn, **train)  # fmt: skip
    assert result.steps == steps and 0 < result.epsilon < dp.epsilon
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    return result


def checkpoint_round_trip(
    model: torch.nn.Module, path: Path, x: torch.Tensor, **extra: Any
) -> tuple[Any, dict]:
    """Save, rebuild from the metadata alone: same class, same weights, eval mode, the same output; (loaded, meta)."""
    model.eval()
    saved = save_checkpoint(path, model, extra=extra or {"round": 1})
    loaded, meta = load_checkpoint(saved)
    assert type(loaded) is type(model) and meta["model_name"] == model.model_name and not loaded.training
    assert meta["model_config"] == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return loaded, meta


def federated_round(
    tmp_path: Path, model: str, *, cases_per_site: int = 3, **config: Any
) -> tuple[Path, dict, Path]:
    """One round on a 2-site phantom through the real site handlers: every site trained and evaluated, the
    global checkpoint rebuilds the model; (checkpoint, history record, phantom root)."""
    from fedbrats.server.app import run_server
    from fedbrats.server.history import read_history
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.data.phantom import generate_phantom

    from .local_grid import LocalGrid

    root = tmp_path / "phantom"
    generate_phantom(root, sites=2, cases_per_site=cases_per_site, voxel_size=5.0, seed=3, progress=False)
    settings = {"rounds": 1, "min_sites": 1, "data_dir": str(root), "partition": str(root / "partitioning_1.csv"),
                "out_dir": str(tmp_path / "run"), "model": model, "model_width": 8, "patch_size": 16, "batch_size": 2,
                "local_steps": 1, "cache": "memory", **config}  # fmt: skip
    run_config = RunConfig(**settings)
    grid = LocalGrid(run_config.to_flower(), sites=2)
    checkpoint = run_server(grid, run_config)
    assert not any(reply.has_error() for reply in grid.replies)
    history = read_history(tmp_path / "run" / "history.jsonl")
    assert [h["status"] for h in history] == ["ok"], history[0]["train"]
    record = history[0]
    assert all(t["dropped"] is None for t in record["train"])
    assert {e["site"] for e in record["evaluate"]} == {"1", "2"}
    assert all(0.0 <= e["dice-WT"] <= 1.0 for e in record["evaluate"])
    assert set(record["mean_dice"]) == {"ET", "TC", "WT"}
    loaded, meta = load_checkpoint(checkpoint)
    assert meta["model_name"] == model and meta["round"] == 1 and loaded.model_name == model
    return checkpoint, record, root
