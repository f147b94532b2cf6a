"""The privacy ledger as storage and evidence: rows, chain, signatures, keys, and where a site's ledger lives."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedbrats.client.accounting import epsilon_for
from fedbrats.client.ledger import FILENAME, LedgerError, PrivacyLedger, genesis_hash, row_hash
from fedbrats.client.site_key import KEY_FILENAME, SiteKey, SiteKeyError, key_id, verify_signature

SIGMA, Q, STEPS, DELTA = 1.3, 0.1, 10, 1e-5


def fill(
    ledger: PrivacyLedger, rounds: int, *, budget: float = 50.0, run_id: str = "7", accountant: str = "rdp"
):
    """`rounds` rounds of SIGMA, Q, STEPS, each with the epsilon the site's accountant gives."""
    history = ledger.history()
    for r in range(1, rounds + 1):
        history.append((SIGMA, Q, STEPS))
        ledger.record(run_id=run_id, round=r, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS,
                      epsilon=epsilon_for(history, DELTA, accountant), delta=DELTA, accountant=accountant,
                      budget=budget, max_grad_norm=1.0, n_cases=10)  # fmt: skip
    return ledger


def write_pem(path, private_key):
    path.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
    os.chmod(path, 0o600)
    return path


def test_rows_round_trip_and_restore_the_accountant_history(tmp_path):
    ledger = fill(PrivacyLedger.at(tmp_path / "site"), 3)
    assert (tmp_path / "site" / FILENAME).is_file()
    again = PrivacyLedger.at(tmp_path / "site")  # a new process would do exactly this
    rows = again.rows()
    assert [r.seq for r in rows] == [1, 2, 3] and [r.round for r in rows] == [1, 2, 3]
    assert again.history() == [(SIGMA, Q, STEPS)] * 3
    assert rows[-1].epsilon == pytest.approx(
        epsilon_for([(SIGMA, Q, 3 * STEPS)], DELTA)
    )  # composes like one shot
    assert rows[0].epsilon < rows[1].epsilon < rows[2].epsilon
    assert again.epsilon() == rows[-1].epsilon and ledger.has_round("7", 2) and not ledger.has_round("8", 2)


def test_a_recorded_round_cannot_be_recorded_twice_and_the_failed_write_changes_nothing(tmp_path):
    ledger = fill(PrivacyLedger.at(tmp_path), 2)
    with pytest.raises(LedgerError, match="round 1 of run '7' is already recorded"):
        fill(ledger, 2)  # round 1 again: refused inside the transaction
    assert len(ledger.rows()) == 2 and ledger.verify() == []
    fill(ledger, 1, run_id="8")  # another run may reuse round numbers
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


def test_rows_are_chained_by_hash_and_signed_with_the_site_key(tmp_path):
    ledger = fill(PrivacyLedger.at(tmp_path), 3)
    rows, meta = ledger.rows(), ledger.meta()
    key = SiteKey.load(tmp_path / KEY_FILENAME)
    assert stat.S_IMODE((tmp_path / KEY_FILENAME).stat().st_mode) == 0o600  # generated once, private
    assert meta["key_fingerprint"] == key.fingerprint and "PUBLIC KEY" in meta["public_key"]
    assert rows[0].prev_hash == genesis_hash(key.fingerprint)
    assert [r.prev_hash for r in rows[1:]] == [r.row_hash for r in rows[:-1]]
    for row in rows:
        assert row.row_hash == row_hash(row) and row.key_fingerprint == key.fingerprint
        assert verify_signature(meta["public_key"], bytes.fromhex(row.signature), row.row_hash.encode())
    assert not verify_signature(
        meta["public_key"], bytes.fromhex(rows[0].signature), rows[1].row_hash.encode()
    )
    assert ledger.verify() == []
    assert key_id(key.fingerprint) < 2**48  # a Flower metric (float) carries it exactly


