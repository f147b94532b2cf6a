"""Local training and evaluation of a model on one site's cases (no Flower here); the task gives the loss.

The same functions serve the federated client (one call per round), the single-site baseline
(`client.training_run`) and the benchmarks, so a round of federated training is exactly a slice
of ordinary training: the learning-rate schedule is a function of the *global* step, which the
caller passes in (`start_step`, which `client.settings.start_step` derives from the server round)
and gets back (`TrainResult.end_step`). `client.settings` builds the TrainConfig from a RunConfig.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedbrats.client.optimizers import OPTIMIZERS, site_optimizer
from fedbrats.shared.data.patch_pool import pool_loader
from fedbrats.shared.evaluation.inference import fast_layout, get_device
from fedbrats.shared.evaluation.local import (  # re-exported: callers import them here
    evaluate_local,
    flat_metrics,
)

__all__ = [
    "TrainConfig", "TrainResult", "as_float", "evaluate_local", "flat_metrics", "get_device", "loss_on", "lr_at",
    "targets_to", "train_local",
]  # fmt: skip

SCHEDULES = ("cosine", "poly", "constant")
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
#: Called after every optimiser step with (steps done in this call, steps planned, batch loss, lr).
Progress = Callable[[int, int, float, float], None]
#: DP hook: (model, optimizer, loader) -> (model, optimizer, loader), e.g. Opacus' make_private.
Wrap = Callable[[nn.Module, Any, DataLoader], tuple[nn.Module, Any, DataLoader]]


@dataclass
class TrainConfig:
    """Local training settings. `steps` > 0 replaces `epochs` (as `local_steps` does in the run config).

    `total_steps` is the length of the whole schedule (all rounds); None keeps the lr constant after
    warm-up. `amp` is used on CUDA only. `proximal_mu` > 0 adds FedProx' (mu/2)||w - w_global||^2,
    w_global being the weights the model had when `train_local` was called.
    """

    epochs: int | None = 1
    steps: int | None = None
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    total_steps: int | None = None
    batch_size: int = 2
    amp: bool = True
    seed: int = 0
    proximal_mu: float = 0.0
    optimizer: str = "adam"  # client.optimizers.OPTIMIZERS
    momentum: float = 0.0  # SGD's
    weight_decay: float = 0.0
    grad_clip: float | None = None
    num_workers: int = 0
    #: random patch size: (patch edge, batch size) pairs, one drawn per step (shared.data.patch_pool); () = off
    patch_pool: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not (self.steps and self.steps > 0) and not (self.epochs and self.epochs > 0):
            problems.append(f"one of epochs ({self.epochs}) or steps ({self.steps}) must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.total_steps < 1:
            problems.append(f"total_steps must be >= 1 or None, got {self.total_steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            problems.append(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))


@dataclass
class TrainResult:
    """What one call of `train_local` did; `examples` counts samples drawn (patients x passes)."""

    examples: int
    steps: int
    mean_loss: float
    seconds: float
    end_step: int
    last_lr: float
    skipped_steps: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at global `step` (0-based): linear warm-up to `lr`, then cosine or poly(0.9) to 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant" or config.total_steps is None:
        return config.lr
    span = max(config.total_steps - config.warmup_steps, 1)
    t = min(max((step - config.warmup_steps) / span, 0.0), 1.0)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return config.lr * (1.0 - t) ** 0.9


def _default_loss() -> LossFn:
    from fedbrats.shared.models.losses import region_loss

    return region_loss


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def as_float(outputs: Any) -> Any:
    """Model outputs (a tensor, a deep-supervision list, a multi-task tuple of both) in fp32, same nesting."""
    if isinstance(outputs, list | tuple):
        return type(outputs)(as_float(o) for o in outputs)
    return outputs.float()


def targets_to(targets: Any, device: torch.device) -> Any:
    """A batch's targets (region masks, class indices, or a multi-task tuple of both) on `device` as floats;
    a loss that needs class indices takes `.long()` of them (`shared.tasks`)."""
    if isinstance(targets, list | tuple):
        return tuple(targets_to(t, device) for t in targets)
    return targets.to(device, non_blocking=True).float()


def _batches(loader: DataLoader, steps: int | None):
    """Yield batches: whole epochs, or exactly `steps` batches cycling through the loader."""
    if steps is None:
        yield from loader
        return
    done = 0
    while done < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done >= steps:
                return
        if empty:
            raise ValueError("the data loader yielded no batch; the site has no usable training case")


def _reseed(dataset: Any, seed: int) -> None:
    reseed = getattr(dataset, "reseed", None)
    if callable(reseed):
        reseed(seed)


def train_local(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    *,
    start_step: int = 0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    loss_fn: LossFn | None = None,
    wrap: Wrap | None = None,
) -> TrainResult:
    """Train `model` in place (`config.optimizer`: SiteAdam or SiteSGD) on `dataset`, return what was done.

    `loss_fn(outputs, targets)` defaults to the segmentation loss; a task passes its own (`Task.loss`).

    Deterministic on CPU for a given (seed, start_step): seed + start_step seeds torch's global RNG,
    the shuffling generator and the dataset's augmentation stream (`dataset.reseed`, if it has one),
    so successive rounds draw different patches but a rerun draws the same.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset; the site has no usable training case")
    device = get_device(device)
    loss_fn = loss_fn or _default_loss()
    seed = config.seed + start_step
    torch.manual_seed(seed)
    _reseed(dataset, seed)
    generator = torch.Generator().manual_seed(seed)
    if config.patch_pool:  # random patch size: each batch one shape of the pool (shared.data.patch_pool)
        loader = pool_loader(dataset, config.patch_pool, seed=seed, num_workers=config.num_workers,
                             pin_memory=device.type == "cuda")  # fmt: skip
    else:
        loader = DataLoader(
            dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
            num_workers=config.num_workers, pin_memory=device.type == "cuda",
        )  # fmt: skip
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    optimizer: Any = site_optimizer(config.optimizer, params, lr=lr_at(start_step, config),
                                    weight_decay=config.weight_decay, momentum=config.momentum)  # fmt: skip
    if wrap is not None:
        model, optimizer, loader = wrap(model, optimizer, loader)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    steps_mode = bool(config.steps and config.steps > 0)
    planned = config.steps if steps_mode else len(loader) * int(config.epochs or 0)

    model.train()
    start = time.perf_counter()
    step = start_step
    steps = examples = skipped = 0
    loss_sum = 0.0
    lr = lr_at(step, config)
    epochs = 1 if steps_mode else int(config.epochs or 0)
    for _ in range(epochs):
        for images, targets in _batches(loader, config.steps if steps_mode else None):
            if len(images) == 0:  # Poisson sampling (DP) may draw an empty batch
                continue
            images = fast_layout(images.to(device, non_blocking=True))
            targets = targets_to(targets, device)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, use_amp):
                outputs = model(images)
            loss = loss_fn(as_float(outputs), targets)
            if not torch.isfinite(loss):
                skipped += 1
                step += 1
                continue
            total = loss
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                total = loss + 0.5 * config.proximal_mu * prox
            scaler.scale(total).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            steps += 1
            examples += len(images)
            loss_sum += float(loss.detach())
            if progress is not None:
                progress(steps + skipped, planned, float(loss.detach()), lr)
    if steps == 0:
        raise FloatingPointError(
            f"no finite training step in {skipped} attempts; check the data (NaN in an image?) and lower the lr"
        )
    return TrainResult(
        examples=examples, steps=steps, mean_loss=loss_sum / steps, seconds=time.perf_counter() - start,
        end_step=step, last_lr=lr, skipped_steps=skipped,
    )  # fmt: skip


def loss_on(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batches: int,
    *,
    batch_size: int = 2,
    seed: int = 0,
    device: torch.device | str | None = None,
    loss_fn: LossFn | None = None,
) -> float:
    """Mean training loss of `model` on `batches` batches, without updating it (FedCostWAvg, FedPIDAvg).

    The RNG is forked and seeded, so calling it before and after local training with the same seed
    scores both models on the same patches (the dataset's augmentation stream is reseeded too; the
    next `train_local` reseeds it again, so this does not change what training sees).
    """
    if len(dataset) == 0:
        raise ValueError("cannot compute a loss on an empty dataset")
    device = get_device(device)
    loss_fn = loss_fn or _default_loss()
    was_training = model.training
    model.to(device).eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        _reseed(dataset, seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        for images, targets in _batches(loader, max(int(batches), 1)):
            outputs = model(fast_layout(images.to(device)))
            total += float(loss_fn(outputs, targets_to(targets, device)))
            count += 1
    model.train(was_training)
    return total / count
