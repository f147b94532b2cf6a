"""`fedbrats privacy audit`: a ledger edited after the fact is caught, naming the site, the row and what is wrong."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, replace

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedbrats.cli import main
from fedbrats.client.accounting import epsilon_for, independent_epsilons
from fedbrats.client.audit import audit_ledger, audit_run, find_ledgers
from fedbrats.client.ledger import FILENAME, LedgerRow, PrivacyLedger, row_hash
from fedbrats.client.site_key import KEY_FILENAME, SiteKey, key_id
from fedbrats.privacy_commands import run_audit, run_plan

from .test_ledger import DELTA, SIGMA, fill

SITES = ("A", "B")


def _report(rows: list[LedgerRow], site: str, fingerprint: str) -> list[dict]:
    """The train entries the server records for a DP site: what `PrivateResult.metrics` sends."""
    return [{"site": site, "dropped": None, "epsilon": r.epsilon, "ledger-row": r.seq,
             "ledger-head": key_id(r.row_hash), "ledger-key": key_id(fingerprint)} for r in rows]  # fmt: skip


def make_run(tmp_path, *, rounds: int = 3, budget: float = 50.0):
    """A run folder as a simulation leaves it: sites/<name>/ ledgers and the server's history.jsonl."""
    reported = {}
    for name in SITES:
        ledger = fill(PrivacyLedger.at(tmp_path / "sites" / name), rounds, budget=budget)
        reported[name] = _report(ledger.rows(), name, ledger.meta()["key_fingerprint"])
    lines = [
        json.dumps({"round": r, "train": [reported[s][r - 1] for s in SITES]}) for r in range(1, rounds + 1)
    ]
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _sql(path, *statements):
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)


def _rewrite(path, row: LedgerRow, key: SiteKey | None = None):
    """Store `row` in place of the row with its seq, re-hashed and (with `key`) re-signed: a careful forger."""
    row = replace(row, row_hash=row_hash(row))
    if key is not None:
        row = replace(row, signature=key.sign(row.row_hash.encode()).hex())
    values = {k: v for k, v in asdict(row).items() if k != "seq"}
    _sql(path, f"DELETE FROM rounds WHERE seq = {row.seq}")
    with sqlite3.connect(path) as conn:
        conn.execute(f"INSERT INTO rounds (seq, {', '.join(values)}) VALUES (?, {', '.join('?' * len(values))})",
                     (row.seq, *values.values()))  # fmt: skip
    return row


def _raise_sigma(path, key):
    """Row 3 rewritten consistently: sigma raised, epsilon recomputed, hash and signature redone with the site's key."""
    rows = PrivacyLedger.open_existing(path).rows()
    history = [r.history_entry for r in rows[:2]] + [(SIGMA * 2, rows[2].sample_rate, rows[2].steps)]
    _rewrite(path, replace(rows[2], noise_multiplier=SIGMA * 2, epsilon=epsilon_for(history, DELTA)), key)


def _reorder(path, _key):
    _sql(path, "UPDATE rounds SET seq = 100 WHERE seq = 1", "UPDATE rounds SET seq = 1 WHERE seq = 2",
         "UPDATE rounds SET seq = 2 WHERE seq = 100")  # fmt: skip


def _foreign_signatures(path, _key):
    other = SiteKey.load_or_create(path.parent.parent / "forger.pem")
    for row in PrivacyLedger.open_existing(path).rows():
        _sql(
            path,
            f"UPDATE rounds SET signature = '{other.sign(row.row_hash.encode()).hex()}' WHERE seq = {row.seq}",
        )


TAMPERING = {
    "last rows deleted": (lambda p, k: _sql(p, "DELETE FROM rounds WHERE seq > 1"), "server round 2: the site reported ledger row 2"),
    "table emptied": (lambda p, k: _sql(p, "DELETE FROM rounds"), "server round 1: the site reported ledger row 1"),
    "row rewritten consistently": (_raise_sigma, "row 3: epsilon"),
    "rows reordered": (_reorder, "row 2: does not follow the previous row"),
    "another key's signatures": (_foreign_signatures, "row 1: its signature does not verify"),
}  # fmt: skip


