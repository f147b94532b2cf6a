"""A run's privacy at a site, decided before its first step: settings, plan, budget gate, what may leave.

The maths is in `fedbrats.client.accounting`, the storage in `fedbrats.client.ledger`; this module
decides. One privacy layer, calibrated once: at a site's first round of a run, sigma is calibrated
for the run's remaining rounds against what is left of the budget (what earlier runs spent counts)
and stored in the ledger as the run's plan; every later round reuses it, and a round of more steps
than the plan covers is refused. With ``epoch-decay`` < 1 the plan is sized by the site's first
(longest) round, so later, shorter rounds spend less than planned: never more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedbrats.client.accounting import ACCOUNTANTS, History, calibrate_noise, epsilon_for
from fedbrats.client.ledger import PlanRow, PrivacyLedger
from fedbrats.client.site import SiteError

__all__ = [
    "ACCOUNTANTS", "DPConfig", "EVAL_RELEASE", "GRAD_SAMPLE_MODES", "PrivacyBudgetExhausted", "PrivacyPlan",
    "PrivacyPlanExceeded", "check_budget", "default_delta", "plan_for_run", "plan_privacy",
    "eval_metrics_released", "round_steps", "sample_rate",
]  # fmt: skip

log = logging.getLogger("fedbrats.privacy")
GRAD_SAMPLE_MODES = ("auto", "functorch", "hooks")
#: What leaves a DP site after evaluation: nothing but the case count ("suppress"), or the means over
#: its validation cases when it has at least `dp-eval-min-cases` of them ("aggregate").
EVAL_RELEASE = ("suppress", "aggregate")


class PrivacyBudgetExhausted(SiteError):
    """The next round would take the site past its epsilon budget; it does not train.

    A `SiteError`, so its message (numbers only, no paths or case ids) is safe to send to the server.
    """

    def __init__(self, *, spent: float, projected: float, budget: float, delta: float, steps: int):
        self.spent, self.projected, self.budget, self.delta, self.steps = (
            spent,
            projected,
            budget,
            delta,
            steps,
        )
        tail = (f"the next round ({steps} steps) would reach {projected:.3f}" if steps
                else "nothing is left to plan a run with")  # fmt: skip
        super().__init__(
            f"privacy budget exhausted: epsilon {spent:.3f} spent of {budget:g} (delta {delta:.2g}); "
            f"{tail}, so the site does not train"
        )


class PrivacyPlanExceeded(SiteError):
    """A round asks for more steps than the run's privacy plan (whose sigma was calibrated for them) allows."""


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


