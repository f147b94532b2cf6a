"""What `fedbrats deploy coordinator|site` writes: the commands, systemd units and proxy of a deployment.

One source for the documented topology (docs/deploy.md shows these files; tests/deployment.py
starts these commands on 127.0.0.1):

- coordinator: the SuperLink listens on 127.0.0.1 only; nginx terminates TLS on the public
  address and forwards only the Fleet API (`/v1/fleet/`, what SuperNodes use) to it, everything
  else (the Control API that submits runs and lists them, the Runtime API) answers 403. In Flower
  1.41 all three APIs share one port and the Control API has no account authentication in the
  open-source distribution, so the proxy is what keeps hospitals (and anyone else) off it; the
  coordinator's `flwr` talks to 127.0.0.1 directly.
- hospital: the SuperNode runs with `--isolation process` and the app gate (`fedbrats.app_gate`)
  starts its ClientApps, refusing any app that is not a FedBraTS app folder; both run as an
  unprivileged user that can only read the data.

Every process runs under `fedbrats deploy log FILE -- COMMAND`, which puts a timestamp on each line
of the process's output and appends it to FILE (Flower's own console lines carry none).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

#: what every Flower process at a hospital or the coordinator needs in its environment
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
#: the only URL prefix the proxy forwards: Flower 1.41's Fleet API (flwr/supernode/fleet_http_client.py)
FLEET_PREFIX = "/v1/fleet/"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: Flower logs an empty message before each received message ("INFO :      ")
_EMPTY_FLOWER_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")


def default_bin_dir() -> Path:
    """Where pip put `fedbrats`, `flower-superlink` and `flower-supernode` for this interpreter."""
    return Path(sys.executable).parent


def _absolute(path: Path | str, what: str) -> Path:
    path = Path(path)
    if not path.is_absolute():
        raise ValueError(f"{what} must be an absolute path (systemd units and Flower resolve paths "
                         f"from different folders), got {str(path)!r}")  # fmt: skip
    return path


@dataclass(frozen=True)
class Coordinator:
    """The coordinator host: public name and port for the hospitals, everything else under `root`."""

    public_name: str
    root: Path = Path("/srv/fedbrats")
    public_port: int = 443
    listen: str = "0.0.0.0"
    superlink_port: int = 8000
    user: str = "fedbrats"
    bin_dir: Path = Path("/usr/local/bin")

    def __post_init__(self) -> None:
        _absolute(self.root, "the coordinator's root")
        _absolute(self.bin_dir, "the bin folder")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", self.public_name):
            raise ValueError(f"public name {self.public_name!r}: expected a host name or IP address")

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def superlink_address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def superlink_command(self) -> list[str]:
        """flower-superlink on 127.0.0.1 only, TLS, node authentication, a database, no runtime installs."""
        return [
            str(self.bin_dir / "flower-superlink"),
            "--ssl-ca-certfile", str(self.certs / "ca.pem"),
            "--ssl-certfile", str(self.certs / "server.pem"),
            "--ssl-keyfile", str(self.certs / "server.key"),
            "--database", str(self.root / "superlink" / "state.db"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.superlink_port),
        ]  # fmt: skip

    def proxy_command(self) -> list[str]:
        return ["/usr/sbin/nginx", "-c", str(self.root / "proxy" / "nginx.conf"), "-p", f"{self.root / 'proxy'}/",
                "-e", str(self.logs / "proxy-error.log")]  # fmt: skip

    def nginx_conf(self) -> str:
        """TLS for the hospitals; only POSTs under /v1/fleet/ reach the SuperLink, anything else is 403."""
        proxy, certs = self.root / "proxy", self.certs
        temp = "\n".join(f"    {kind}_temp_path {proxy}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""# Written by `fedbrats deploy coordinator`: the hospitals' only way to the SuperLink.
daemon off;
worker_processes 2;
pid {proxy}/nginx.pid;
error_log {self.logs}/proxy-error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log {self.logs}/proxy-access.log;
{temp}
    server_tokens off;
    server {{
        listen {self.listen}:{self.public_port} ssl;
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        # the Fleet API: SuperNodes register, pull messages and push replies (model weights, no size cap)
        location {FLEET_PREFIX} {{
            limit_except POST {{ deny all; }}
            client_max_body_size 0;
            proxy_pass https://{self.superlink_address}{FLEET_PREFIX};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {certs}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # nginx checks DNS names only: the certificate names localhost too
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        # the Control API (submit, list and stop runs; register SuperNodes) and everything else
        location / {{ return 403; }}
    }}
}}
"""

    def flwr_config(self) -> str:
        """The coordinator's $FLWR_HOME/config.toml: `flwr` talks to the SuperLink on 127.0.0.1, not via the proxy."""
        return (f'[superlink]\ndefault = "fedbrats"\n\n[superlink.fedbrats]\naddress = "{self.superlink_address}"\n'
                f'root-certificates = "{self.certs / "ca.pem"}"\n')  # fmt: skip

    def units(self) -> dict[str, str]:
        env = {**FLOWER_ENVIRONMENT, "FLWR_HOME": str(self.root / "superlink" / "flwr-home")}
        link = unit(
            "FedBraTS SuperLink (coordinator, 127.0.0.1 only)", self.user,
            logged(self.bin_dir, self.logs / "superlink.log", self.superlink_command()), env,
            writable=[self.root / "superlink", self.root / "runs", self.logs],
        )  # fmt: skip
        proxy = unit(
            "FedBraTS Fleet API proxy (the hospitals' only way in)", self.user, self.proxy_command(), {},
            writable=[self.root / "proxy", self.logs], after=["fedbrats-superlink.service"],
            extra=["AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"],
        )  # fmt: skip
        return {"fedbrats-superlink.service": link, "fedbrats-proxy.service": proxy}

    def files(self) -> dict[str, str]:
        """Path under `root` -> text: the units (for `systemctl link`), the proxy's config, the CLI's connection."""
        units = {f"systemd/{name}": text for name, text in self.units().items()}
        return {**units, "proxy/nginx.conf": self.nginx_conf(), "flwr-cli/config.toml": self.flwr_config()}


