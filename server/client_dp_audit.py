"""`fedbrats privacy audit` of client-level DP: the server's epsilon per round, recomputed from what it recorded.

The sites' DP-SGD ledgers are audited in `client.audit`. Client-level DP (DP-FedAvg at the server,
`strategies.client_dp`) keeps no ledger at the sites: each released round's history record carries the
accounting inputs (`client_dp`: noise multiplier, sample rate, delta, releases, clipping norm, updates
averaged, noise std). The audit checks, round by round, that
- every round that released a model has such a record, and the releases count up by one;
- the epsilon recorded equals RDP recomputed from those inputs (`client_level_epsilons`);
- with fixed clipping, the noise multiplier, clipping norm and delta are the run configuration's and the
  noise std was z S / k for the k updates averaged (less noise than that is a weaker guarantee);
- the last epsilon is within `--budget` when one is given.
The history is the server's own record, not signed: this shows the accounting is right and consistent
with the configuration, not that a server that edits its history is honest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbrats.server.history import read_history
from fedbrats.strategies.client_dp import client_level_epsilons

#: Relative tolerance of recorded against recomputed floats (they are written as JSON doubles).
TOLERANCE = 1e-6


@dataclass
class ClientDPRound:
    round: int
    releases: int
    recorded: float
    recomputed: float
    noise_multiplier: float
    noise_std: float
    updates: int
    problems: list[str] = field(default_factory=list)


@dataclass
class ClientDPAudit:
    run_dir: Path
    delta: float
    budget: float | None
    rounds: list[ClientDPRound]
    problems: list[str]

    @property
    def epsilon(self) -> float:
        return self.rounds[-1].recomputed if self.rounds else 0.0

    @property
    def exceeded(self) -> bool:
        return self.budget is not None and self.epsilon > self.budget * (1 + TOLERANCE)

    @property
    def failures(self) -> list[str]:
        found = list(self.problems)
        found += [f"round {r.round}: {p}" for r in self.rounds for p in r.problems]
        if self.exceeded:
            found.append(f"client-level epsilon {self.epsilon:.4f} exceeds the budget {self.budget:g}")
        return found

    @property
    def ok(self) -> bool:
        return not self.failures


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-12)


def _round_problems(record: dict[str, Any], dp: dict[str, Any], settings: dict[str, Any], expected: int,
                    recomputed: float) -> list[str]:  # fmt: skip
    problems = []
    releases = int(dp.get("releases", -1))
    if releases != expected:
        problems.append(f"releases {releases}, expected {expected} (one more than the previous released round)")
    if not _close(float(record.get("client_epsilon", math.nan)), recomputed):
        problems.append(f"recorded epsilon {record.get('client_epsilon')} but its inputs give {recomputed:.6g}")
    if not settings["client-dp-adaptive"]:
        z, clip, count = float(dp["noise-multiplier"]), float(dp["clipping-norm"]), int(dp["updates"])
        for name, used, configured in (("noise multiplier", z, settings["client-dp-noise-multiplier"]),
                                       ("clipping norm", clip, settings["client-dp-clipping-norm"]),
                                       ("delta", float(dp["client-delta"]), settings["client-dp-delta"])):  # fmt: skip
            if not _close(used, float(configured)):
                problems.append(f"{name} {used:g} differs from the run configuration's {float(configured):g}")
        owed = z * clip / max(count, 1)
        if not _close(float(dp["noise-std"]), owed):
            problems.append(f"noise std {float(dp['noise-std']):.6g} is not z S / k = {owed:.6g} for the {count} "
                            "updates averaged")  # fmt: skip
    return problems


def _settings(config_path: Path) -> dict[str, Any]:
    """The run configuration, with the client-level DP keys the audit reads checked."""
    try:
        settings = json.loads(config_path.read_text())
        for key in ("client-dp-noise-multiplier", "client-dp-clipping-norm", "client-dp-delta"):
            settings[key] = float(settings.get(key, 1e-5 if key == "client-dp-delta" else 0.0))
        settings["client-dp-adaptive"] = bool(settings.get("client-dp-adaptive", False))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path}: not a run configuration the audit can read ({err}); expected the JSON "
                         "object fedbrats writes") from err  # fmt: skip
    return settings


def audit_client_dp(run_dir: Path, *, budget: float | None = None) -> ClientDPAudit | None:
    """Audit the client-level DP of the run in `run_dir`; None when the run did not use it."""
    run_dir = Path(run_dir)
    config_path = run_dir / "run_config.json"
    if not config_path.is_file():
        return None
    settings = _settings(config_path)
    if settings["client-dp-noise-multiplier"] <= 0:
        return None
    history_path = run_dir / "history.jsonl"
    if not history_path.is_file():
        return ClientDPAudit(run_dir, settings["client-dp-delta"], budget, [],
                             [f"{history_path} is missing: the rounds released cannot be checked"])  # fmt: skip
    rounds, problems = [], []
    for record in read_history(history_path):
        dp = record.get("client_dp")
        if dp is None:
            if record.get("status") == "ok":
                problems.append(f"round {record.get('round')} released a model without a client-level DP record")
            continue
        try:  # the history is a file like any other: a damaged or edited record is a failure, not a crash
            z, q, delta = float(dp["noise-multiplier"]), float(dp["sample-rate"]), float(dp["client-delta"])
            recomputed = client_level_epsilons(z, q, int(dp["releases"]), delta)[-1]
            rounds.append(ClientDPRound(
                int(record["round"]), int(dp["releases"]), float(record.get("client_epsilon", math.nan)), recomputed,
                z, float(dp["noise-std"]), int(dp["updates"]),
                _round_problems(record, dp, settings, len(rounds) + 1, recomputed),
            ))  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            problems.append(f"round {record.get('round')}: unreadable client-level DP record ({type(err).__name__}: "
                            f"{err})")  # fmt: skip
    return ClientDPAudit(run_dir, settings["client-dp-delta"], budget, rounds, problems)


__all__ = ["ClientDPAudit", "ClientDPRound", "audit_client_dp"]