def test_a_good_run_passes_against_the_servers_history_and_draws_epsilon(tmp_path, capsys):
    run = make_run(tmp_path)
    assert set(find_ledgers(run)) == set(SITES)
    audit = audit_run(run)
    assert audit.ok and audit.history == run / "history.jsonl" and audit.failures() == []
    assert [s.server_rounds for s in audit.sites] == [3, 3]
    assert run_audit(run, out_png=tmp_path / "eps.png") == 0
    assert (tmp_path / "eps.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "privacy budget per site" in out and "FAIL" not in out and "history.jsonl" in out
    assert run_audit(run / "sites" / "A" / FILENAME) == 0  # a single ledger file finds the run's history too


def test_event_lines_in_the_history_are_not_rounds(tmp_path):
    """A warm-started run's history opens with an event line (found: the audit refused every such run)."""
    run = make_run(tmp_path)
    history = run / "history.jsonl"
    event = {"event": "initial-model", "source": "warm start", "path": "public.safetensors", "digest": "ab" * 32}
    history.write_text(json.dumps(event) + "\n" + history.read_text())
    audit = audit_run(run)
    assert audit.ok and [s.server_rounds for s in audit.sites] == [3, 3]


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_each_tampering_is_caught_naming_the_site_and_row(tmp_path, capsys, kind):
    run = make_run(tmp_path)
    path = run / "sites" / "B" / FILENAME
    tamper, expected = TAMPERING[kind]
    tamper(path, SiteKey.load(path.parent / KEY_FILENAME))
    audit = audit_run(run)
    failures = audit.failures()
    assert not audit.ok and all(f.startswith("site B: ") for f in failures), failures
    assert any(expected in f for f in failures), failures
    assert run_audit(run) == 1
    assert expected in capsys.readouterr().out
    assert audit_run(run / "sites" / "A").ok  # the untouched site still passes


@pytest.mark.parametrize(
    "kind", ["last rows deleted", "table emptied", "rows reordered", "another key's signatures"]
)
def test_the_ledger_alone_shows_most_tampering(tmp_path, kind):
    """Without the server's history the chain, signatures and row counter still catch these."""
    path = make_run(tmp_path) / "sites" / "B" / FILENAME
    (tmp_path / "history.jsonl").unlink()
    TAMPERING[kind][0](path, None)
    assert not audit_ledger(path).consistent


def test_a_consistent_rewrite_with_the_sites_own_key_is_caught_by_what_the_site_reported(tmp_path):
    run = make_run(tmp_path)
    path = run / "sites" / "B" / FILENAME
    _raise_sigma(path, SiteKey.load(path.parent / KEY_FILENAME))
    alone = audit_ledger(path)
    assert alone.consistent  # chain, signature and arithmetic all agree: only the server's record disagrees
    failures = audit_run(run).failures()
    assert any("row 3: epsilon" in f and "reported" in f for f in failures), failures
    assert any("row 3: is not the row the site reported in round 3" in f for f in failures), failures


def test_a_whole_new_key_is_caught(tmp_path):
    """A forger re-keys the ledger (meta, every row re-chained and re-signed): the key the site reported differs."""
    run = make_run(tmp_path)
    path = run / "sites" / "B" / FILENAME
    forger = SiteKey.load_or_create(tmp_path / "forger.pem")
    previous = None
    _sql(path, f"UPDATE meta SET value = '{forger.fingerprint}' WHERE key = 'key_fingerprint'")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'public_key'", (forger.public_pem,))
    from fedbrats.client.ledger import genesis_hash

    for row in PrivacyLedger.open_existing(path).rows():
        row = replace(
            row, key_fingerprint=forger.fingerprint, prev_hash=previous or genesis_hash(forger.fingerprint)
        )
        previous = _rewrite(path, row, forger).row_hash
    failures = audit_run(run).failures()
    assert any("the key beside it" in f for f in failures), failures
    (path.parent / KEY_FILENAME).unlink()  # the forger also removes the site's key file
    failures = audit_run(run).failures()
    assert any("row 1: the ledger's key" in f and "not the key the site reported" in f for f in failures), (
        failures
    )


def test_a_ledger_missing_for_a_site_the_server_saw_train_fails(tmp_path):
    run = make_run(tmp_path)
    (run / "sites" / "B" / FILENAME).unlink()
    audit = audit_run(run)
    assert audit.failures() == [
        "site B: the server recorded 3 DP round(s), but " + str(run) + " holds no ledger for it (deleted?)"
    ]


def test_older_checks_still_hold(tmp_path):
    run = make_run(tmp_path)
    path = run / "sites" / "B" / FILENAME
    _sql(path, "UPDATE rounds SET steps = 1 WHERE seq = 2")
    assert any("the history gives" in f for f in audit_ledger(path).failures())
    assert (
        run_audit(run, budget=2.0) == 1 and audit_ledger(run / "sites" / "A" / FILENAME, budget=2.0).exceeded
    )


def test_independent_accountant_agrees_with_opacus(tmp_path):
    rows = fill(PrivacyLedger.at(tmp_path), 3).rows()
    entries = [(r.noise_multiplier, r.sample_rate, r.steps, r.delta, r.accountant) for r in rows]
    for row, independent in zip(rows, independent_epsilons(entries), strict=True):
        assert independent == pytest.approx(row.epsilon, rel=0.01)
    pld = independent_epsilons([(1.1, 0.01, 10_000, 1e-5, "prv")])[0]
    assert pld == pytest.approx(5.203, rel=0.01)  # DESIGN section 6 oracle, by dp_accounting's PLD


def test_audit_needs_a_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match="no privacy ledger"):
        run_audit(tmp_path)


