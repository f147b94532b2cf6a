"""The site's privacy ledger: one SQLite row per round the site trained in, on the site's own disk.

Flower rebuilds the client every round, and in deployment every message is a fresh process, so an
accountant held in memory forgets earlier rounds (the bug in Flower's Opacus example: each round
reports one round's epsilon). The ledger is the accountant's memory: its rows are the accountant
`history` (noise multiplier, sample rate, steps), restored before training so epsilon composes over
every round the site ever trained, across rounds, runs and restarts. A round the site skipped has
no row and costs nothing.

Each write is one SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): a process killed
mid-round leaves the ledger as it was before the round, never half written. Row ids come from
AUTOINCREMENT, so a deleted row leaves a gap that `fedbrats privacy audit` reports.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

__all__ = [
    "ACCOUNTANTS", "FILENAME", "History", "LedgerError", "LedgerRow", "PrivacyLedger", "epsilon_for",
    "make_accountant", "merge_history",
]  # fmt: skip

FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = 1
#: Opacus accountants we record with: RDP (fast, conservative) and PRV (tighter, slower).
ACCOUNTANTS = ("rdp", "prv")
#: Opacus accountant history: (noise multiplier, sample rate, steps) per entry.
History = list[tuple[float, float, int]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 1),
    epsilon REAL NOT NULL,
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL,
    budget REAL NOT NULL,
    max_grad_norm REAL NOT NULL,
    n_cases INTEGER NOT NULL,
    timestamp TEXT NOT NULL,
    UNIQUE (run_id, round)
);
"""


class LedgerError(RuntimeError):
    """The ledger cannot be read or would be made inconsistent; the message names the file."""


@dataclass(frozen=True)
class LedgerRow:
    """One round the site trained in; `epsilon` is the total over all rows up to and including it."""

    seq: int
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    accountant: str
    budget: float
    max_grad_norm: float
    n_cases: int
    timestamp: str

    @property
    def history_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


_COLUMNS = [f.name for f in fields(LedgerRow)]


def make_accountant(name: str, history: Iterable[tuple[float, float, int]] = ()):
    """An Opacus accountant ("rdp" or "prv") whose history is `history`."""
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; expected one of {ACCOUNTANTS}")
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def epsilon_for(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after every step in `history` (0 for an empty history)."""
    if not history:
        return 0.0
    merged = merge_history(history)
    if accountant == "rdp":  # what RDPAccountant.get_epsilon computes, with each (q, sigma) curve computed once
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(steps * np.asarray(_rdp_one_step(q, sigma)) for sigma, q, steps in merged)
        return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
    return float(make_accountant(accountant, merged).get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _rdp_one_step(q: float, sigma: float) -> tuple[float, ...]:
    """RDP of one step of the subsampled Gaussian at Opacus' orders (RDP is linear in the steps)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def merge_history(history: Iterable[tuple[float, float, int]]) -> History:
    """Consecutive entries with the same (sigma, q) summed into one: the same epsilon, computed once."""
    merged: History = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


class PrivacyLedger:
    """The SQLite ledger at `path` (created with its schema on first use)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a folder; expected the ledger file ({FILENAME})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit early
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @classmethod
    def at(cls, work_dir: Path | str) -> PrivacyLedger:
        """The ledger of the site whose folder is `work_dir`."""
        return cls(Path(work_dir) / FILENAME)

    @classmethod
    def open_existing(cls, path: Path | str) -> PrivacyLedger:
        """Open a ledger that must already exist (the audit never creates one)."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no privacy ledger at {path}")
        ledger = cls.__new__(cls)
        ledger.path = path
        ledger.rows()  # fail now, naming the file, if it is not a ledger
        return ledger

    @contextmanager
    def _transaction(self):
        try:
            with closing(sqlite3.connect(self.path, timeout=30.0, isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable or locked: {err}") from err

    # ------------------------------------------------------------------ reading

    def rows(self) -> list[LedgerRow]:
        """Every row, in the order written."""
        try:
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)) as conn:
                found = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM rounds ORDER BY seq").fetchall()
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path} is not a readable privacy ledger: {err}") from err
        return [LedgerRow(*row) for row in found]

    def history(self) -> History:
        """The accountant history to restore before training."""
        return [row.history_entry for row in self.rows()]

    def has_round(self, run_id: str, round: int) -> bool:
        return any(r.run_id == str(run_id) and r.round == int(round) for r in self.rows())

    def epsilon(self) -> float:
        """Epsilon recorded after the last round (0 when the site never trained)."""
        rows = self.rows()
        return rows[-1].epsilon if rows else 0.0

    # ------------------------------------------------------------------ writing

    def record(
        self,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        epsilon: float,
        delta: float,
        accountant: str,
        budget: float,
        max_grad_norm: float,
        n_cases: int,
    ) -> LedgerRow:
        """Append the round in one transaction; a round already in the ledger for this run is an error."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        values = (str(run_id), int(round), float(noise_multiplier), float(sample_rate), int(steps), float(epsilon),
                  float(delta), str(accountant), float(budget), float(max_grad_norm), int(n_cases), stamp)  # fmt: skip
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM rounds WHERE run_id = ? AND round = ?", values[:2]).fetchone():
                raise LedgerError(f"{self.path}: round {round} of run {run_id!r} is already recorded")
            cursor = conn.execute(
                f"INSERT INTO rounds ({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * len(values))})", values
            )
            seq = int(cursor.lastrowid)
        return LedgerRow(seq, *values)

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"
