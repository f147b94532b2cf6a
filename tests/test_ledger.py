"""Privacy ledger (SQLite at the site) and the audit / plan commands."""

from __future__ import annotations

import sqlite3

import pytest

from fedbrats.client.audit import audit_ledger, find_ledgers, independent_epsilons, run_audit, run_plan
from fedbrats.client.ledger import FILENAME, LedgerError, PrivacyLedger, epsilon_for

SIGMA, Q, STEPS, DELTA = 1.3, 0.1, 10, 1e-5


def _fill(ledger: PrivacyLedger, rounds: int, *, budget: float = 50.0, run_id: str = "7", accountant: str = "rdp"):
    history = ledger.history()
    for r in range(1, rounds + 1):
        history.append((SIGMA, Q, STEPS))
        ledger.record(run_id=run_id, round=r, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS,
                      epsilon=epsilon_for(history, DELTA, accountant), delta=DELTA, accountant=accountant,
                      budget=budget, max_grad_norm=1.0, n_cases=10)  # fmt: skip
    return ledger


def test_rows_round_trip_and_restore_the_accountant_history(tmp_path):
    ledger = _fill(PrivacyLedger.at(tmp_path / "site"), 3)
    assert (tmp_path / "site" / FILENAME).is_file()
    again = PrivacyLedger.at(tmp_path / "site")  # a new process would do exactly this
    rows = again.rows()
    assert [r.seq for r in rows] == [1, 2, 3] and [r.round for r in rows] == [1, 2, 3]
    assert again.history() == [(SIGMA, Q, STEPS)] * 3
    assert rows[-1].epsilon == pytest.approx(epsilon_for([(SIGMA, Q, 3 * STEPS)], DELTA))  # composes like one shot
    assert rows[0].epsilon < rows[1].epsilon < rows[2].epsilon
    assert again.epsilon() == rows[-1].epsilon and ledger.has_round("7", 2) and not ledger.has_round("8", 2)


def test_a_recorded_round_cannot_be_recorded_twice_and_the_failed_write_changes_nothing(tmp_path):
    ledger = _fill(PrivacyLedger.at(tmp_path), 2)
    with pytest.raises(LedgerError, match="round 1 of run '7' is already recorded"):
        _fill(ledger, 2)  # round 1 again: refused inside the transaction
    assert len(ledger.rows()) == 2
    _fill(ledger, 1, run_id="8")  # another run may reuse round numbers
    assert [r.run_id for r in ledger.rows()] == ["7", "7", "8"]


def test_unreadable_or_missing_ledgers_are_named(tmp_path):
    with pytest.raises(LedgerError, match="no privacy ledger at"):
        PrivacyLedger.open_existing(tmp_path / "missing.sqlite")
    garbage = tmp_path / FILENAME
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match=FILENAME):
        PrivacyLedger.open_existing(garbage)
    with pytest.raises(LedgerError, match="is a folder"):
        PrivacyLedger(tmp_path)


def test_independent_accountant_agrees_with_opacus(tmp_path):
    rows = _fill(PrivacyLedger.at(tmp_path), 3).rows()
    for row, independent in zip(rows, independent_epsilons(rows), strict=True):
        assert independent == pytest.approx(row.epsilon, rel=0.01)


def _sites(tmp_path, *, budget=50.0):
    for name in ("A", "B"):
        _fill(PrivacyLedger.at(tmp_path / "sites" / name), 3, budget=budget)
    return tmp_path


def test_audit_passes_a_good_run_and_draws_epsilon(tmp_path, capsys):
    run = _sites(tmp_path)
    assert set(find_ledgers(run)) == {"A", "B"}
    assert run_audit(run, out_png=tmp_path / "eps.png") == 0
    assert (tmp_path / "eps.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "privacy budget per site" in out and "ledger inconsistent" not in out
    assert run_audit(run / "sites" / "A" / FILENAME) == 0  # a single ledger file works too


def test_audit_fails_over_budget(tmp_path):
    run = _sites(tmp_path)
    assert run_audit(run, budget=2.0) == 1  # the override
    assert audit_ledger(run / "sites" / "A" / FILENAME, budget=2.0).exceeded


def _tamper(path, sql):
    with sqlite3.connect(path) as conn:
        conn.execute(sql)


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("UPDATE rounds SET epsilon = epsilon * 0.5 WHERE seq = 3", "the history gives"),
        ("UPDATE rounds SET steps = 1 WHERE seq = 2", "the history gives"),
        ("DELETE FROM rounds WHERE seq = 2", "missing"),
        ("UPDATE rounds SET round = 2 WHERE seq = 3", "repeated"),
    ],
)
def test_audit_fails_a_tampered_ledger(tmp_path, sql, problem):
    run = _sites(tmp_path)
    path = run / "sites" / "B" / FILENAME
    if "round = 2" in sql:  # the UNIQUE constraint forbids a duplicate: rebuild the table without it
        _tamper(path, "CREATE TABLE r2 AS SELECT * FROM rounds")
        _tamper(path, "DROP TABLE rounds")
        _tamper(path, "ALTER TABLE r2 RENAME TO rounds")
    _tamper(path, sql)
    audit = audit_ledger(path)
    found = audit.problems + [p for c in audit.rounds for p in c.problems]
    assert any(problem in p for p in found), found
    assert not audit.consistent
    assert run_audit(run) == 1
    assert run_audit(run / "sites" / "A" / FILENAME) == 0


def test_audit_needs_a_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match="no privacy ledger"):
        run_audit(tmp_path)


def test_plan_prints_the_noise_multiplier(capsys):
    assert run_plan(10, 2, 20, 1, 8.0, None) == 0
    out = capsys.readouterr().out
    assert "noise multiplier" in out and "0.2000" in out and "1e-05" in out
