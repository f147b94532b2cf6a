"""The site's privacy ledger: SQLite on the site's own disk, one row per round trained, chained and signed.

Flower rebuilds the client every round, and in deployment every message is a fresh process, so an
accountant held in memory forgets earlier rounds (the bug in Flower's Opacus example). The ledger is
the accountant's memory: its rows are the accountant history (sigma, sample rate, steps), restored
before training so epsilon composes over every round the site ever trained, across runs and
restarts. A round the site skipped has no row and costs nothing. Each run's privacy plan (sigma
calibrated once, the steps it was calibrated for) is kept too, so every round of a run reuses it.

A ledger is evidence only if a later edit is detectable (DESIGN section 10). Each round row holds the
hash of the previous row (``prev_hash``; the first row's is derived from the site's key), its own hash
over a canonical serialisation of every field (``row_hash``) and the site key's signature of that hash;
a plan row is hashed and signed the same way, and each round row names the hash of its run's plan. The
public key is stored in ``meta``. `verify` finds a rewritten, reordered, deleted or foreign-signed row;
rows deleted at the end are found against what the site reported to the server (`fedbrats.client.audit`).

Each write is one SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): a process killed mid-round
leaves the ledger as it was before the round, never half written.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from fedbrats.client.accounting import History
from fedbrats.client.site_key import (
    KEY_FILENAME,
    SiteKey,
    ledger_folder,
    public_fingerprint,
    verify_signature,
)

__all__ = ["FILENAME", "LedgerError", "LedgerRow", "PlanRow", "PrivacyLedger", "genesis_hash", "row_hash"]

FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = 2
_CHAIN = ("key_fingerprint", "prev_hash", "row_hash", "signature")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    round_steps INTEGER NOT NULL CHECK (round_steps >= 1),
    rounds INTEGER NOT NULL CHECK (rounds >= 1),
    total_steps INTEGER NOT NULL,
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL,
    target_epsilon REAL NOT NULL,
    spent_before REAL NOT NULL,
    budget REAL NOT NULL,
    n_cases INTEGER NOT NULL,
    timestamp TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL, prev_hash TEXT NOT NULL, row_hash TEXT NOT NULL, signature TEXT NOT NULL
);
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
    plan_hash TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL, prev_hash TEXT NOT NULL, row_hash TEXT NOT NULL, signature TEXT NOT NULL,
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
    plan_hash: str
    key_fingerprint: str
    prev_hash: str
    row_hash: str
    signature: str

    @property
    def history_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class PlanRow:
    """A run's privacy plan at this site: sigma calibrated once against the budget left, and what it covers."""

    seq: int
    run_id: str
    noise_multiplier: float
    sample_rate: float
    round_steps: int  # the most steps one round of the run may take
    rounds: int
    total_steps: int  # what sigma was calibrated for: round_steps x rounds
    delta: float
    accountant: str
    target_epsilon: float  # total epsilon the plan aims at (0: sigma was given, not calibrated)
    spent_before: float  # epsilon spent by earlier runs when the plan was made
    budget: float
    n_cases: int
    timestamp: str
    key_fingerprint: str
    prev_hash: str
    row_hash: str
    signature: str


_ROUND_COLUMNS = [f.name for f in fields(LedgerRow)]
_PLAN_COLUMNS = [f.name for f in fields(PlanRow)]


def genesis_hash(fingerprint: str) -> str:
    """The `prev_hash` of a ledger's first row: binds the chain to the site's key."""
    return hashlib.sha256(f"fedbrats-ledger-genesis:{fingerprint}".encode()).hexdigest()