def test_plan_prints_the_noise_multiplier(capsys):
    assert run_plan(10, 2, 20, 1, 8.0, None) == 0
    out = capsys.readouterr().out
    assert "noise multiplier" in out and "0.2000" in out and "1e-05" in out


def test_client_level_plan_meets_its_budget_and_the_cli_wants_one_unit(capsys):
    from fedbrats.strategies.client_dp import client_level_epsilons, client_plan_rows

    rows = dict(client_plan_rows(23, 8, 8.0, 1e-5, clipping_norm=0.0249))
    z = float(rows["noise multiplier z (client-dp-noise-multiplier)"])
    assert 1.7 < z < 1.9  # the sigma of the 23-site client-level DP rows in benchmarks/RESULTS.md
    assert client_level_epsilons(z, 1.0, 8)[-1] <= 8.0 + 1e-3
    assert client_level_epsilons(z * 0.9, 1.0, 8)[-1] > 8.0  # and no more noise than needed
    assert float(rows["noise std per coordinate of the mean update, z S / k"]) == pytest.approx(z * 0.0249 / 23, rel=1e-3)
    assert main(["privacy", "plan", "--sites", "23", "--rounds", "8", "--epsilon", "3"]) == 0
    assert "client-level DP plan for 23 sites" in capsys.readouterr().out
    for argv in (["--rounds", "8"], ["--sites", "3", "--cases", "10"]):
        assert main(["privacy", "plan", *argv]) != 0
        assert "exactly one of --cases" in capsys.readouterr().err


# --- evaluation metrics under DP, through the client app's evaluate handler ----------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from fedbrats.shared.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, sites=1, cases_per_site=4, voxel_size=6.0, seed=3, progress=False)
    return root


