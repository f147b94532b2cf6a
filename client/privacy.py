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

The Poisson sampling and the noise draw from generators seeded from the OS (`secrets`), never from
the run's seed: anyone who knows the run configuration could otherwise replay the noise.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
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

from fedbrats.client.ledger import (
    ACCOUNTANTS,
    History,
    LedgerError,
    PrivacyLedger,
    epsilon_for,
    make_accountant,
)
from fedbrats.client.site import SiteError
from fedbrats.client.trainer import LossFn, Progress, TrainConfig, TrainResult, get_device, lr_at

__all__ = [
    "DPConfig", "IncompatibleModelError", "PrivacyBudgetExhausted", "PrivacyPlan", "PrivateResult",
    "calibrate_noise", "check_budget", "default_delta", "plan_privacy", "poisson_loader", "round_steps",
    "sample_rate", "train_private", "validate_model",
]  # fmt: skip

log = logging.getLogger("fedbrats.privacy")
GRAD_SAMPLE_MODES = ("auto", "functorch", "hooks")


class IncompatibleModelError(ValueError):
    """The model has layers DP-SGD cannot handle (e.g. BatchNorm mixes patients within a batch)."""


class PrivacyBudgetExhausted(SiteError):
    """The next round would take the site past its epsilon budget; it does not train.

    A `SiteError`, so its message (numbers only, no paths or case ids) is safe to send to the server.
    """

    def __init__(self, *, spent: float, projected: float, budget: float, delta: float, steps: int):
        self.spent, self.projected, self.budget, self.delta, self.steps = spent, projected, budget, delta, steps
        super().__init__(
            f"privacy budget exhausted: epsilon {spent:.3f} spent of {budget:g} (delta {delta:.2g}); "
            f"the next round ({steps} steps) would reach {projected:.3f}, so the site does not train"
        )


def default_delta(n_cases: int) -> float:
    """min(1e-5, 0.1 / n): well below 1/n, the level at which (eps, delta)-DP allows leaking a whole record."""
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    return min(1e-5, 0.1 / n_cases)


def sample_rate(n_cases: int, batch_size: int) -> float:
    """Poisson sampling probability of each patient: expected batch size / cases."""
    if n_cases < 1 or batch_size < 1:
        raise ValueError(f"need n_cases >= 1 and batch_size >= 1, got {n_cases} and {batch_size}")
    return min(1.0, batch_size / n_cases)


def round_steps(n_cases: int, batch_size: int, *, epochs: int | None = 1, steps: int | None = None) -> int:
    """Logical DP steps in one round: `steps`, or `epochs` passes of int(1/q) steps (as Opacus counts an epoch)."""
    if steps and steps > 0:
        return int(steps)
    if not epochs or epochs < 1:
        raise ValueError(f"one of epochs ({epochs}) or steps ({steps}) must be >= 1")
    return int(epochs) * max(1, int(1 / sample_rate(n_cases, batch_size)))


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, rate: float, steps: int, accountant: str = "rdp") -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) keeping `steps` steps at rate `rate` within target_epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                          steps=steps, accountant=accountant))  # fmt: skip
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta:.2g} over {steps} steps "
            f"at sample rate {rate:.4f} ({err}); raise the budget or train fewer steps"
        ) from err


