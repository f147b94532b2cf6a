"""Client-level DP at the server (DP-FedAvg): Flower's clipping wrappers plus our accounting over rounds.

Papers: McMahan et al. 2018 (https://arxiv.org/abs/1710.06963), fixed clipping; Andrew et al. 2021
(https://arxiv.org/abs/1905.03871), adaptive clipping. Each round the server clips every site's
update (its weights minus the global weights) to norm S, averages with equal weights and adds
Gaussian noise of standard deviation z S / k to the average of k updates, i.e. z S on the sum.

What the guarantee is, plainly:
- The protected unit is a whole site: (epsilon, delta)-DP for adding or removing one hospital's
  entire contribution (all its patients, every round). It bounds what can be learned about a
  hospital from the sequence of global models; it says nothing against the server, which sees
  every update in clear (central DP with a trusted server), and nothing about evaluation metrics.
- Epsilon composes over the rounds released, with RDP of the Gaussian mechanism. Amplification by
  sampling (q = sites per round / total sites) is counted only when asked (`amplification=True`),
  and is valid only if each round's sites are drawn at random and kept secret from whoever sees
  the models; our round loop draws them from the run's seed, which every site knows, so the
  default is q = 1.
- With ten hospitals it is weak: z = 1 over 20 rounds gives epsilon about 30 at delta 1e-5
  (`client_level_epsilons(1.0, 1.0, 20)`); a single-digit client-level epsilon needs many more
  sites (so that z S / k is small next to the signal) or few rounds. Report it as it is.

What we change in Flower's wrappers (`DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`):
- equal weights: the inner strategy's weighting metric (``num-examples``) is set to 1 on every
  reply before aggregation; with weights by case count one large hospital would move the average
  by more than S / k and the noise would not cover it;
- the noise is scaled by the number of updates actually aggregated (Flower uses the configured
  number: fewer replies would mean less noise on the sum), and by the clipping norm the round
  actually clipped with (Flower's adaptive wrapper updates the norm before adding the noise);
- noise from a generator seeded by the OS, not numpy's global one;
- adaptive clipping: Flower splits z between the update (z_u = (z^-2 - (2 s)^-2)^-1/2) and the
  count of clipped updates (std s), as Andrew et al. do for centered bits (sensitivity 1/2); Flower
  counts uncentered bits (sensitivity 1), so the pair is a Gaussian mechanism of noise multiplier
  z_eff = (z_u^-2 + s^-2)^-1/2 < z, and that is what we account.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedbrats.strategies.hooks import RoundHooks, StrategyHooks, hooks_of

__all__ = [
    "ClientDPAdaptiveClipping", "ClientDPFixedClipping", "GUARANTEE", "adaptive_effective_noise",
    "client_level_epsilons", "client_noise_multiplier", "client_plan_rows", "with_client_dp",
]  # fmt: skip

log = logging.getLogger("fedbrats.client_dp")

GUARANTEE = (
    "client-level (epsilon, delta)-DP: adding or removing one whole site (all its patients, all rounds) "
    "changes the distribution of the released global models by at most (epsilon, delta); the server "
    "itself sees every update in clear"
)


def client_level_epsilons(noise_multiplier: float, sample_rate: float, rounds: int, delta: float = 1e-5) -> list[float]:
    """Epsilon after each of rounds 1..`rounds` (RDP of the subsampled Gaussian, Opacus' analysis)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0 for any guarantee, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    orders = RDPAccountant.DEFAULT_ALPHAS
    one = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))
    return [float(get_privacy_spent(orders=orders, rdp=one * t, delta=delta)[0]) for t in range(1, rounds + 1)]