@pytest.mark.parametrize(
    ("changes", "sent"),
    [({"dp": True}, False),  # the default: suppress
     ({"dp": True, "dp_eval_metrics": "aggregate", "dp_eval_min_cases": 50}, False),  # too few cases
     ({"dp": True, "dp_eval_metrics": "aggregate", "dp_eval_min_cases": 1}, True),
     ({"dp": False}, True)],
)  # fmt: skip
def test_dp_sites_send_evaluation_metrics_only_as_means_over_enough_cases(phantom, tmp_path, changes, sent):
    from fedbrats.client.app import handle_evaluate
    from fedbrats.shared.config import RunConfig
    from fedbrats.shared.models import create_model
    from fedbrats.shared.records import model_to_record

    config = RunConfig(rounds=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                       out_dir=str(tmp_path), model_width=8, model_depth=2, patch_size=16, cache="memory",
                       val_fraction=0.5, **changes)  # fmt: skip
    model = create_model(config.model, **config.model_config)
    msg = Message(RecordDict({"arrays": model_to_record(model), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type="evaluate")  # fmt: skip
    reply = handle_evaluate(msg, Context(1, 1, {"partition-id": 0}, RecordDict(), config.to_flower()))
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics["num-examples"] == 2
    assert ("dice-WT" in metrics) is sent and ("mean-dice" in metrics) is sent
    if not sent:
        assert set(metrics) == {"num-examples", "eval-seconds"}  # nothing about any patient


def test_a_dp_run_audits_clean_and_a_deleted_last_row_fails_it(phantom, tmp_path):
    """End to end: what the site reports each round reaches history.jsonl, and the audit checks the ledger against it."""
    from fedbrats.server.app import run_server
    from fedbrats.shared.config import RunConfig

    from .local_grid import LocalGrid

    config = RunConfig(rounds=2, min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                       out_dir=str(tmp_path), model_width=8, model_depth=2, patch_size=16, batch_size=2,
                       local_steps=2, cache="memory", dp=True, dp_epsilon=50.0)  # fmt: skip
    run_server(LocalGrid(config.to_flower(), sites=1), config)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert all(
        t["dropped"] is None and t["ledger-row"] == r for r, h in enumerate(history, 1) for t in h["train"]
    )
    assert all("dice-WT" not in e for h in history for e in h["evaluate"])  # suppressed under DP by default
    audit = audit_run(tmp_path)
    assert audit.ok, audit.failures()
    assert [len(s.rounds) for s in audit.sites] == [2] and audit.sites[0].server_rounds == 2
    site = audit.sites[0].site
    _sql(audit.sites[0].path, "DELETE FROM rounds WHERE seq = 2")
    assert f"site {site}: server round 2: the site reported ledger row 2, which the ledger does not hold" in (
        " | ".join(audit_run(tmp_path).failures())
    )


# --- client-level DP: the server's epsilon, recomputed from its history ---------------------------
@pytest.mark.slow
def test_client_level_dp_run_is_audited_and_an_edited_history_fails(tmp_path, capsys):
    from fedbrats.server.app import run_server
    from fedbrats.server.client_dp_audit import audit_client_dp
    from fedbrats.shared.config import RunConfig
    from fedbrats.strategies.client_dp import client_level_epsilons

    from .local_grid import LocalGrid, tiny_phantom

    phantom = tiny_phantom(tmp_path / "phantom", cases_per_site=3)
    run = tmp_path / "run"
    config = RunConfig(rounds=2, min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                       out_dir=str(run), model="resunet", model_width=8, model_depth=2, patch_size=16, batch_size=2,
                       local_steps=1, cache="memory", client_dp_noise_multiplier=1.5, client_dp_clipping_norm=0.5)  # fmt: skip
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    audit = audit_client_dp(run)
    assert audit is not None and audit.ok, audit.failures
    assert [r.releases for r in audit.rounds] == [1, 2] and [r.updates for r in audit.rounds] == [2, 2]
    assert audit.epsilon == pytest.approx(client_level_epsilons(1.5, 1.0, 2)[-1])
    assert audit.rounds[0].noise_std == pytest.approx(1.5 * 0.5 / 2)
    assert run_audit(run, out_png=tmp_path / "eps.png") == 0 and (tmp_path / "eps.png").stat().st_size > 0
    assert "client-level epsilon" in capsys.readouterr().out
    assert not audit_client_dp(run, budget=audit.epsilon * 0.9).ok  # over a smaller budget

    history = run / "history.jsonl"
    original = history.read_text()
    records = [json.loads(line) for line in original.splitlines()]
    records[-1]["client_epsilon"] *= 0.5  # a history edited to look cheaper
    records[0]["client_dp"]["noise-std"] *= 0.1  # a round that added less noise than z S / k
    history.write_text("".join(json.dumps(r) + "\n" for r in records))
    failures = " | ".join(audit_client_dp(run).failures)
    assert "round 2: recorded epsilon" in failures and "round 1: noise std" in failures
    assert run_audit(run) == 1
    del records[0]["client_dp"]  # a released round without its record
    history.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "round 1 released a model without a client-level DP record" in " | ".join(audit_client_dp(run).failures)
    assert audit_client_dp(phantom) is None  # no run configuration: nothing to audit at the server


def test_client_level_audit_reports_damaged_records_and_refuses_a_broken_configuration(tmp_path):
    """An edited history or run configuration is a named failure, never a crash of the audit."""
    from fedbrats.server.client_dp_audit import audit_client_dp
    from fedbrats.shared.config import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(RunConfig(client_dp_noise_multiplier=1.5).to_flower()))
    good = {"noise-multiplier": 1.5, "sample-rate": 1.0, "client-delta": 1e-5, "releases": 1, "clipping-norm": 1.0,
            "updates": 2, "noise-std": 0.75}  # fmt: skip
    records = [
        {"round": 1, "status": "ok", "client_epsilon": "cheap", "client_dp": good},
        {"round": 2, "status": "ok", "client_dp": "not a record"},
        {"round": 3, "status": "ok", "client_dp": {k: v for k, v in good.items() if k != "noise-std"}},
    ]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    failures = " | ".join(audit_client_dp(run).failures)
    for round_ in (1, 2, 3):
        assert f"round {round_}: unreadable client-level DP record" in failures
    assert run_audit(run) == 1
    (run / "run_config.json").write_text("{")
    with pytest.raises(ValueError, match="run_config.json: not a run configuration the audit can read"):
        audit_client_dp(run)