@dataclass
class DPConfig:
    """DP-SGD settings of a site. Zeros mean "derive it" (Flower's run config has no None).

    epsilon: the site's budget, over everything it ever trains on these patients (all rounds, all runs).
    delta: 0 = min(1e-5, 0.1 / cases). max_grad_norm: per-patient clipping norm C.
    noise_multiplier: sigma; 0 = calibrated once so that `planned_rounds` rounds reach `target_epsilon`
    (0 = `epsilon`). accountant: "rdp" or "prv". max_physical_batch: 0 = the training batch size.
    grad_sample_mode: "functorch" (per-sample gradients by vmap: about 2x a plain step on CPU at real
    sizes), "hooks" (Opacus' per-layer samplers; its unfold buffers explode at real 3D patch sizes),
    "auto" = functorch.
    """

    epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    planned_rounds: int = 1
    accountant: str = "rdp"
    max_physical_batch: int = 0
    grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if not self.epsilon > 0:
            problems.append(f"epsilon budget must be > 0, got {self.epsilon}")
        if not 0 <= self.delta < 1:
            problems.append(f"delta must be in [0, 1) (0 = derived from the number of cases), got {self.delta}")
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier < 0:
            problems.append(f"noise_multiplier must be >= 0 (0 = calibrated), got {self.noise_multiplier}")
        if self.target_epsilon < 0:
            problems.append(f"target_epsilon must be >= 0 (0 = the budget), got {self.target_epsilon}")
        if self.planned_rounds < 1:
            problems.append(f"planned_rounds must be >= 1, got {self.planned_rounds}")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.max_physical_batch < 0:
            problems.append(f"max_physical_batch must be >= 0 (0 = batch size), got {self.max_physical_batch}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            problems.append(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}")
        if problems:
            raise ValueError("invalid differential privacy configuration: " + "; ".join(problems))

    @classmethod
    def from_run_config(cls, config: Any) -> DPConfig:
        """From a RunConfig's ``dp_<field>`` attributes (absent ones keep their defaults); rounds planned = config.rounds."""
        values = {f.name: getattr(config, f"dp_{f.name}") for f in fields(cls) if hasattr(config, f"dp_{f.name}")}
        values["planned_rounds"] = int(getattr(config, "rounds", 1))
        return cls(**values)


@dataclass(frozen=True)
class PrivacyPlan:
    """What one round will spend: sigma, q and steps, fixed before the first step."""

    n_cases: int
    batch_size: int
    sample_rate: float
    steps: int
    rounds: int
    noise_multiplier: float
    delta: float
    accountant: str
    target_epsilon: float  # 0 when sigma was given rather than calibrated

    @property
    def entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def epsilon_after(self, history: Sequence[tuple[float, float, int]] = ()) -> float:
        """Epsilon once this round is added to `history`."""
        return epsilon_for([*history, self.entry], self.delta, self.accountant)


def plan_privacy(
    n_cases: int, batch_size: int, dp: DPConfig, *, epochs: int | None = 1, steps: int | None = None
) -> PrivacyPlan:
    """Sample rate, steps per round and noise multiplier; sigma is the same every round of a run."""
    rate = sample_rate(n_cases, batch_size)
    per_round = round_steps(n_cases, batch_size, epochs=epochs, steps=steps)
    delta = dp.delta or default_delta(n_cases)
    if dp.delta and dp.delta >= 1 / n_cases:
        log.warning("delta %.2g is not below 1/n = %.2g: the guarantee allows leaking a whole patient", delta, 1 / n_cases)
    target = 0.0
    sigma = dp.noise_multiplier
    if not sigma:
        target = dp.target_epsilon or dp.epsilon
        sigma = calibrate_noise(target, delta, rate, per_round * dp.planned_rounds, dp.accountant)
    return PrivacyPlan(n_cases, batch_size, rate, per_round, dp.planned_rounds, float(sigma), delta, dp.accountant, target)


def check_budget(plan: PrivacyPlan, history: History, budget: float) -> float:
    """Epsilon after the planned round; raises PrivacyBudgetExhausted if it would exceed `budget`."""
    projected = plan.epsilon_after(history)
    if projected > budget:
        spent = epsilon_for(history, plan.delta, plan.accountant)
        raise PrivacyBudgetExhausted(spent=spent, projected=projected, budget=budget, delta=plan.delta, steps=plan.steps)
    return projected


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

    def metrics(self) -> dict[str, float]:
        """Metrics for the Flower reply (same keys every round)."""
        return {
            "epsilon": self.epsilon, "delta": self.delta, "epsilon-budget": self.budget,
            "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate, "dp-steps": self.steps,
        }  # fmt: skip


