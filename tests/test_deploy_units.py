"""What `fedbrats deploy coordinator|site` writes, the app gate's allow-list, `fedbrats report` (fast, no processes).

The files themselves are started for real by the slow tests in tests/test_deployment.py.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedbrats.app_gate import AppRefused, check_fab
from fedbrats.cli import main
from fedbrats.client.app import summary_line
from fedbrats.deploy import Coordinator, Site, exec_start, run_logged, timestamped
from fedbrats.server.federation import progress_line
from fedbrats.shared.config import RunConfig
from fedbrats.simulations.simulate import app_pyproject

ROOT = Path("/srv/fedbrats")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def _fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(".info/CONTENT", "")
    return buffer.getvalue()


def test_a_fedbrats_app_folder_passes_the_gate_and_its_run_config_is_returned():
    pyproject = app_pyproject(RunConfig(rounds=3))
    assert check_fab(_fab({"pyproject.toml": pyproject}))["rounds"] == 3


def test_flowers_own_build_of_a_deploy_app_folder_passes(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    assert main(["deploy", "app", "--out", str(tmp_path / "app")]) == 0
    assert "rounds" in check_fab(build_fab_from_disk(tmp_path / "app"))


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"pyproject.toml": app_pyproject(RunConfig()), "fedbrats/__init__.py": "import os"}, "other than pyproject.toml"),
        ({"pyproject.toml": app_pyproject(RunConfig()).replace("fedbrats.client.app:app", "probe:client")}, "components"),
        ({"pyproject.toml": "not [toml"}, "not valid TOML"),
        ({"README.md": "hi"}, "other than pyproject.toml"),
    ],
)
def test_anything_else_is_refused_with_a_reason(files, reason):
    with pytest.raises(AppRefused, match=reason):
        check_fab(_fab(files))


def test_not_a_zip_is_refused():
    with pytest.raises(AppRefused, match="not a FAB"):
        check_fab(b"#!/bin/sh\nrm -rf /")


def test_the_proxy_forwards_only_fleet_posts_and_refuses_the_rest():
    conf = Coordinator("fedbrats.example.org", root=ROOT).nginx_conf()
    locations = re.findall(r"location (\S+) \{", conf)
    assert locations == ["/v1/fleet/", "/"]
    assert "location / { return 403; }" in conf
    assert "proxy_pass https://127.0.0.1:8000/v1/fleet/;" in conf and "limit_except POST { deny all; }" in conf
    assert conf.count("proxy_pass") == 1 and "/v1/control" not in conf.replace("# the Control API", "")
    assert f"ssl_certificate {ROOT}/certs/server.pem;" in conf and "listen 0.0.0.0:443 ssl;" in conf


def test_the_superlink_listens_on_loopback_only_and_flwr_talks_to_it_there():
    coordinator = Coordinator("fedbrats.example.org", root=ROOT)
    command = coordinator.superlink_command()
    assert command[command.index("--host") + 1] == "127.0.0.1" and "--enable-supernode-auth" in command
    assert all(Path(a).is_absolute() for a, flag in zip(command[1:], command, strict=False) if flag.endswith(("file", "database")))
    assert 'address = "127.0.0.1:8000"' in coordinator.flwr_config()
    assert f'root-certificates = "{ROOT}/certs/ca.pem"' in coordinator.flwr_config()


def test_units_run_unprivileged_with_restart_timestamped_logs_and_control_group_kill():
    site = Site("hospital-a", "fedbrats.example.org:443", Path("/data/brats"))
    units = {**Coordinator("fedbrats.example.org", root=ROOT).units(), **site.units()}
    assert sorted(units) == ["fedbrats-gate.service", "fedbrats-proxy.service", "fedbrats-superlink.service",
                             "fedbrats-supernode.service"]  # fmt: skip
    for name, text in units.items():
        assert "User=fedbrats" in text and "KillMode=control-group" in text and "Restart=on-failure" in text, name
        assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text, name
    for name in ("fedbrats-gate.service", "fedbrats-supernode.service"):
        assert "ReadOnlyPaths=/data/brats /etc/fedbrats" in units[name]
        assert "/data/brats" not in units[name].split("ReadWritePaths=")[1].splitlines()[0]
        command = exec_start(units[name])
        assert command[1:5] == ["deploy", "log", command[3], "--"] and command[3].startswith("/var/log/fedbrats/")
    node = exec_start(units["fedbrats-supernode.service"])
    assert node[node.index("--isolation") + 1] == "process"  # the gate, not Flower, starts ClientApps
    assert node[node.index("--node-config") + 1] == (
        "data-dir='/data/brats' site-name='hospital-a' work-dir='/var/lib/fedbrats'"
    )
    assert exec_start(units["fedbrats-gate.service"])[-3:] == ["gate", "--runtime-api-address", "127.0.0.1:9094"]
    assert "BindsTo=fedbrats-supernode.service" in units["fedbrats-gate.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path):
    site = Site("hospital-a", "fedbrats.example.org:443", Path("/data/brats"))
    for name, text in {**Coordinator("fedbrats.example.org", root=ROOT).units(), **site.units()}.items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, tmp_path.iterdir()))],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    syntax = [line for line in result.stderr.splitlines() if "Unknown" in line or "Invalid" in line or "parse" in line]
    assert not syntax, result.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_dir": Path("data")}, "data-dir must be an absolute path"),
        ({"site_name": "a b"}, "site name"),
        ({"superlink": "https://x:443"}, "HOST:PORT"),
    ],
)
def test_bad_site_settings_are_refused_with_the_setting_named(kwargs, message):
    settings = {"site_name": "hospital-a", "superlink": "x.org:443", "data_dir": Path("/data"), **kwargs}
    with pytest.raises(ValueError, match=message):
        Site(**settings)


def test_the_cli_writes_the_coordinator_and_site_files(tmp_path, capsys):
    assert main(["deploy", "coordinator", "--public-name", "fedbrats.example.org", "--root", str(tmp_path / "c")]) == 0
    assert main(["deploy", "site", "--site-name", "hospital-a", "--superlink", "fedbrats.example.org:443",
                 "--data-dir", "/data/brats", "--root", str(tmp_path / "s")]) == 0  # fmt: skip
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["c/flwr-cli/config.toml", "c/proxy/nginx.conf", "c/systemd/fedbrats-proxy.service",
                       "c/systemd/fedbrats-superlink.service", "s/systemd/fedbrats-gate.service",
                       "s/systemd/fedbrats-supernode.service"]  # fmt: skip


def test_log_lines_get_a_timestamp_and_flowers_blank_lines_are_dropped(tmp_path):
    assert timestamped("\x1b[92mINFO \x1b[0m:      \n") is None
    code = run_logged(tmp_path / "logs" / "x.log", [sys.executable, "-c", "print('\\x1b[92mINFO\\x1b[0m : hi'); print(); print('bye')"])
    lines = (tmp_path / "logs" / "x.log").read_text().splitlines()
    assert code == 0 and len(lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO : hi", lines[0]), lines[0]


def _record(train, **extra):
    return {"round": 2, "status": "ok", "selected": len(train), "available": 3, "wall_seconds": 12.0, "mean_dice": {},
            "train": train, "evaluate": [], **extra}  # fmt: skip


def test_the_progress_line_names_delivered_late_and_dropped_sites():
    line = progress_line(_record([
        {"site": "hospital-a", "dropped": None},
        {"site": "hospital-b", "dropped": "no reply before timeout"},
        {"site": "hospital-c", "dropped": "site error: Node Unavailable"},
    ]), 10)  # fmt: skip
    assert line.startswith("round 2/10 [ok] delivered 1/3 (hospital-a; 3 connected)")
    assert "| late: hospital-b |" in line and "| dropped: hospital-c (site error: Node Unavailable) |" in line


def test_a_site_logs_one_summary_line_per_message():
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 4})}), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = Message(RecordDict({"site": ConfigRecord({"name": "hospital-a"}), "metrics": MetricRecord(
        {"num-examples": 7, "skipped-cases": 1, "train-loss": 0.25})}), reply_to=msg)  # fmt: skip
    assert summary_line("train", msg, reply, 3.21) == (
        "train round 4: site hospital-a, cases used 7, skipped 1, train loss 0.2500 | 3.2 s"
    )
    failed = Message(Error(code=1001, reason="no usable case"), reply_to=msg)
    assert summary_line("train", msg, failed, 0.5) == "train round 4: error 1001: no usable case | 0.5 s"


def test_report_of_a_deployed_run_without_simulated_time(tmp_path, capsys):
    rows = []
    for rnd in (1, 2):
        train = [{"site": "hospital-a", "dropped": None, "num-examples": 5},
                 {"site": "hospital-b", "dropped": "site error: Node Unavailable" if rnd == 2 else None, "num-examples": 4}]
        evaluate = [{"site": s, "dropped": None, "dice-ET": 0.5, "dice-TC": 0.6, "dice-WT": 0.7, "num-examples": 1}
                    for s in ("hospital-a", "hospital-b")]  # fmt: skip
        rows.append(_record(train, round=rnd, evaluate=evaluate, bytes_sent=1000, bytes_received=800,
                            mean_dice={"ET": 0.5, "TC": 0.6, "WT": 0.7}))  # fmt: skip
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| hospital-b | 1 | 1 | 0 | 4 |" in report and "Simulated time" not in report
    assert "round 2, site hospital-b: site error: Node Unavailable" in report
    assert json.loads((tmp_path / "summary.json").read_text())["simulated_hours"] is None
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


def test_the_docs_show_the_generated_commands():
    """docs/deploy.md quotes what `fedbrats deploy` writes, so the documented commands are the tested ones."""
    docs = DOCS.read_text()
    coordinator = Coordinator("fedbrats.coordinator.example.org", root=ROOT)
    site = Site("hospital-a", "fedbrats.coordinator.example.org:443", Path("/data/brats"))
    conf = coordinator.nginx_conf()
    assert conf[conf.index("    server {") : conf.rindex("}")].rstrip() in docs  # the proxy rules, verbatim
    for units in (coordinator.units(), site.units()):
        for name, text in units.items():
            line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
            assert line.removeprefix("ExecStart=") in docs, name
    for snippet in (
        'ssh-keygen -t ecdsa -b 384 -N "" -f /etc/fedbrats/supernode_key',
        "flwr supernode register /path/to/hospital-a/supernode_key.pub fedbrats --name hospital-a",
        "fedbrats deploy coordinator --public-name fedbrats.coordinator.example.org --root /srv/fedbrats",
        "fedbrats report /srv/fedbrats/runs/", "node_sites.json", "same `out-dir`",
    ):  # fmt: skip
        assert snippet in docs, snippet
    assert "(default `site`)" not in docs  # site-name has no default in client/site.py
    ca_made = docs[docs.index("## 2.") : docs.index("On the coordinator (its private key")]
    assert "-keyout ca.key" in ca_made and "offline machine" in ca_made  # the CA key is not made on the coordinator
    assert "certs/ca.pem" not in docs.replace("/srv/fedbrats/certs/ca.pem", "")  # no relative certificate paths
