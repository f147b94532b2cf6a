"""DP-SGD at a site with Opacus: the privacy unit is the patient, the budget is enforced through the ledger.

One item of `PatientDataset` is one patient (a random patch is cut inside ``__getitem__``), so
Poisson sampling over items samples patients: the sample rate is q = batch size / cases. Each
logical step clips every patient's gradient to `max_grad_norm` and adds N(0, (sigma C)^2) noise.

`train_private` is the DP counterpart of `client.trainer.train_local`, not a `wrap` hook, because
a DP round differs from an ordinary one where the hook cannot reach:
- an empty Poisson batch must still be a step (a noise-only update, counted by the accountant);
  `train_local` skips empty batches, and skipping depends on the sampling, which the analysis
  assumes hidden;
- a non-finite loss cannot be skipped either (same reason): here it stops the round;
- logical batches are split into physical ones (`BatchMemoryManager`), and AMP's loss scaling
  would scale the per-sample gradients before clipping, so DP training runs in fp32;
- the accountant is restored from the ledger, checked against the budget before the first step,
  and the round is written to the ledger before the weights can leave the site.

The run's plan (sigma calibrated once per run, against what is left of the budget) and the budget
gate are decided in `fedbrats.client.privacy_plan`; this module is the façade a site calls, and
re-exports them.

The Poisson sampling and the noise draw from generators seeded from the OS (`secrets`), never from
the run's seed: anyone who knows the run configuration could otherwise replay the noise.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.data_loader import wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, default_collate

from fedbrats.client.accounting import epsilon_for, make_accountant
from fedbrats.client.ledger import LedgerError, PrivacyLedger
from fedbrats.client.privacy_plan import (
    ACCOUNTANTS,
    EVAL_RELEASE,
    GRAD_SAMPLE_MODES,
    DPConfig,
    PrivacyBudgetExhausted,
    PrivacyPlan,
    PrivacyPlanExceeded,
    check_budget,
    default_delta,
    eval_metrics_released,
    plan_for_run,
    plan_privacy,
    round_steps,
    sample_rate,
)
from fedbrats.client.site_key import key_id
from fedbrats.client.trainer import LossFn, Progress, TrainConfig, TrainResult, get_device, lr_at, targets_to

__all__ = [
    "ACCOUNTANTS", "DPConfig", "EVAL_RELEASE", "GRAD_SAMPLE_MODES", "IncompatibleModelError",
    "PrivacyBudgetExhausted", "PrivacyPlan", "PrivacyPlanExceeded", "PrivateResult", "check_budget", "plan_for_run",
    "default_delta", "eval_metrics_released", "plan_privacy", "poisson_loader", "round_steps", "sample_rate",
    "train_private", "validate_model",
]  # fmt: skip

log = logging.getLogger("fedbrats.privacy")


class IncompatibleModelError(ValueError):
    """The model has layers DP-SGD cannot handle (e.g. BatchNorm mixes patients within a batch)."""


def validate_model(model: nn.Module) -> None:
    """Refuse, before any training, a model Opacus cannot train with per-patient gradients."""
    was_training = model.training
    model.train()  # Opacus validates modules in training mode
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if errors:
        found = "; ".join(f"{type(e).__name__}: {str(e).split('.')[0]}" for e in errors[:5])
        raise IncompatibleModelError(
            f"model {type(model).__name__} cannot be trained with DP-SGD ({len(errors)} problem(s): {found}). "
            "Use GroupNorm instead of BatchNorm (as every registered model does) or "
            "opacus.validators.ModuleValidator.fix(model)"
        )


@dataclass
class PrivateResult(TrainResult):
    """`TrainResult` plus what the round spent. `mean_loss` is for the site's log: it is not private."""

    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    budget: float = 0.0
    empty_steps: int = 0
    ledger_row: int = 0  # the ledger row this round wrote
    ledger_head: int = 0  # first 48 bits of its hash
    ledger_key: int = 0  # first 48 bits of the site key's fingerprint

    def metrics(self) -> dict[str, float]:
        """Metrics for the Flower reply (same keys every round). The ledger-* numbers let the audit match
        the site's ledger against what the server recorded: deleted or rewritten rows, another key."""
        return {
            "epsilon": self.epsilon, "delta": self.delta, "epsilon-budget": self.budget,
            "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate, "dp-steps": self.steps,
            "ledger-row": self.ledger_row, "ledger-head": self.ledger_head, "ledger-key": self.ledger_key,
        }  # fmt: skip


