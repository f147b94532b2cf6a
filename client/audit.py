"""Audit what sites spent and plan what they will spend; returns data (`fedbrats privacy` prints it).

The audit reads each site's ledger (a run folder holds ``sites/<name>/privacy_ledger.sqlite`` for
simulated sites; a site folder or a single ledger file works too) and checks it three ways:

- as evidence: the hash chain, every row's hash and signature, the site key, rows deleted at the end
  (`PrivacyLedger.verify`), and each round against its run's plan (same sigma and q, no more steps);
- against the server: every round the run's ``history.jsonl`` recorded the site training under DP
  must be in the ledger, with the epsilon, row, row hash and key the site reported that round; fewer
  ledger rows of the run than rounds the server recorded is a failure (rows deleted or table emptied);
- as arithmetic: every recorded epsilon is recomputed from the recorded history with the site's own
  accountant (Opacus) and with an independent one (Google's ``dp_accounting``, public API only).

A site that went over its budget or any failed check makes the audit fail; each problem names the
site, the row (or the server round) and what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbrats.client.accounting import epsilon_for, independent_epsilons
from fedbrats.client.ledger import FILENAME, LedgerError, LedgerRow, PrivacyLedger
from fedbrats.client.site_key import key_id

__all__ = [
    "HISTORY", "RoundCheck", "RunAudit", "SiteAudit", "audit_ledger", "audit_run", "find_history", "find_ledgers",
    "plan_rows", "server_rounds",
]  # fmt: skip

HISTORY = "history.jsonl"
#: Relative tolerance between the recorded epsilon and the same accountant recomputing it.
TOLERANCE = 1e-3
#: Relative tolerance against the independent accountant (RDP orders and PRV/PLD discretisations differ).
INDEPENDENT_TOLERANCE = 0.03
#: What the site reported is stored as JSON floats: equal to what the ledger holds, up to rounding.
REPORTED_TOLERANCE = 1e-9


@dataclass
class RoundCheck:
    row: LedgerRow
    total_steps: int
    recomputed: float
    independent: float
    budget: float
    problems: list[str] = field(default_factory=list)


@dataclass
class SiteAudit:
    site: str
    path: Path
    rounds: list[RoundCheck]
    budget: float | None
    problems: list[str] = field(default_factory=list)  # ledger-level: "row N: ...", "server round R: ..."
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure
    key_fingerprint: str = ""
    server_rounds: int | None = None  # DP rounds the server recorded for the site (None: no history)

    @property
    def epsilon(self) -> float:
        return self.rounds[-1].row.epsilon if self.rounds else 0.0

    @property
    def exceeded(self) -> bool:
        return any(c.row.epsilon > c.budget for c in self.rounds)

    @property
    def consistent(self) -> bool:
        return not self.problems and not any(c.problems for c in self.rounds)

    def failures(self) -> list[str]:
        """Every problem as "site S: row N: what", in ledger order."""
        found = [*self.problems, *(f"row {c.row.seq}: {p}" for c in self.rounds for p in c.problems)]
        found += [f"row {c.row.seq}: epsilon {c.row.epsilon:.4f} exceeds the budget {c.budget:g}"
                  for c in self.rounds if c.row.epsilon > c.budget]  # fmt: skip
        return [f"site {self.site}: {p}" for p in found]


@dataclass
class RunAudit:
    sites: list[SiteAudit]
    history: Path | None
    problems: list[str] = field(default_factory=list)  # e.g. a site the server saw train with no ledger

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.consistent and not s.exceeded for s in self.sites)

    def failures(self) -> list[str]:
        return [*self.problems, *(f for s in self.sites for f in s.failures())]


# --- finding ledgers and the server's record ---------------------------------------------------


def find_ledgers(path: Path) -> dict[str, Path]:
    """{site name: ledger} under a run folder, a site folder, or a single ledger file."""
    path = Path(path)
    if path.is_file():
        return {path.parent.name or path.stem: path}
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist; expected a run folder, a site folder or a {FILENAME}"
        )
    found = {p.parent.name: p for p in sorted(path.glob(f"sites/*/{FILENAME}"))}
    if (path / FILENAME).is_file():
        found[path.name] = path / FILENAME
    if not found:
        raise FileNotFoundError(
            f"no privacy ledger in {path}: expected {path}/sites/<site>/{FILENAME} or {path}/{FILENAME}"
        )
    return found


def find_history(path: Path) -> Path | None:
    """The run's history beside a run folder, or above ``RUN_DIR/sites/<site>[/ledger]``; None when absent."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    for candidate in (folder, folder.parent.parent):
        if (candidate / HISTORY).is_file() and (candidate == folder or folder.parent.name == "sites"):
            return candidate / HISTORY
    return None