def row_hash(row: LedgerRow | PlanRow) -> str:
    """SHA-256 of the row's canonical serialisation (every field but its hash and signature, sorted JSON)."""
    values = {k: v for k, v in asdict(row).items() if k not in ("row_hash", "signature")}
    kind = "plan" if isinstance(row, PlanRow) else "round"
    text = json.dumps({"kind": kind, **values}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _typed(cls, values, path: Path) -> LedgerRow | PlanRow:
    """A row with each value in its field's type, so a REAL read back as 1.0 hashes like the 1.0 written."""
    kinds = {"int": int, "float": float, "str": str}
    try:
        return cls(*(kinds[f.type](v) for f, v in zip(fields(cls), values, strict=True)))
    except (TypeError, ValueError) as err:
        raise LedgerError(f"{path}: a {'plan' if cls is PlanRow else 'round'} row with id {values[0]} holds a value "
                          f"of the wrong type ({err}): the table was edited outside FedBraTS") from err  # fmt: skip


class PrivacyLedger:
    """The SQLite ledger at `path` (created with its schema on first use).

    `key` signs what is written; by default it is ``site_key.pem`` beside the ledger, generated once.
    Reading never needs the key.
    """

    def __init__(self, path: Path | str, key: SiteKey | None = None):
        self.path = Path(path)
        self._key = key
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a folder; expected the ledger file ({FILENAME})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit early
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if found != str(SCHEMA_VERSION):
            raise LedgerError(f"{self.path} has ledger schema {found}, this FedBraTS writes {SCHEMA_VERSION}: "
                              "an unsigned ledger cannot be continued; audit it, then keep it aside")  # fmt: skip

    @classmethod
    def at(cls, folder: Path | str, key: SiteKey | None = None) -> PrivacyLedger:
        """The ledger in `folder` (see `fedbrats.client.site_key.ledger_folder` for which folder a site uses)."""
        return cls(Path(folder) / FILENAME, key)

    @classmethod
    def for_site(cls, node_config: dict, site_name: str, work_dir: Path | str) -> PrivacyLedger:
        """The ledger of a site, found from its identity (node config ``ledger-dir``, ``ledger-key``, its name),
        not from its work folder: the rule is in `fedbrats.client.site_key`."""
        folder, key = ledger_folder(node_config, site_name, Path(work_dir))
        return cls.at(folder, key)

    @classmethod
    def open_existing(cls, path: Path | str) -> PrivacyLedger:
        """Open a ledger that must already exist, read-only (the audit never creates or signs)."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no privacy ledger at {path}")
        ledger = cls.__new__(cls)
        ledger.path, ledger._key = path, None
        ledger.rows()  # fail now, naming the file, if it is not a ledger
        return ledger

    @property
    def key(self) -> SiteKey:
        if self._key is None:
            self._key = SiteKey.load_or_create(self.path.parent / KEY_FILENAME)
        return self._key

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

    def _select(self, sql: str) -> list[tuple]:
        try:
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)) as conn:
                return conn.execute(sql).fetchall()
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path} is not a readable privacy ledger: {err}") from err

    def rows(self) -> list[LedgerRow]:
        """Every round row, in the order written."""
        return [
            _typed(LedgerRow, r, self.path)
            for r in self._select(f"SELECT {', '.join(_ROUND_COLUMNS)} FROM rounds ORDER BY seq")
        ]

    def plans(self) -> list[PlanRow]:
        """Every run's plan, in the order made."""
        return [
            _typed(PlanRow, r, self.path)
            for r in self._select(f"SELECT {', '.join(_PLAN_COLUMNS)} FROM plans ORDER BY seq")
        ]

    def meta(self) -> dict[str, str]:
        return dict(self._select("SELECT key, value FROM meta"))

    def rows_written(self) -> int:
        """Round rows ever inserted, as SQLite's AUTOINCREMENT counter remembers them (deleted ones included)."""
        found = self._select("SELECT seq FROM sqlite_sequence WHERE name = 'rounds'")
        return int(found[0][0]) if found else 0

    def plan_for(self, run_id: str) -> PlanRow | None:
        return next((p for p in self.plans() if p.run_id == str(run_id)), None)

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

    def _bind_key(self, conn: sqlite3.Connection) -> str:
        """The key's fingerprint, stored with its public key on first write; another key is refused."""
        fingerprint = self.key.fingerprint
        found = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "key_fingerprint" not in found:
            conn.execute("INSERT INTO meta VALUES ('public_key', ?)", (self.key.public_pem,))
            conn.execute("INSERT INTO meta VALUES ('key_fingerprint', ?)", (fingerprint,))
        elif found["key_fingerprint"] != fingerprint:
            raise LedgerError(f"{self.path} is signed by key {found['key_fingerprint'][:16]}, not by this site's key "
                              f"{fingerprint[:16]} ({self.key.path}); a ledger cannot change hands")  # fmt: skip
        return fingerprint

    def _append(
        self, conn: sqlite3.Connection, cls, table: str, columns: list[str], values: dict
    ) -> LedgerRow | PlanRow:
        fingerprint = self._bind_key(conn)
        last = conn.execute(f"SELECT row_hash FROM {table} ORDER BY seq DESC LIMIT 1").fetchone()
        (seq,) = conn.execute(  # what AUTOINCREMENT would give: never a number used before
            f"SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?), 0), "
            f"COALESCE((SELECT MAX(seq) FROM {table}), 0)) + 1",
            (table,),
        ).fetchone()
        row = cls(seq=int(seq), **values, key_fingerprint=fingerprint,
                  prev_hash=last[0] if last else genesis_hash(fingerprint), row_hash="", signature="")  # fmt: skip
        digest = row_hash(row)
        row = cls(**{**asdict(row), "row_hash": digest, "signature": self.key.sign(digest.encode()).hex()})
        conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     tuple(getattr(row, c) for c in columns))  # fmt: skip
        return row

    def record(
        self, *, run_id: str, round: int, noise_multiplier: float, sample_rate: float, steps: int, epsilon: float,
        delta: float, accountant: str, budget: float, max_grad_norm: float, n_cases: int, plan_hash: str = "",
    ) -> LedgerRow:  # fmt: skip
        """Append the round in one transaction, chained and signed; a round already recorded for this run is an error."""
        values = dict(run_id=str(run_id), round=int(round), noise_multiplier=float(noise_multiplier),
                      sample_rate=float(sample_rate), steps=int(steps), epsilon=float(epsilon), delta=float(delta),
                      accountant=str(accountant), budget=float(budget), max_grad_norm=float(max_grad_norm),
                      n_cases=int(n_cases), timestamp=_now(), plan_hash=str(plan_hash))  # fmt: skip
        with self._transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM rounds WHERE run_id = ? AND round = ?", (str(run_id), int(round))
            ).fetchone():
                raise LedgerError(f"{self.path}: round {round} of run {run_id!r} is already recorded")
            return self._append(conn, LedgerRow, "rounds", _ROUND_COLUMNS, values)

    def record_plan(
        self, *, run_id: str, noise_multiplier: float, sample_rate: float, round_steps: int, rounds: int, delta: float,
        accountant: str, target_epsilon: float, spent_before: float, budget: float, n_cases: int,
    ) -> PlanRow:  # fmt: skip
        """Store a run's plan once; a run that already has one keeps it (and gets it back)."""
        values = dict(run_id=str(run_id), noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate),
                      round_steps=int(round_steps), rounds=int(rounds), total_steps=int(round_steps) * int(rounds),
                      delta=float(delta), accountant=str(accountant), target_epsilon=float(target_epsilon),
                      spent_before=float(spent_before), budget=float(budget), n_cases=int(n_cases),
                      timestamp=_now())  # fmt: skip
        with self._transaction() as conn:
            found = conn.execute(
                f"SELECT {', '.join(_PLAN_COLUMNS)} FROM plans WHERE run_id = ?", (str(run_id),)
            ).fetchone()
            if found:
                return _typed(PlanRow, found, self.path)
            return self._append(conn, PlanRow, "plans", _PLAN_COLUMNS, values)

    # ------------------------------------------------------------------ checking

    def verify(self) -> list[tuple[str, str]]:
        """(where, what is wrong) for every break in the chains, hashes, signatures and keys; [] when intact.

        `where` is "row N", "plan N" or "ledger". Rows deleted at the end of a chain leave it intact:
        they are found by `rows_written` here, and against the server's history by the audit.
        """
        meta, rows, plans = self.meta(), self.rows(), self.plans()
        problems: list[tuple[str, str]] = []
        public, fingerprint = meta.get("public_key"), meta.get("key_fingerprint")
        if (rows or plans) and not (public and fingerprint):
            return [("ledger", "has rows but no public key in meta: the rows cannot be verified")]
        try:
            if public and public_fingerprint(public) != fingerprint:
                problems.append(("ledger", "the public key in meta does not match its recorded fingerprint"))
        except ValueError:
            problems.append(("ledger", "the public key in meta is not a PEM public key"))
        key_file = self.path.parent / KEY_FILENAME
        if fingerprint and key_file.is_file():
            try:
                beside = SiteKey.load(key_file).fingerprint
            except Exception as err:  # noqa: BLE001 - any unreadable key file is reported, not raised
                problems.append(("ledger", f"the key file beside it cannot be read: {err}"))
            else:
                if beside != fingerprint:
                    problems.append(("ledger", f"the key beside it ({beside[:16]}) is not the key in meta "
                                               f"({fingerprint[:16]})"))  # fmt: skip
        plan_hashes = {p.row_hash for p in plans}
        for kind, chain in (("plan", plans), ("row", rows)):
            previous = genesis_hash(fingerprint or "")
            for item in chain:
                where = f"{kind} {item.seq}"
                if item.key_fingerprint != fingerprint:
                    problems.append((where, f"names key {item.key_fingerprint[:16]}, the ledger's key is "
                                            f"{(fingerprint or '')[:16]}"))  # fmt: skip
                if item.prev_hash != previous:
                    problems.append((where, "does not follow the previous row (chain broken: a row before it was "
                                            "deleted, inserted, reordered or rewritten)"))  # fmt: skip
                if row_hash(item) != item.row_hash:
                    problems.append((where, "its contents do not match its hash (rewritten after signing)"))
                elif not _signature_ok(public, item):
                    problems.append((where, "its signature does not verify with the ledger's key"))
                if kind == "row" and item.plan_hash and item.plan_hash not in plan_hashes:
                    problems.append(
                        (where, f"names plan {item.plan_hash[:12]}, which the ledger does not hold")
                    )
                previous = item.row_hash
        written = self.rows_written()
        if written > (rows[-1].seq if rows else 0):
            problems.append(("ledger", f"{written} round rows were written, the last one left is "
                                       f"{rows[-1].seq if rows else 'none'}: rows at the end were deleted"))  # fmt: skip
        return problems

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"


def _signature_ok(public: str | None, item: LedgerRow | PlanRow) -> bool:
    try:
        signature = bytes.fromhex(item.signature)
    except ValueError:
        return False
    return bool(public) and verify_signature(public, signature, item.row_hash.encode())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