def client_noise_multiplier(target_epsilon: float, sample_rate: float, rounds: int, delta: float = 1e-5) -> float:
    """Noise multiplier z giving `target_epsilon` after `rounds` releases (Opacus' search, RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds, accountant="rdp"))  # fmt: skip


def client_plan_rows(
    sites: int, rounds: int, epsilon: float, delta: float = 1e-5, clipping_norm: float | None = None,
) -> list[tuple[str, str]]:  # fmt: skip
    """(setting, value) rows of the server noise that keeps a whole site within `epsilon` over `rounds`.

    Every site aggregates every round (q = 1, as the round loop accounts); fixed clipping."""
    if sites < 1 or rounds < 1:
        raise ValueError(f"sites and rounds must be >= 1, got sites={sites}, rounds={rounds}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    z = client_noise_multiplier(epsilon, 1.0, rounds, delta)
    spent = client_level_epsilons(z, 1.0, rounds, delta)
    rows = [
        ("protected unit", "one whole site (client-level DP at the server)"),
        ("sites aggregated per round k", str(sites)),
        ("rounds", str(rounds)),
        ("delta", f"{delta:.2g}"),
        ("target epsilon", f"{epsilon:g}"),
        ("noise multiplier z (client-dp-noise-multiplier)", f"{z:.4f}"),
        ("epsilon after round 1", f"{spent[0]:.4f}"),
        (f"epsilon after round {rounds} (RDP)", f"{spent[-1]:.4f}"),
    ]
    if clipping_norm is not None:
        rows.append(("noise std per coordinate of the mean update, z S / k", f"{z * clipping_norm / sites:.4g}"))
    return rows


def adaptive_effective_noise(noise_multiplier_update: float, clipped_count_stddev: float) -> float:
    """Noise multiplier of (noisy sum of updates, noisy uncentered clipped count) taken together."""
    if clipped_count_stddev <= 0:
        return noise_multiplier_update
    return float((noise_multiplier_update**-2 + clipped_count_stddev**-2) ** -0.5)


class _ClientDPAccounting(StrategyHooks):
    """Mixin over Flower's server-side wrappers: equal weights, honest noise scale, epsilon per round.

    The round loop's hooks (``fedbrats.strategies.hooks``) are the wrapped strategy's, plus this
    wrapper's own state in the checkpoint."""

    strategy: Strategy
    noise_multiplier: float
    clipping_norm: float

    @property
    def inner_hooks(self) -> RoundHooks:
        return hooks_of(self.strategy)

    @property
    def required_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner_hooks.required_metrics

    @property
    def min_replies(self) -> int:  # type: ignore[override]
        return self.inner_hooks.min_replies

    def reply_problem(self, reply: Message) -> str | None:
        return self.inner_hooks.reply_problem(reply)

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        return self.inner_hooks.train_config(server_round, config)

    def evaluate_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        return self.inner_hooks.evaluate_config(server_round, config)

    def _setup_accounting(self, total_sites: int, delta: float, amplification: bool, num_sampled: int) -> None:
        if total_sites < num_sampled:
            raise ValueError(f"total_sites ({total_sites}) must be >= sites sampled per round ({num_sampled})")
        self.total_sites = total_sites
        self.delta = delta
        self.sample_rate = num_sampled / total_sites if amplification else 1.0
        self.releases = 0
        self._round_clip = self.clipping_norm
        self._round_count = num_sampled
        self._rng = np.random.default_rng(secrets.randbits(128))

    @property
    def accounted_noise_multiplier(self) -> float:
        return self.noise_multiplier

    def epsilon(self, releases: int | None = None) -> float:
        """Client-level epsilon after `releases` aggregates (default: those released so far)."""
        n = self.releases if releases is None else releases
        if n == 0:
            return 0.0
        return client_level_epsilons(self.accounted_noise_multiplier, self.sample_rate, n, self.delta)[-1]

    def privacy_report(self) -> dict[str, Any]:
        """Numbers for the run history: what was released and what it costs (`server.client_dp_audit` checks them)."""
        return {
            "client-epsilon": self.epsilon(), "client-delta": self.delta, "releases": self.releases,
            "noise-multiplier": self.accounted_noise_multiplier, "sample-rate": self.sample_rate,
            "clipping-norm": self._round_clip, "updates": self._round_count,
            "noise-std": self._noise_std(),
        }  # fmt: skip

    def _noise_std(self) -> float:
        """z S / k: the std of the noise on the mean of this round's k clipped updates."""
        return self.noise_multiplier * self._round_clip / self._round_count

    def _equal_weights(self, replies: list[Message]) -> None:
        key = getattr(self.strategy, "weighted_by_key", None)
        if not key:
            return
        for reply in replies:
            for name, record in list(reply.content.metric_records.items()):
                if key in record:
                    reply.content[name] = MetricRecord({**dict(record), key: 1.0})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies_list = [r for r in replies if not r.has_error()]
        self._equal_weights(replies_list)
        self._round_clip, self._round_count = self.clipping_norm, max(len(replies_list), 1)
        arrays, metrics = super().aggregate_train(server_round, replies_list)  # type: ignore[misc]
        if arrays is not None:
            self.releases += 1
            eps = self.epsilon()
            log.info("round %d: client-level epsilon %.3f (delta %.1e) after %d releases", server_round, eps,
                     self.delta, self.releases)  # fmt: skip
            metrics = MetricRecord({**(dict(metrics) if metrics else {}), "client-epsilon": eps})
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = self._noise_std()
        noisy = {}
        for key, array in aggregated.items():
            values = array.numpy()
            noisy[key] = Array(np.asarray(values + self._rng.normal(0.0, std, values.shape).astype(values.dtype)))
        log.info("client-level DP: Gaussian noise of std %.4g added to the average of %d updates", std,
                 self._round_count)  # fmt: skip
        return ArrayRecord(noisy)

    # --- checkpointing (fedbrats.server.state): the inner strategy's state plus ours --------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = self.inner_hooks.state_dict()
        return arrays, {**meta, "client_dp": {"releases": self.releases, "clipping_norm": self.clipping_norm}}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        meta = dict(meta)
        ours = meta.pop("client_dp", None)
        self.inner_hooks.load_state_dict(arrays, meta)
        if ours:
            self.releases = int(ours["releases"])
            self.clipping_norm = float(ours["clipping_norm"])

    def summary(self) -> None:
        log.info("client-level DP: z %.3f, q %.3f, delta %.1e; %s", self.accounted_noise_multiplier,
                 self.sample_rate, self.delta, GUARANTEE)  # fmt: skip
        super().summary()  # type: ignore[misc]