def poisson_loader(
    dataset: torch.utils.data.Dataset, rate: float, steps: int, *, generator: torch.Generator,
    num_workers: int = 0, pin_memory: bool = False,
) -> DataLoader:  # fmt: skip
    """Opacus' Poisson sampler and empty-batch collate, one pass = `steps` logical batches (one round)."""
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=rate, generator=generator, steps=steps
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=wrap_collate_with_empty(collate_fn=default_collate),
                      num_workers=num_workers, pin_memory=pin_memory)  # fmt: skip


def _secret_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _is_empty(batch: Any) -> bool:
    return len(batch) == 0 or len(batch[0]) == 0


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        # Opacus' full backward hooks fire on module outputs because the images need no gradient: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        yield


def _torch_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The `torch.optim` optimiser Opacus wraps (the non-private path uses `client.optimizers` instead)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


def train_private(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    dp: DPConfig,
    ledger: PrivacyLedger,
    *,
    round: int,
    run_id: str = "",
    start_step: int = 0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    loss_fn: LossFn | None = None,
    grad_correction: Mapping[str, torch.Tensor] | None = None,
    on_gradient: Callable[[str, torch.Tensor], None] | None = None,
) -> PrivateResult:
    """One round of DP-SGD (`config.optimizer`, Adam or SGD, on the noisy gradients) on `dataset`, recorded in `ledger`.

    `grad_correction` (parameter name -> tensor, e.g. SCAFFOLD's c - c_i) is added to the noisy
    gradient at every step: it depends on the data only through earlier releases, so it is
    post-processing. Parameter hooks (`ControlVariate.attach`) would be lost: Opacus replaces p.grad.
    `on_gradient(name, grad)` sees each corrected parameter's noisy gradient first, at every step
    (`ControlVariate.observe`: post-processing as well).
    Only parameters with ``requires_grad`` (run key `trainable`) are clipped, noised and updated; a
    frozen parameter is left exactly as it came, and its correction is ignored.

    Raises PrivacyBudgetExhausted (nothing trained, nothing recorded) when the round would exceed
    `dp.epsilon`, PrivacyPlanExceeded for a round beyond the run's plan, IncompatibleModelError for a
    model Opacus cannot handle, LedgerError if this run's round is already in the ledger or the ledger
    fails verification (a site does not build on a ledger it cannot vouch for). The model is trained in place and returned to a plain module.
    `config.amp` and `config.grad_clip` are ignored: DP runs in fp32 and clips per patient.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot train on an empty dataset; the site has no usable training case")
    validate_model(model)
    steps = round_steps(n, config.batch_size, epochs=config.epochs, steps=config.steps)
    if ledger.has_round(run_id, round):
        raise LedgerError(
            f"round {round} of run {run_id!r} was already trained at this site; not spending privacy twice"
        )
    broken = ledger.verify()
    if broken:
        where, what = broken[0]
        raise LedgerError(f"{ledger.path} fails verification ({where}: {what}; {len(broken)} problem(s)): "
                          "the site does not train on a ledger it cannot vouch for; run fedbrats privacy audit")  # fmt: skip
    plan = plan_for_run(ledger, run_id, round, n, config.batch_size, dp, steps)
    history = ledger.history()
    check_budget(plan, history, dp.epsilon, steps)

    device = get_device(device)
    mode = "functorch" if dp.grad_sample_mode == "auto" else dp.grad_sample_mode
    loss_fn = loss_fn or _default_loss()
    seed = config.seed + start_step  # augmentation only, as in train_local; sampling and noise are secret
    torch.manual_seed(seed)
    if callable(getattr(dataset, "reseed", None)):
        dataset.reseed(seed)
    model.to(device)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True,
                           force_functorch=mode == "functorch")  # fmt: skip
    params = [p for p in gsm.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    named = dict(model.named_parameters())
    unknown = sorted(set(grad_correction or {}) - set(named))
    if unknown:
        raise ValueError(f"grad_correction names parameters the model does not have: {unknown[:5]}")
    offsets = [(k, named[k], torch.as_tensor(v, dtype=named[k].dtype, device=device).reshape(named[k].shape))
               for k, v in (grad_correction or {}).items() if named[k].requires_grad]  # fmt: skip
    optimizer = DPOptimizer(
        _torch_optimizer(config, params, lr_at(start_step, config)),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        expected_batch_size=plan.sample_rate * n, loss_reduction="mean", generator=_secret_generator(device),
    )  # fmt: skip
    accountant = make_accountant(plan.accountant, history)
    done = 0

    def after_noise(opt: DPOptimizer) -> None:  # once per logical step, after clip + noise, before Adam
        nonlocal done
        accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=plan.sample_rate)
        done += 1
        for name, p, _ in offsets if on_gradient else ():
            on_gradient(name, p.grad)
        if anchor is not None:  # FedProx pull: data-independent, so added after the noise (post-processing)
            for p, a in zip(params, anchor, strict=True):
                p.grad.add_(p.detach() - a, alpha=config.proximal_mu)
        for _, p, offset in offsets:  # SCAFFOLD-style correction: post-processing too
            p.grad.add_(offset)

    optimizer.attach_step_hook(after_noise)
    loader = poisson_loader(dataset, plan.sample_rate, steps, generator=_secret_generator(torch.device("cpu")),
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")  # fmt: skip
    physical = dp.max_physical_batch or config.batch_size
    examples = empty = 0
    loss_sum, lr, last_loss = 0.0, lr_at(start_step, config), float("nan")
    start = time.perf_counter()
    gsm.train()
    try:
        with _quiet(), BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                          optimizer=optimizer) as batches:  # fmt: skip
            for batch in batches:
                before = done
                lr = lr_at(start_step + done, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                if _is_empty(batch):  # nobody sampled: a noise-only step, still counted
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                    optimizer.step()
                    empty += 1
                else:
                    # targets: region masks, class indices or both (multitask), as floats (shared.tasks)
                    images, targets = batch[0].to(device, non_blocking=True), targets_to(batch[1], device)
                    loss = loss_fn(gsm(images), targets)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss at DP step {done + 1}; a DP step cannot be skipped, so the round "
                            "stops (nothing was recorded or sent): check the data and lower the lr"
                        )
                    loss.backward()
                    optimizer.step()
                    last_loss = float(loss.detach())
                    loss_sum += last_loss * len(images)
                    examples += len(images)
                if progress is not None and done > before:
                    progress(done, steps, last_loss, lr)
    finally:
        gsm.to_standard_module()  # hooks and grad_sample attributes off: `model` is a plain module again
        model.eval()
    if done != steps:
        raise RuntimeError(f"DP round took {done} steps, {steps} planned; nothing recorded")
    epsilon = epsilon_for(accountant.history, plan.delta, plan.accountant)  # the history the hook stepped
    row = ledger.record(run_id=run_id, round=round, noise_multiplier=plan.noise_multiplier,
                        sample_rate=plan.sample_rate, steps=done, epsilon=epsilon, delta=plan.delta,
                        accountant=plan.accountant, budget=dp.epsilon, max_grad_norm=dp.max_grad_norm, n_cases=n,
                        plan_hash=ledger.plan_for(run_id).row_hash)  # fmt: skip
    log.info("DP round %s: %d steps (%d empty), sigma %.3f, q %.4f, epsilon %.3f of %g (delta %.2g)",
             round, done, empty, plan.noise_multiplier, plan.sample_rate, epsilon, dp.epsilon, plan.delta)  # fmt: skip
    return PrivateResult(
        examples=examples, steps=done, mean_loss=loss_sum / examples if examples else math.nan,
        seconds=time.perf_counter() - start, end_step=start_step + done, last_lr=lr, epsilon=epsilon,
        delta=plan.delta, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, budget=dp.epsilon,
        empty_steps=empty, ledger_row=row.seq, ledger_head=key_id(row.row_hash), ledger_key=key_id(row.key_fingerprint),
    )  # fmt: skip


def _default_loss() -> LossFn:
    from fedbrats.shared.models.losses import region_loss

    return region_loss
