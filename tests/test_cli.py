"""The `fedbrats` command line: help on every option, one-line errors, checks before anything starts."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import pytest

from fedbrats import cli, commands
from fedbrats.shared.data.partition import Partition, read_partition, write_partition
from tests.data_fixtures import case_id_for, write_case


def _parsers(parser: argparse.ArgumentParser, path: str = "fedbrats"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_and_subcommand_has_help():
    parser = cli.build_parser()
    undocumented = []
    for path, p in _parsers(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                undocumented += [f"{path} {a.dest}" for a in action._choices_actions if not a.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert undocumented == []
    assert len(list(_parsers(parser))) >= 15  # the walk reached the nested subcommands


def test_run_commands_share_the_configuration_options():
    parser = cli.build_parser()
    for command in (["train", "--data", "d", "--out", "o"], ["evaluate", "--checkpoint", "c", "--data", "d"],
                    ["simulate"], ["compare", "--strategies", "fedavg"]):  # fmt: skip
        args = parser.parse_args([*command, "--preset", "demo", "--set", "lr=0.1", "--set", "rounds=2"])
        assert (args.preset, args.set, args.config, args.allow_missing) == ("demo", ["lr=0.1", "rounds=2"], None, False)


def test_an_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert cli.main(["data", "partition", str(tmp_path / "absent"), "--scheme", "iid", "--sites", "2",
                     "--out", str(tmp_path / "p.csv")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("fedbrats data partition: error: ") and "not a directory" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="not a directory"):
        cli.main(["data", "partition", str(tmp_path / "absent"), "--scheme", "iid", "--sites", "2",
                  "--out", str(tmp_path / "p.csv"), "--debug"])  # fmt: skip


def test_unexpected_errors_name_their_type(monkeypatch, capsys):
    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(commands, "data_check", broken)
    assert cli.main(["data", "check", "root"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbrats data check: error: KeyError: 'boom'") and "--debug" in err


def test_unknown_strategy_fails_at_once(monkeypatch, capsys):
    monkeypatch.setattr(commands, "_federation_data", lambda *a: pytest.fail("data prepared before the check"))
    started = time.monotonic()
    assert cli.main(["simulate", "--set", "strategy=nosuch"]) == 2
    assert time.monotonic() - started < 5  # the strategy registry only: no torch, no Flower
    err = capsys.readouterr().err
    assert "fedbrats simulate: error: strategy 'nosuch': unknown strategy 'nosuch'; known:" in err


@pytest.fixture()
def partial_download(tmp_path):
    """Three sites in the partition, site 3's cases never downloaded."""
    root = tmp_path / "data"
    for i in range(4):
        write_case(root, seed=i)
    ids = [case_id_for(i + 1) for i in range(6)]
    write_partition(Partition({"1": ids[0:2], "2": ids[2:4], "3": ids[4:6]}, {}), root / "partitioning_1.csv")
    return root


def test_simulate_stops_before_flower_when_subjects_are_missing(partial_download, tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr("fedbrats.simulations.simulate.run_simulate", lambda *a, **k: ran.append((a, k)) or 0)
    out = tmp_path / "run"
    argv = ["simulate", "--data", str(partial_download), "--preset", "demo", "--out", str(out)]
    assert cli.main(argv) == 2 and ran == []
    err = capsys.readouterr().err
    assert f"2 of 6 subjects of partition {partial_download / 'partitioning_1.csv'}" in err
    assert f"the first: {case_id_for(5)}" in err and "--allow-missing" in err

    assert cli.main([*argv, "--allow-missing"]) == 0
    (config, data, partition, run_out), _ = ran[0]
    assert partition == out / "partition.csv" and run_out == out.resolve()
    assert list(read_partition(partition).sites) == ["1", "2"]  # site 3 is not started: 2 supernodes
    printed = capsys.readouterr().out
    assert "not started: 3" in printed and "total" in printed


def test_train_and_evaluate_check_the_partition_first(partial_download, tmp_path, monkeypatch, capsys):
    import fedbrats.client.training_run as training_run

    seen = {}
    monkeypatch.setattr(training_run, "run_train", lambda config, data, **kw: seen.update(config=config, **kw))
    base = ["train", "--data", str(partial_download), "--partition", str(partial_download / "partitioning_1.csv"),
            "--out", str(tmp_path / "run"), "--preset", "demo", "--set", "model-width=8"]  # fmt: skip
    assert cli.main(base) == 2 and "2 of 6 subjects" in capsys.readouterr().err
    assert cli.main([*base, "--site", "2"]) == 0  # only the site trained on is checked
    assert seen["site"] == "2" and seen["partition"] == partial_download / "partitioning_1.csv"
    assert cli.main([*base, "--allow-missing", "--epochs", "3"]) == 0
    assert list(seen["partition"].sites) == ["1", "2"] and seen["config"].rounds == 3
    assert seen["config"].model_width == 8 and seen["config"].local_epochs == 1
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(partial_download),
                "--partition", str(partial_download / "partitioning_1.csv")]  # fmt: skip
    assert cli.main(evaluate) == 2 and "fedbrats evaluate: error: 2 of 6 subjects" in capsys.readouterr().err


def test_compare_checks_every_strategy_before_data(monkeypatch, capsys):
    monkeypatch.setattr(commands, "_federation_data", lambda *a: pytest.fail("data prepared before the check"))
    assert cli.main(["compare", "--strategies", "fedavg,fedfoo"]) == 2
    assert "unknown strategy 'fedfoo'" in capsys.readouterr().err
    assert cli.main(["compare", "--strategies", "fedavg", "--set", "strategy-eta=0.01", "--preset", "demo"]) == 2
    assert "NAME:KEY=VALUE" in capsys.readouterr().err


SLOW_COMMAND = """
import pathlib, sys, time
from fedbrats import cli, commands
def slow(args):
    try:
        print("ready", flush=True)
        time.sleep(120)
    finally:  # what a simulation does here: stop its local SuperLink and federation
        pathlib.Path(sys.argv[1]).write_text("cleaned up")
commands.privacy_plan = slow
sys.exit(cli.main(["privacy", "plan", "--cases", "3"]))
"""


def test_sigterm_runs_the_commands_cleanup_and_exits_143(tmp_path):
    """`kill` or a job scheduler's stop must not orphan a simulation's SuperLink: SIGTERM unwinds like Ctrl-C."""
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMMAND, str(marker)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err
    assert marker.read_text() == "cleaned up"
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["privacy", "plan", "--cases", "10", "--rounds", "2"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # main() leaves no handler behind in its caller