class ClientDPFixedClipping(_ClientDPAccounting, DifferentialPrivacyServerSideFixedClipping):
    """DP-FedAvg with fixed clipping norm S and noise multiplier z, accounted per round."""

    def __init__(
        self, strategy: Strategy, noise_multiplier: float, clipping_norm: float, num_sampled_sites: int, *,
        total_sites: int, delta: float = 1e-5, amplification: bool = False,
    ) -> None:  # fmt: skip
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0 for client-level DP, got {noise_multiplier}")
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_sites)
        self._setup_accounting(total_sites, delta, amplification, num_sampled_sites)


class ClientDPAdaptiveClipping(_ClientDPAccounting, DifferentialPrivacyServerSideAdaptiveClipping):
    """DP-FedAvg whose clipping norm tracks a quantile of the update norms (Andrew et al.).

    `noise_multiplier` is the target z of the pair (update, clipped count); Flower derives the update
    noise from it, and we account the effective z of what it actually adds (see the module docstring).
    """

    def __init__(
        self, strategy: Strategy, noise_multiplier: float, num_sampled_sites: int, *, total_sites: int,
        initial_clipping_norm: float = 0.1, target_clipped_quantile: float = 0.5, clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None, delta: float = 1e-5, amplification: bool = False,
    ) -> None:  # fmt: skip
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0 for client-level DP, got {noise_multiplier}")
        super().__init__(strategy, noise_multiplier, num_sampled_sites, initial_clipping_norm,
                         target_clipped_quantile, clip_norm_lr, clipped_count_stddev)  # fmt: skip
        self._setup_accounting(total_sites, delta, amplification, num_sampled_sites)

    @property
    def accounted_noise_multiplier(self) -> float:
        return adaptive_effective_noise(self.noise_multiplier, self.clipped_count_stddev)

    def _noisy_fraction(self, count: int, total: int) -> float:
        return float(self._rng.normal(count, self.clipped_count_stddev)) / float(total)


def with_client_dp(
    strategy: Strategy,
    *,
    noise_multiplier: float,
    num_sampled_sites: int,
    total_sites: int,
    clipping_norm: float = 1.0,
    adaptive: bool = False,
    delta: float = 1e-5,
    amplification: bool = False,
    target_clipped_quantile: float = 0.5,
    clip_norm_lr: float = 0.2,
    clipped_count_stddev: float | None = None,
) -> ClientDPFixedClipping | ClientDPAdaptiveClipping:
    """Wrap any strategy with client-level DP; `clipping_norm` is the fixed S, or the initial one if adaptive."""
    if adaptive:
        return ClientDPAdaptiveClipping(
            strategy, noise_multiplier, num_sampled_sites, total_sites=total_sites,
            initial_clipping_norm=clipping_norm, target_clipped_quantile=target_clipped_quantile,
            clip_norm_lr=clip_norm_lr, clipped_count_stddev=clipped_count_stddev, delta=delta,
            amplification=amplification,
        )  # fmt: skip
    return ClientDPFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled_sites,
                                 total_sites=total_sites, delta=delta, amplification=amplification)  # fmt: skip