def test_a_ledger_cannot_change_hands_and_an_unsigned_one_is_not_continued(tmp_path):
    fill(PrivacyLedger.at(tmp_path / "a"), 1)
    other = SiteKey.load_or_create(tmp_path / "other.pem")
    with pytest.raises(LedgerError, match="a ledger cannot change hands"):
        fill(PrivacyLedger.at(tmp_path / "a", other), 1, run_id="9")
    assert len(PrivacyLedger.at(tmp_path / "a").rows()) == 1
    old = tmp_path / "v1" / FILENAME
    old.parent.mkdir()
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with pytest.raises(LedgerError, match="schema 1.*unsigned ledger cannot be continued"):
        PrivacyLedger(old)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_ec_keys_sign_a_ledger_too(tmp_path, curve):
    """A SuperNode's own EC authentication key (P-256 / P-384) can serve as the ledger key."""
    key = SiteKey.load(write_pem(tmp_path / "node.pem", ec.generate_private_key(curve)))
    ledger = fill(PrivacyLedger.at(tmp_path / "site", key), 2)
    assert ledger.verify() == [] and ledger.meta()["key_fingerprint"] == key.fingerprint


def test_unusable_keys_are_refused_naming_the_file(tmp_path):
    rsa_key = write_pem(tmp_path / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(SiteKeyError, match="rsa.pem is a .*RSA.*expected Ed25519 or EC"):
        SiteKey.load(rsa_key)
    k1 = write_pem(tmp_path / "k1.pem", ec.generate_private_key(ec.SECP521R1()))
    with pytest.raises(SiteKeyError, match="curve secp521r1"):
        SiteKey.load(k1)
    os.chmod(k1, 0o644)
    with pytest.raises(SiteKeyError, match="readable by others.*chmod 600"):
        SiteKey.load(k1)
    with pytest.raises(SiteKeyError, match="does not exist"):
        SiteKey.load(tmp_path / "none.pem")


def test_the_ledger_follows_the_site_not_its_work_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    # a simulated site keeps its ledger beside the run, in its own site folder
    simulated = PrivacyLedger.for_site({"partition-id": 0}, "1", tmp_path / "run" / "sites" / "1")
    assert simulated.path == tmp_path / "run" / "sites" / "1" / FILENAME
    # a deployed site: a new work-dir is not a new budget
    first = PrivacyLedger.for_site({"work-dir": str(tmp_path / "w1")}, "hospital-a", tmp_path / "w1")
    fill(first, 2)
    moved = PrivacyLedger.for_site({"work-dir": str(tmp_path / "w2")}, "hospital-a", tmp_path / "w2")
    assert moved.path == first.path == tmp_path / "data" / "fedbrats" / "ledgers" / "hospital-a" / FILENAME
    assert len(moved.rows()) == 2
    # ledger-dir names the home; ledger-key names the identity, so a renamed site keeps its budget
    pem = write_pem(tmp_path / "node.pem", ec.generate_private_key(ec.SECP256R1()))
    nodes = [
        {"ledger-dir": str(tmp_path / "home"), "ledger-key": str(pem), "work-dir": str(tmp_path / w)}
        for w in "xy"
    ]
    a = PrivacyLedger.for_site(nodes[0], "old-name", tmp_path / "x")
    fill(a, 1)
    b = PrivacyLedger.for_site(nodes[1], "new-name", tmp_path / "y")
    assert a.path == b.path and a.path.parent.name == f"key-{SiteKey.load(pem).fingerprint[:16]}"
    assert len(b.rows()) == 1


def test_a_plan_is_stored_once_per_run_and_signed(tmp_path):
    ledger = PrivacyLedger.at(tmp_path)
    args = dict(sample_rate=Q, round_steps=STEPS, rounds=4, delta=DELTA, accountant="rdp", target_epsilon=8.0,
                spent_before=0.0, budget=8.0, n_cases=10)  # fmt: skip
    plan = ledger.record_plan(run_id="7", noise_multiplier=SIGMA, **args)
    again = ledger.record_plan(
        run_id="7", noise_multiplier=SIGMA * 0.5, **args
    )  # a later round cannot replan
    assert again == plan == ledger.plan_for("7") and plan.total_steps == 4 * STEPS
    assert ledger.plan_for("8") is None and ledger.verify() == []
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("UPDATE plans SET noise_multiplier = 5.0")
    assert any(where == "plan 1" and "do not match its hash" in what for where, what in ledger.verify())
