"""`fedbrats privacy calibrate`: the per-patient gradient norms DP-SGD would clip, measured without privacy.

DP-SGD clips every patient's gradient to `dp-max-grad-norm` C, then adds noise of scale sigma C. A C
far above the typical norm wastes the noise on headroom no gradient uses; far below, every gradient
is cut to the same length and only its direction is learnt. The usual heuristic (Abadi et al. 2016;
Opacus' tutorials) is the median of the unclipped per-sample norms, measured on public data: here
on a phantom or any data outside the federation, since norms measured on a site's own patients are
a statistic of them that no noise protects.

The norms are exactly what the site's DP optimiser would clip: the run's model (warm-started from
`init-checkpoint` when set) in training mode, the run's task loss with Opacus' "mean" reduction, the
run's batch size, Opacus' `GradSampleModule` in the run's grad-sample mode, and only the parameters
`trainable` selects (frozen ones are neither clipped nor noised, so they do not count).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from rich.console import Console
from torch.utils.data import DataLoader

from fedbrats.client.settings import model_for
from fedbrats.client.trainer import get_device, targets_to
from fedbrats.client.training_run import step_progress, training_cases
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.partition import Partition
from fedbrats.shared.data.site_cases import Discovered
from fedbrats.shared.models.trainable import apply_trainable
from fedbrats.shared.tasks import load_labels, task_for, with_label_classes
from fedbrats.shared.warm_start import load_warm_start

__all__ = ["QUANTILES", "Calibration", "calibrate", "per_sample_norms"]

#: The quantiles printed and written (percent).
QUANTILES = (10, 50, 90)
#: How the suggestion is derived, as printed and written beside it.
HEURISTIC = "median of the unclipped per-patient gradient norms (Abadi et al. 2016; Opacus' usual heuristic)"


@dataclass
class Calibration:
    """The measured norms and what follows from them (written as JSON by `--out`)."""

    model: str
    model_config: dict[str, Any]
    trainable: str
    trained_parameters: int
    parameters: int
    initial_model: str
    batch_size: int
    batches: int
    norms: list[float] = field(default_factory=list)

    @property
    def quantiles(self) -> dict[str, float]:
        return {f"{q}%": float(np.percentile(self.norms, q)) for q in QUANTILES}

    @property
    def suggested_max_grad_norm(self) -> float:
        return float(np.median(self.norms))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples": len(self.norms), "quantiles": self.quantiles,
                "max": float(max(self.norms)), "suggested_dp_max_grad_norm": self.suggested_max_grad_norm,
                "heuristic": HEURISTIC}  # fmt: skip


def per_sample_norms(gsm: GradSampleModule) -> torch.Tensor:
    """The L2 norm of each sample's gradient over the trained parameters, as `DPOptimizer` computes it."""
    per_param = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1)
                 for p in gsm.parameters() if p.requires_grad and getattr(p, "grad_sample", None) is not None]  # fmt: skip
    if not per_param:
        raise RuntimeError("no per-sample gradient was computed: are all parameters frozen?")
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def calibrate(
    config: RunConfig,
    data: Path,
    *,
    partition: Partition | Path | None = None,
    site: str | None = None,
    steps: int = 20,
    device: str = "auto",
    discovered: Discovered | None = None,
    console: Console | None = None,
) -> Calibration:
    """Per-patient gradient norms of the run's model and loss on `steps` batches of the cases under `data`.

    Non-private by design: run it on public or phantom data. Batches are drawn with shuffling, in
    `config.batch_size`s, from the training cases (one site of `partition`, or all); the model is the
    run's (seeded, or `init-checkpoint`), with `trainable` applied. The weights are never updated.
    """
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    console = console or Console()
    config = with_label_classes(config, Path(data))
    task = task_for(config)
    task.check_model(config)
    labels = load_labels(config, Path(data)) if task.needs_labels else None
    train_cases, _ = training_cases(config, Path(data), partition, site, discovered=discovered)
    if not train_cases:
        raise ValueError(f"no training case under {data}" + (f" for site {site!r}" if site else ""))
    dataset = task.dataset(
        train_cases, config.replace(cache="none"), augment=True, labels=labels, cache_dir=None
    )
    if len(dataset) == 0:
        raise ValueError(
            "every case was skipped: " + "; ".join(str(p) for p in getattr(dataset, "skipped", []))
        )
    torch.manual_seed(config.seed)  # the federation's initial weights (server.app.initial_model)
    model = model_for(config)
    warm = load_warm_start(model, config) if config.init_checkpoint else None
    trained, total = apply_trainable(model, config.trainable)
    device_ = get_device(device)
    result = Calibration(
        model=config.model, model_config=dict(model.config), trainable=config.trainable, trained_parameters=trained,
        parameters=total, initial_model=warm.describe() if warm else f"seeded random init (seed {config.seed})",
        batch_size=config.batch_size, batches=steps,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed)
    if callable(getattr(dataset, "reseed", None)):
        dataset.reseed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    mode = "functorch" if config.dp_grad_sample_mode == "auto" else config.dp_grad_sample_mode
    model.to(device_)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True,
                           force_functorch=mode == "functorch")  # fmt: skip
    gsm.train()
    try:
        with step_progress(console) as progress, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            bar = progress.add_task("per-patient gradient norms", total=steps)
            done = 0
            while done < steps:
                for images, targets in loader:
                    gsm.zero_grad(set_to_none=True)
                    loss = task.loss(gsm(images.to(device_)), targets_to(targets, device_))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at batch {done + 1}: check the data")
                    loss.backward()
                    result.norms += per_sample_norms(gsm).detach().cpu().tolist()
                    done += 1
                    progress.update(bar, advance=1, description=f"per-patient gradient norms, median "
                                                                f"{np.median(result.norms):.3g}")  # fmt: skip
                    if done >= steps:
                        break
    finally:
        gsm.to_standard_module()
    return result