def server_rounds(history: Path) -> list[tuple[int, dict[str, Any]]]:
    """(round, train entry) for every site the server recorded training under DP (the entry has "epsilon")."""
    out = []
    for number, line in enumerate(Path(history).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line: that round was never completed
        if isinstance(record, dict) and "event" in record:
            continue  # an event line (server.history.EVENT: a warm start, a resume override): no round
        if not isinstance(record, dict) or not isinstance(record.get("train"), list):
            raise ValueError(f"{history} line {number}: expected a round record with a 'train' list")
        out += [(int(record["round"]), e) for e in record["train"] if isinstance(e, dict) and "epsilon" in e]
    return out


# --- checking one ledger ---------------------------------------------------------------------------


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _check_plans(ledger: PrivacyLedger, rows: Sequence[LedgerRow]) -> dict[int, list[str]]:
    """Row seq -> how it departs from its run's plan (other sigma or q, more steps than planned)."""
    plans = {p.row_hash: p for p in ledger.plans()}
    problems: dict[int, list[str]] = {}
    spent: dict[str, int] = {}
    for row in rows:
        plan = plans.get(row.plan_hash)
        if plan is None:
            continue  # a missing plan is a chain problem, reported by verify()
        found = problems.setdefault(row.seq, [])
        if (row.noise_multiplier, row.sample_rate) != (plan.noise_multiplier, plan.sample_rate):
            found.append(f"sigma {row.noise_multiplier:.4f}, q {row.sample_rate:.4f} differ from the run's plan "
                         f"({plan.noise_multiplier:.4f}, {plan.sample_rate:.4f})")  # fmt: skip
        spent[row.run_id] = spent.get(row.run_id, 0) + row.steps
        if row.steps > plan.round_steps or spent[row.run_id] > plan.total_steps:
            found.append(f"{row.steps} steps ({spent[row.run_id]} in the run) exceed the plan's {plan.round_steps} "
                         f"per round ({plan.total_steps} in all)")  # fmt: skip
    return problems


def _check_server(
    audit: SiteAudit, rows: Sequence[LedgerRow], reported: Sequence[tuple[int, dict]], fingerprint: str
):
    """Each DP round the server recorded for the site must be in the ledger, as the site reported it."""
    by_seq = {r.seq: r for r in rows}
    matched: list[LedgerRow] = []
    for rnd, entry in reported:
        where = f"server round {rnd}"
        eps = float(entry["epsilon"])
        if "ledger-row" in entry:
            seq = int(entry["ledger-row"])
            row = by_seq.get(seq)
            if row is None:
                audit.problems.append(f"{where}: the site reported ledger row {seq}, which the ledger does not hold "
                                      "(rows deleted or the table emptied)")  # fmt: skip
                continue
            if row.round != rnd:
                audit.problems.append(
                    f"row {seq}: records round {row.round}; the site reported it for round {rnd}"
                )
            if "ledger-head" in entry and key_id(row.row_hash) != int(entry["ledger-head"]):
                audit.problems.append(
                    f"row {seq}: is not the row the site reported in round {rnd} (its hash differs)"
                )
            if "ledger-key" in entry and fingerprint and key_id(fingerprint) != int(entry["ledger-key"]):
                audit.problems.append(f"row {seq}: the ledger's key {fingerprint[:12]} is not the key the site "
                                      f"reported in round {rnd} ({int(entry['ledger-key']):012x})")  # fmt: skip
        else:  # a site that reports no row number: match by round and epsilon
            row = next(
                (r for r in rows if r.round == rnd and _relative(r.epsilon, eps) <= REPORTED_TOLERANCE), None
            )
            if row is None:
                audit.problems.append(f"{where}: the site reported epsilon {eps:.6g}; no ledger row of round {rnd} "
                                      "records it (rows deleted or rewritten)")  # fmt: skip
                continue
        if _relative(row.epsilon, eps) > REPORTED_TOLERANCE:
            audit.problems.append(f"row {row.seq}: epsilon {row.epsilon:.6g}, but the site reported {eps:.6g} to the "
                                  f"server in round {rnd} (rewritten)")  # fmt: skip
        matched.append(row)
    runs = {r.run_id for r in matched}
    of_run = [r for r in rows if r.run_id in runs]
    audit.server_rounds = len(reported)
    if len(of_run) < len(reported):
        audit.problems.append(f"ledger: the server recorded {len(reported)} DP rounds for this site, the ledger "
                              f"holds {len(of_run)} rows of the run")  # fmt: skip
    elif len(of_run) > len(reported):
        audit.notes.append(f"{len(of_run) - len(reported)} round(s) spent at the site never reached the server's "
                           "history (lost replies or a resumed run): counted, as they were spent")  # fmt: skip


def audit_ledger(
    path: Path, *, site: str | None = None, budget: float | None = None,
    reported: Sequence[tuple[int, dict[str, Any]]] | None = None,
) -> SiteAudit:  # fmt: skip
    """Verify and recompute one ledger; `budget` overrides the recorded budget; `reported` are the
    (round, train entry) pairs the server recorded for this site (None: no server history to check)."""
    ledger = PrivacyLedger.open_existing(path)
    rows = ledger.rows()
    audit = SiteAudit(site or Path(path).parent.name, Path(path), [], budget)
    fingerprint = ledger.meta().get("key_fingerprint", "")
    audit.key_fingerprint = fingerprint
    try:
        audit.problems += [f"{where}: {what}" for where, what in ledger.verify()]
    except (LedgerError, ValueError) as err:
        audit.problems.append(f"ledger: cannot be verified: {err}")
    if reported is not None:
        _check_server(audit, rows, reported, fingerprint)
    if not rows:
        return audit
    if audit.budget is None:
        audit.budget = rows[-1].budget
    for previous, row in zip(rows, rows[1:], strict=False):
        if row.seq != previous.seq + 1:
            audit.problems.append(
                f"rows {previous.seq + 1}..{row.seq - 1} are missing (row ids jump {previous.seq} -> {row.seq})"
            )
    if rows[0].seq != 1:
        audit.problems.append(f"rows 1..{rows[0].seq - 1} are missing (the first row id is {rows[0].seq})")
    off_plan = _check_plans(ledger, rows)
    independent = independent_epsilons(
        [(r.noise_multiplier, r.sample_rate, r.steps, r.delta, r.accountant) for r in rows]
    )
    last_round: dict[str, int] = {}
    total = 0
    for i, row in enumerate(rows):
        total += row.steps
        recomputed = epsilon_for([r.history_entry for r in rows[: i + 1]], row.delta, row.accountant)
        check = RoundCheck(row, total, recomputed, independent[i], row.budget if budget is None else budget)
        if row.run_id in last_round and row.round <= last_round[row.run_id]:
            kind = "repeated" if row.round == last_round[row.run_id] else "out of order"
            check.problems.append(f"round {row.round} of run {row.run_id!r} {kind}")
        last_round[row.run_id] = row.round
        if i and row.delta == rows[i - 1].delta and row.epsilon < rows[i - 1].epsilon:
            check.problems.append(f"epsilon decreased ({rows[i - 1].epsilon:.4f} -> {row.epsilon:.4f})")
        if _relative(row.epsilon, check.recomputed) > TOLERANCE:
            check.problems.append(
                f"recorded epsilon {row.epsilon:.4f} but the history gives {check.recomputed:.4f}"
            )
        if _relative(row.epsilon, check.independent) > INDEPENDENT_TOLERANCE:
            check.problems.append(f"independent accountant gives {check.independent:.4f}")
        if not (
            row.noise_multiplier > 0 and 0 < row.sample_rate <= 1 and row.steps >= 1 and 0 < row.delta < 1
        ):
            check.problems.append("impossible values (sigma, q, steps or delta)")
        check.problems += off_plan.get(row.seq, [])
        audit.rounds.append(check)
    return audit


def audit_run(path: Path, *, budget: float | None = None, history: Path | None = None) -> RunAudit:
    """Audit every ledger under `path` against the run's history (found beside it unless given)."""
    ledgers = find_ledgers(Path(path))
    history = Path(history) if history else find_history(Path(path))
    reported = server_rounds(history) if history else None
    sites, claimed = [], set()
    for name, ledger_path in ledgers.items():
        mine = None
        if reported is not None:
            try:
                fingerprint = PrivacyLedger.open_existing(ledger_path).meta().get("key_fingerprint", "")
            except LedgerError:
                fingerprint = ""
            ids = {key_id(fingerprint)} if fingerprint else set()
            mine = [(r, e) for r, e in reported if e.get("site") == name or e.get("ledger-key") in ids]
            claimed |= {str(e.get("site")) for _, e in mine}
        sites.append(audit_ledger(ledger_path, site=name, budget=budget, reported=mine))
    run = RunAudit(sites, history)
    if (
        reported is not None and Path(path).is_dir() and not (Path(path) / FILENAME).is_file()
    ):  # a whole run folder
        for name in sorted({str(e.get("site")) for _, e in reported} - claimed):
            count = sum(1 for _, e in reported if str(e.get("site")) == name)
            run.problems.append(f"site {name}: the server recorded {count} DP round(s), but {path} holds no "
                                "ledger for it (deleted?)")  # fmt: skip
    return run


# --- planning ---------------------------------------------------------------------------------


def plan_rows(
    cases: int, batch: int, rounds: int, local_epochs: int, epsilon: float, delta: float | None = None, *,
    local_steps: int = 0, accountant: str = "rdp",
) -> list[tuple[str, str]]:  # fmt: skip
    """(setting, value) rows of the noise a site needs to stay within `epsilon` over `rounds` rounds."""
    from fedbrats.client.privacy_plan import DPConfig, plan_privacy

    dp = DPConfig(epsilon=epsilon, delta=delta or 0.0, planned_rounds=rounds, accountant=accountant)
    plan = plan_privacy(cases, batch, dp, epochs=local_epochs, steps=local_steps or None)
    after = plan.epsilon_after([plan.entry] * (rounds - 1))
    if not math.isfinite(after):
        raise ValueError(f"epsilon after {rounds} rounds is not finite; check the settings")
    return [
        ("sample rate q = batch / cases", f"{plan.sample_rate:.4f}"),
        ("steps per round", str(plan.steps)),
        ("rounds", str(rounds)),
        ("total steps", str(plan.total_steps)),
        ("delta" + ("" if delta else " (min(1e-5, 0.1 / cases))"), f"{plan.delta:.2g}"),
        ("target epsilon", f"{epsilon:g}"),
        ("noise multiplier sigma", f"{plan.noise_multiplier:.4f}"),
        ("epsilon after round 1", f"{plan.epsilon_after():.4f}"),
        (f"epsilon after round {rounds} ({accountant})", f"{after:.4f}"),
    ]