@dataclass(frozen=True)
class Site:
    """One hospital: its SuperNode, the app gate in front of its ClientApps, read-only data."""

    site_name: str
    superlink: str
    data_dir: Path
    root: Path = Path("/etc/fedbrats")
    work_dir: Path = Path("/var/lib/fedbrats")
    log_dir: Path = Path("/var/log/fedbrats")
    runtime_port: int = 9094
    user: str = "fedbrats"
    bin_dir: Path = Path("/usr/local/bin")

    def __post_init__(self) -> None:
        for path, what in ((self.data_dir, "data-dir"), (self.root, "the site's root"), (self.work_dir, "work-dir"),
                           (self.log_dir, "the log folder"), (self.bin_dir, "the bin folder")):  # fmt: skip
            _absolute(path, what)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.site_name):
            raise ValueError(f"site name {self.site_name!r}: expected 1-64 letters, digits, '.', '_' or '-'")
        if not re.fullmatch(r"[A-Za-z0-9.-]+:\d+", self.superlink):
            raise ValueError(f"superlink {self.superlink!r}: expected HOST:PORT (the coordinator's proxy)")

    @property
    def runtime_address(self) -> str:
        return f"127.0.0.1:{self.runtime_port}"

    def node_config(self) -> str:
        return f"data-dir='{self.data_dir}' site-name='{self.site_name}' work-dir='{self.work_dir}'"

    def supernode_command(self) -> list[str]:
        """flower-supernode through the proxy, with its key, starting no ClientApp itself (the gate does)."""
        return [
            str(self.bin_dir / "flower-supernode"),
            "--superlink", self.superlink,
            "--root-certificates", str(self.root / "ca.pem"),
            "--auth-supernode-private-key", str(self.root / "supernode_key"),
            "--node-config", self.node_config(),
            "--isolation", "process",
            "--port", str(self.runtime_port),
        ]  # fmt: skip

    def gate_command(self) -> list[str]:
        return [str(self.bin_dir / "fedbrats"), "deploy", "gate", "--runtime-api-address", self.runtime_address]

    def units(self) -> dict[str, str]:
        env = {**FLOWER_ENVIRONMENT, "FLWR_HOME": str(self.work_dir / "flwr-home"), "HOME": str(self.work_dir)}
        common = {"writable": [self.work_dir, self.log_dir], "readonly": [self.data_dir, self.root]}
        node = unit(
            f"FedBraTS SuperNode of {self.site_name}", self.user,
            logged(self.bin_dir, self.log_dir / "supernode.log", self.supernode_command()), env, **common,
            extra=["Wants=fedbrats-gate.service"],
        )  # fmt: skip
        gate = unit(
            f"FedBraTS app gate of {self.site_name} (runs only FedBraTS apps)", self.user,
            logged(self.bin_dir, self.log_dir / "site.log", self.gate_command()), env, **common,
            after=["fedbrats-supernode.service"], extra=["BindsTo=fedbrats-supernode.service"],
        )  # fmt: skip
        return {"fedbrats-supernode.service": node, "fedbrats-gate.service": gate}

    def files(self) -> dict[str, str]:
        """Path under `root` -> text: the units, for `systemctl link`."""
        return {f"systemd/{name}": text for name, text in self.units().items()}