def poisson_loader(
    dataset: torch.utils.data.Dataset, rate: float, steps: int, *, generator: torch.Generator,
    num_workers: int = 0, pin_memory: bool = False,
) -> DataLoader:  # fmt: skip
    """Opacus' Poisson sampler and empty-batch collate, one pass = `steps` logical batches (one round)."""
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=rate, generator=generator, steps=steps)
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
) -> PrivateResult:
    """One round of DP-SGD (Adam on the noisy gradients) on `dataset`, recorded in `ledger`.

    `grad_correction` (parameter name -> tensor, e.g. SCAFFOLD's c - c_i) is added to the noisy
    gradient at every step: it depends on the data only through earlier releases, so it is
    post-processing. Parameter hooks (`ControlVariate.attach`) would be lost: Opacus replaces p.grad.

    Raises PrivacyBudgetExhausted (nothing trained, nothing recorded) when the round would exceed
    `dp.epsilon`, IncompatibleModelError for a model Opacus cannot handle, LedgerError if this run's
    round is already in the ledger. The model is trained in place and returned to a plain module.
    `config.amp` and `config.grad_clip` are ignored: DP runs in fp32 and clips per patient.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot train on an empty dataset; the site has no usable training case")
    validate_model(model)
    plan = plan_privacy(n, config.batch_size, dp, epochs=config.epochs, steps=config.steps)
    if ledger.has_round(run_id, round):
        raise LedgerError(f"round {round} of run {run_id!r} was already trained at this site; not spending privacy twice")
    history = ledger.history()
    check_budget(plan, history, dp.epsilon)

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
    offsets = [(named[k], torch.as_tensor(v, dtype=named[k].dtype, device=device).reshape(named[k].shape))
               for k, v in (grad_correction or {}).items()]  # fmt: skip
    optimizer = DPOptimizer(
        torch.optim.Adam(params, lr=lr_at(start_step, config), weight_decay=config.weight_decay),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        expected_batch_size=plan.sample_rate * n, loss_reduction="mean", generator=_secret_generator(device),
    )  # fmt: skip
    accountant = make_accountant(plan.accountant, history)
    done = 0

    def after_noise(opt: DPOptimizer) -> None:  # once per logical step, after clip + noise, before Adam
        nonlocal done
        accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=plan.sample_rate)
        done += 1
        if anchor is not None:  # FedProx pull: data-independent, so added after the noise (post-processing)
            for p, a in zip(params, anchor, strict=True):
                p.grad.add_(p.detach() - a, alpha=config.proximal_mu)
        for p, offset in offsets:  # SCAFFOLD-style correction: post-processing too
            p.grad.add_(offset)

    optimizer.attach_step_hook(after_noise)
    loader = poisson_loader(dataset, plan.sample_rate, plan.steps, generator=_secret_generator(torch.device("cpu")),
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
                    images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                    loss = loss_fn(gsm(images), targets.float())
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
                    progress(done, plan.steps, last_loss, lr)
    finally:
        gsm.to_standard_module()  # hooks and grad_sample attributes off: `model` is a plain module again
        model.eval()
    if done != plan.steps:
        raise RuntimeError(f"DP round took {done} steps, {plan.steps} planned; nothing recorded")
    epsilon = epsilon_for(accountant.history, plan.delta, plan.accountant)  # the history the hook stepped
    ledger.record(run_id=run_id, round=round, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                  steps=done, epsilon=epsilon, delta=plan.delta, accountant=plan.accountant, budget=dp.epsilon,
                  max_grad_norm=dp.max_grad_norm, n_cases=n)  # fmt: skip
    log.info("DP round %s: %d steps (%d empty), sigma %.3f, q %.4f, epsilon %.3f of %g (delta %.2g)",
             round, done, empty, plan.noise_multiplier, plan.sample_rate, epsilon, dp.epsilon, plan.delta)  # fmt: skip
    return PrivateResult(
        examples=examples, steps=done, mean_loss=loss_sum / examples if examples else math.nan,
        seconds=time.perf_counter() - start, end_step=start_step + done, last_lr=lr, epsilon=epsilon,
        delta=plan.delta, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, budget=dp.epsilon,
        empty_steps=empty,
    )  # fmt: skip


def _default_loss() -> LossFn:
    from fedbrats.shared.models.losses import region_loss

    return region_loss