@dataclass
class DPConfig:
    """DP-SGD settings of a site. Zeros mean "derive it" (Flower's run config has no None).

    epsilon: the site's budget, over everything it ever trains on these patients (all rounds, all runs).
    delta: 0 = min(1e-5, 0.1 / cases). max_grad_norm: per-patient clipping norm C.
    noise_multiplier: sigma; 0 = calibrated once per run so that what earlier runs spent plus the run's
    planned steps reach `target_epsilon` in total (0 = `epsilon`). planned_rounds: the run's rounds.
    accountant: "rdp" or "prv". max_physical_batch: 0 = the training batch size.
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
            problems.append(
                f"delta must be in [0, 1) (0 = derived from the number of cases), got {self.delta}"
            )
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
            problems.append(
                f"max_physical_batch must be >= 0 (0 = batch size), got {self.max_physical_batch}"
            )
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            problems.append(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}"
            )
        if problems:
            raise ValueError("invalid differential privacy configuration: " + "; ".join(problems))

    @classmethod
    def from_run_config(cls, config: Any) -> DPConfig:
        """From a RunConfig: each field named explicitly; the rounds planned are the run's rounds."""
        return cls(
            epsilon=float(config.dp_epsilon),
            delta=float(config.dp_delta),
            max_grad_norm=float(config.dp_max_grad_norm),
            noise_multiplier=float(config.dp_noise_multiplier),
            target_epsilon=float(config.dp_target_epsilon),
            planned_rounds=int(config.rounds),
            accountant=str(config.dp_accountant),
            max_physical_batch=int(config.dp_max_physical_batch),
            grad_sample_mode=str(config.dp_grad_sample_mode),
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """A run's privacy at a site, fixed before its first step: sigma, q, and the steps sigma covers.

    `steps` is the most one round may take and `rounds` how many rounds the plan covers (from the round
    the site first trained in to the run's last); `spent_before` is what earlier runs had spent.
    """

    n_cases: int
    batch_size: int
    sample_rate: float
    steps: int
    rounds: int
    noise_multiplier: float
    delta: float
    accountant: str
    target_epsilon: float  # 0 when sigma was given rather than calibrated
    spent_before: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.steps * self.rounds

    @property
    def entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def epsilon_after(
        self, history: Sequence[tuple[float, float, int]] = (), steps: int | None = None
    ) -> float:
        """Epsilon once a round of `steps` (default: the plan's) is added to `history`."""
        entry = (self.noise_multiplier, self.sample_rate, int(steps or self.steps))
        return epsilon_for([*history, entry], self.delta, self.accountant)

    @classmethod
    def from_row(cls, row: PlanRow, batch_size: int) -> PrivacyPlan:
        return cls(row.n_cases, batch_size, row.sample_rate, row.round_steps, row.rounds, row.noise_multiplier,
                   row.delta, row.accountant, row.target_epsilon, row.spent_before)  # fmt: skip


def plan_privacy(
    n_cases: int, batch_size: int, dp: DPConfig, *, epochs: int | None = 1, steps: int | None = None,
    spent: Sequence[tuple[float, float, int]] = (), rounds: int | None = None,
) -> PrivacyPlan:  # fmt: skip
    """Sample rate, steps per round and sigma for `rounds` rounds (default: dp.planned_rounds).

    Sigma is calibrated once so that `spent` (the ledger's history: earlier runs count) plus every
    planned step stays within the target; raises PrivacyBudgetExhausted when nothing is left.
    """
    rate = sample_rate(n_cases, batch_size)
    per_round = round_steps(n_cases, batch_size, epochs=epochs, steps=steps)
    rounds = int(rounds or dp.planned_rounds)
    delta = dp.delta or default_delta(n_cases)
    if dp.delta and dp.delta >= 1 / n_cases:
        log.warning(
            "delta %.2g is not below 1/n = %.2g: the guarantee allows leaking a whole patient",
            delta,
            1 / n_cases,
        )
    before = epsilon_for(spent, delta, dp.accountant)
    target = 0.0
    sigma = dp.noise_multiplier
    if not sigma:
        target = min(dp.target_epsilon or dp.epsilon, dp.epsilon)
        if before >= target - 0.01:  # less than the calibration's resolution left
            raise PrivacyBudgetExhausted(spent=before, projected=before, budget=target, delta=delta, steps=0)
        sigma = calibrate_noise(target, delta, rate, per_round * rounds, dp.accountant, spent=spent)
    return PrivacyPlan(
        n_cases, batch_size, rate, per_round, rounds, float(sigma), delta, dp.accountant, target, before
    )


def check_budget(plan: PrivacyPlan, history: History, budget: float, steps: int | None = None) -> float:
    """Epsilon after a round of `steps` (default: the plan's); raises PrivacyBudgetExhausted past `budget`."""
    steps = int(steps or plan.steps)
    projected = plan.epsilon_after(history, steps)
    if projected > budget:
        spent = epsilon_for(history, plan.delta, plan.accountant)
        raise PrivacyBudgetExhausted(
            spent=spent, projected=projected, budget=budget, delta=plan.delta, steps=steps
        )
    return projected


def plan_for_run(
    ledger: PrivacyLedger, run_id: str, round: int, n_cases: int, batch_size: int, dp: DPConfig, steps: int
) -> PrivacyPlan:  # fmt: skip
    """The run's plan from the ledger, made and stored at the site's first round of the run.

    Refuses (PrivacyPlanExceeded) a round of more steps than the plan allows per round, or one that
    would take the run past the steps sigma was calibrated for, and a site whose case count changed.
    """
    stored = ledger.plan_for(run_id)
    if stored is None:
        rounds = max(1, dp.planned_rounds - max(int(round), 1) + 1)  # this round to the run's last
        fresh = plan_privacy(n_cases, batch_size, dp, steps=steps, spent=ledger.history(), rounds=rounds)
        stored = ledger.record_plan(
            run_id=run_id, noise_multiplier=fresh.noise_multiplier, sample_rate=fresh.sample_rate,
            round_steps=fresh.steps, rounds=fresh.rounds, delta=fresh.delta, accountant=fresh.accountant,
            target_epsilon=fresh.target_epsilon, spent_before=fresh.spent_before, budget=dp.epsilon, n_cases=n_cases,
        )  # fmt: skip
    plan = PrivacyPlan.from_row(stored, batch_size)
    if stored.n_cases != n_cases or stored.accountant != dp.accountant:
        raise PrivacyPlanExceeded(
            f"this run's privacy plan was made for {stored.n_cases} training cases and the {stored.accountant} "
            f"accountant; the site now has {n_cases} and {dp.accountant}: start a new run"
        )
    if steps > plan.steps:
        raise PrivacyPlanExceeded(f"the round needs {steps} DP steps; this run's privacy plan allows {plan.steps} "
                                  "per round (sigma was calibrated for them), so the site does not train")  # fmt: skip
    done = sum(r.steps for r in ledger.rows() if r.run_id == str(run_id))
    if done + steps > plan.total_steps:
        raise PrivacyPlanExceeded(f"the run has taken {done} of the {plan.total_steps} DP steps its privacy plan "
                                  f"covers; {steps} more would exceed it, so the site does not train")  # fmt: skip
    return plan


def eval_metrics_released(n_cases: int, mode: str, min_cases: int) -> bool:
    """Whether a DP site sends its evaluation metrics (means over its `n_cases` validation cases).

    DP-SGD protects the weights only: the Dice or HD95 of a single validation patient is that
    patient's data, outside the guarantee and outside the ledger (DESIGN section 10). "suppress"
    sends none; "aggregate" sends the means when they are over at least `min_cases` cases.
    """
    if mode not in EVAL_RELEASE:
        raise ValueError(f"dp-eval-metrics must be one of {', '.join(EVAL_RELEASE)}, got {mode!r}")
    if min_cases < 1:
        raise ValueError(f"dp-eval-min-cases must be >= 1, got {min_cases}")
    return mode == "aggregate" and n_cases >= min_cases