def exec_start(unit_text: str) -> list[str]:
    """The command line of a unit's ExecStart= (what systemd runs; the tests run exactly this)."""
    import shlex

    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise ValueError("the unit has no ExecStart= line")


def logged(bin_dir: Path, log_file: Path, command: list[str]) -> list[str]:
    return [str(bin_dir / "fedbrats"), "deploy", "log", str(log_file), "--", *command]


def _quote(arg: str) -> str:
    """One systemd ExecStart argument (systemd splits on spaces and honours double quotes)."""
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit(description: str, user: str, command: list[str], env: dict[str, str], *, writable: list[Path],
         readonly: list[Path] = (), after: list[str] = (), extra: list[str] = ()) -> str:  # fmt: skip
    """A hardened service: unprivileged user, read-only system, restart on failure, the whole group stopped."""
    after_line = " ".join(["network-online.target", *after])
    unit_lines = [line for line in extra if line.split("=")[0] in ("Wants", "BindsTo")]
    service_extra = [line for line in extra if line not in unit_lines]
    lines = [
        "# Written by `fedbrats deploy`; see docs/deploy.md.",
        "[Unit]", f"Description={description}", f"After={after_line}", "Wants=network-online.target", *unit_lines,
        "", "[Service]", "Type=simple", f"User={user}", f"Group={user}",
        *[f"Environment={key}={value}" for key, value in env.items()],
        "ExecStart=" + " ".join(_quote(a) for a in command),
        "Restart=on-failure", "RestartSec=10s",
        # the ServerApp/ClientApps are children in their own sessions: stop them all, and do not wait forever
        "KillMode=control-group", "TimeoutStopSec=30s",
        "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=strict", "ProtectHome=read-only",
        "RestrictSUIDSGID=yes", "UMask=0027",
        "ReadWritePaths=" + " ".join(str(p) for p in writable),
        *(["ReadOnlyPaths=" + " ".join(str(p) for p in readonly)] if readonly else []),
        *service_extra,
        "", "[Install]", "WantedBy=multi-user.target", "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_files(files: dict[str, str], root: Path) -> list[Path]:
    """Write each file under `root` (folders made as needed); return the paths."""
    from fedbrats.shared.atomic import atomic_write_text

    written = []
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_text(root / name, text))
    return written


def timestamped(line: str) -> str | None:
    """A log line with the local time in front, colours stripped; None for Flower's empty spacer lines."""
    text = _ANSI.sub("", line).rstrip()
    if not text.strip() or _EMPTY_FLOWER_LINE.fullmatch(text):
        return None
    return f"{datetime.now().astimezone().isoformat(timespec='milliseconds')} {text}"


def run_logged(log_file: Path, command: list[str]) -> int:
    """Run `command`, appending each output line with a timestamp to `log_file` (and to stdout for journald).

    SIGTERM/SIGINT are passed on to the command and the log is kept until it exits, so its last
    lines (why it stopped) are not lost.
    """
    if not command:
        raise ValueError("fedbrats deploy log: no command after --")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,  # noqa: S603
                            text=True, errors="replace", bufsize=1)  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    with open(log_file, "a", encoding="utf-8") as log:
        for line in proc.stdout:
            stamped = timestamped(line)
            if stamped is None:
                continue
            log.write(stamped + "\n")
            log.flush()
            print(stamped, flush=True)
    return proc.wait()
