"""A real FedBraTS deployment on 127.0.0.1 for tests: a TLS SuperLink, SuperNodes, `flwr run`.

The simulation engine hides the parts that break in a hospital (certificates, ports, node
config, a SuperNode that disappears), so these helpers start the real processes exactly as
docs/deploy.md tells an administrator to. Every process starts in its own session and is
stopped with all its descendants when the `Deployment` context exits, on failure too: a test
must never leave a SuperLink or a ClientApp behind. Plain module, not a conftest.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedbrats.deploy import Coordinator, Site, default_bin_dir, exec_start, write_files
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.partition import read_partition
from fedbrats.simulations.simulate import FLOWER_ENV, app_pyproject
from tests.deployment_tls import TlsFiles, make_node_keys, make_tls

__all__ = ["Deployment", "TlsFiles", "make_node_keys", "make_tls", "write_connection"]

HOST = "127.0.0.1"
CONNECTION = "fedbrats-test"
FLOWER_COMMANDS = ("flower-superlink", "flower-supernode", "flwr")
NGINX = "/usr/sbin/nginx"  # what the proxy unit of `fedbrats deploy coordinator` runs


def missing_flower() -> str | None:
    """Why a deployment cannot run here (a Flower command not on PATH, or no nginx for the proxy), or None."""
    missing = [c for c in FLOWER_COMMANDS if shutil.which(c) is None]
    if missing:
        return f"not on PATH: {', '.join(missing)} (install flwr: pip install -e .)"
    if not Path(NGINX).is_file():
        return f"no {NGINX} for the documented Fleet proxy (apt-get install nginx)"
    return None


def free_port(taken: Iterable[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (and not one we already handed out)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in set(taken):
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection, the default (how `flwr run` finds a remote SuperLink)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{Path(root_certificates).resolve()}"\n'
    )
    return path


def site_folders(dataset: Path, out: Path, names: Iterable[str]) -> dict[str, Path]:
    """Copy each partition of `dataset` (its partitioning_1.csv) into its own folder, as a hospital holds only its cases."""
    partition = read_partition(Path(dataset) / "partitioning_1.csv")
    names = list(names)
    if len(names) > len(partition.sites):
        raise ValueError(f"{len(names)} site names but the partition has {len(partition.sites)} sites")
    folders = {}
    for name, subjects in zip(names, partition.sites.values(), strict=False):
        folder = Path(out) / name
        for subject in subjects:
            shutil.copytree(Path(dataset) / subject, folder / subject)
        folders[name] = folder
    return folders


# --- processes --------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Flower's SuperExec starts in a session of its own, so a process group is not enough)."""
    children = _children()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_processes(pids: Iterable[int], grace: float = 5.0) -> None:
    """SIGTERM, wait at most `grace` seconds, then SIGKILL whatever is left."""
    pids = list(pids)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.1)
    _signal_all([p for p in pids if is_alive(p)], signal.SIGKILL)


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass
class RunResult:
    returncode: int | None
    seconds: float
    log: str
    timed_out: bool


class DeploymentError(RuntimeError):
    pass


class Deployment:
    """A TLS SuperLink and SuperNodes on 127.0.0.1 under `root`; a context manager that always cleans up."""

    def __init__(
        self, root: Path, *, node_auth: bool = False, node_env: dict[str, str] | None = None, documented: bool = False
    ) -> None:
        """`documented`: the topology `fedbrats deploy coordinator|site` writes (docs/deploy.md): the SuperLink on
        127.0.0.1 behind the nginx Fleet proxy, node authentication, SuperNodes behind the app gate, every
        process started with its unit's ExecStart line."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.documented = documented
        self.node_auth = node_auth or documented
        self.coordinator: Coordinator | None = None
        self.connection = "fedbrats" if documented else CONNECTION
        self.public_port: int | None = None
        self.node_env = dict(node_env or {})
        self.tls = make_tls(self.root / "tls")
        self.processes: list[Managed] = []
        self.supernodes: dict[str, Managed] = {}
        self.ports: list[int] = []
        self.port: int | None = None
        self.cli_home = self.root / "coordinator-flwr-home"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- plumbing ---------------------------------------------------------------------------
    def env(self, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1", **(extra or {})}

    def spawn(self, name: str, command: list[str], *, home: Path, extra_env: dict[str, str] | None = None) -> Managed:
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(home, extra_env), cwd=self.root, start_new_session=True,
            )  # fmt: skip
        managed = Managed(name, proc, log)
        self.processes.append(managed)
        return managed

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The `flwr` CLI as the coordinator runs it (its FLWR_HOME holds the connection)."""
        return subprocess.run(
            ["flwr", *args], capture_output=True, text=True, env=self.env(self.cli_home), cwd=self.root, timeout=timeout
        )

    # --- the coordinator -------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60) -> float:
        """Start the SuperLink with TLS and a database; return the seconds until its port accepts connections."""
        self.port = free_port(self.ports)
        self.ports.append(self.port)
        if self.documented:
            return self._start_documented_coordinator(timeout)
        command = [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.tls.ca),
            "--ssl-certfile", str(self.tls.cert),
            "--ssl-keyfile", str(self.tls.key),
            "--database", str(self.root / "superlink" / "state.db"),
            "--host", HOST,
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if self.node_auth:
            command.append("--enable-supernode-auth")
        (self.root / "superlink").mkdir(exist_ok=True)
        started = time.monotonic()
        link = self.spawn("superlink", command, home=self.root / "superlink" / "flwr-home")
        while True:
            if link.proc.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with {link.proc.returncode}:\n{link.tail()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() - started > timeout:
                    raise DeploymentError(f"flower-superlink not listening after {timeout} s:\n{link.tail()}") from None
                time.sleep(0.1)
        seconds = time.monotonic() - started
        write_connection(self.cli_home, CONNECTION, f"{HOST}:{self.port}", self.tls.ca)
        return seconds

    def _wait_listening(self, managed: Managed, port: int, timeout: float, started: float) -> float:
        while True:
            if managed.proc.poll() is not None:
                raise DeploymentError(f"{managed.name} exited with {managed.proc.returncode}:\n{managed.tail()}")
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return time.monotonic() - started
            except OSError:
                if time.monotonic() - started > timeout:
                    raise DeploymentError(f"{managed.name} not listening after {timeout} s:\n{managed.tail()}") from None
                time.sleep(0.1)

    def _start_documented_coordinator(self, timeout: float) -> float:
        """`fedbrats deploy coordinator`'s files, then its two units' ExecStart lines: SuperLink, then proxy."""
        self.public_port = free_port(self.ports)
        self.ports.append(self.public_port)
        c = Coordinator("localhost", root=self.root / "coordinator", public_port=self.public_port, listen=HOST,
                        superlink_port=self.port, user="nobody", bin_dir=default_bin_dir())  # fmt: skip
        self.coordinator = c
        write_files(c.files(), c.root)
        for folder in (c.certs, c.logs, c.root / "superlink", c.root / "runs"):
            folder.mkdir(parents=True, exist_ok=True)
        for name in ("ca.pem", "server.pem", "server.key"):
            shutil.copy2(getattr(self.tls, {"ca.pem": "ca", "server.pem": "cert", "server.key": "key"}[name]), c.certs / name)
        self.cli_home = c.root / "flwr-cli"
        units = c.units()
        started = time.monotonic()
        link = self.spawn("superlink", exec_start(units["fedbrats-superlink.service"]), home=c.root / "superlink" / "flwr-home")
        seconds = self._wait_listening(link, self.port, timeout, started)
        proxy = self.spawn("proxy", exec_start(units["fedbrats-proxy.service"]), home=c.root / "superlink" / "flwr-home")
        self._wait_listening(proxy, self.public_port, timeout, time.monotonic())
        return seconds

    def register(self, public_keys: dict[str, Path], timeout: float = 60) -> None:
        """`flwr supernode register KEY CONNECTION --name NAME` for each hospital's public key (concurrently)."""
        running = {
            name: subprocess.Popen(
                ["flwr", "supernode", "register", str(key), self.connection, "--name", name],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env(self.cli_home), cwd=self.root,
            )  # fmt: skip
            for name, key in public_keys.items()
        }
        failed = []
        for name, proc in running.items():
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"{name} ({proc.returncode}): {output[-2000:]}")
        if failed:
            raise DeploymentError("flwr supernode register failed for " + "\n".join(failed))

    # --- the hospitals ---------------------------------------------------------------------
    def start_supernodes(self, data_dirs: dict[str, Path]) -> dict[str, Managed]:
        """One SuperNode per hospital, its data folder and site name in its node config (and its key registered)."""
        if self.port is None:
            raise DeploymentError("start the SuperLink first")
        keys = {}
        if self.node_auth:
            keys = {name: make_node_keys(self.root / name / "keys", "supernode_key") for name in data_dirs}
            self.register({name: public for name, (_, public) in keys.items()})
        if self.documented:
            for name, data_dir in data_dirs.items():
                self._start_documented_site(name, Path(data_dir), keys[name][0])
            return {name: self.supernodes[name] for name in data_dirs}
        for name, data_dir in data_dirs.items():
            home = self.root / name
            port = free_port(self.ports)
            self.ports.append(port)
            node_config = f"data-dir='{Path(data_dir).resolve()}' site-name='{name}' work-dir='{home / 'work'}'"
            command = [
                "flower-supernode",
                "--superlink", f"{HOST}:{self.port}",
                "--root-certificates", str(self.tls.ca),
                "--node-config", node_config,
                "--port", str(port),
            ]  # fmt: skip
            if self.node_auth:
                command += ["--auth-supernode-private-key", str(keys[name][0])]
            self.supernodes[name] = self.spawn(name, command, home=home / "flwr-home", extra_env=self.node_env)
        return {name: self.supernodes[name] for name in data_dirs}

    def _start_documented_site(self, name: str, data_dir: Path, private_key: Path) -> None:
        """`fedbrats deploy site`'s units at one hospital: the SuperNode (via the proxy) and its app gate."""
        home = self.root / name
        port = free_port(self.ports)
        self.ports.append(port)
        site = Site(name, f"localhost:{self.public_port}", data_dir.resolve(), root=home / "etc", work_dir=home / "work",
                    log_dir=home / "log", runtime_port=port, user="nobody", bin_dir=default_bin_dir())  # fmt: skip
        write_files(site.files(), site.root)
        shutil.copy2(self.tls.ca, site.root / "ca.pem")
        shutil.copy2(private_key, site.root / "supernode_key")
        units = site.units()
        env = {**self.node_env, "FLWR_HOME": str(site.work_dir / "flwr-home")}
        self.supernodes[name] = self.spawn(name, exec_start(units["fedbrats-supernode.service"]), home=home, extra_env=env)
        self.spawn(f"{name}-gate", exec_start(units["fedbrats-gate.service"]), home=home, extra_env=env)

    def wait_connected(self, names: Iterable[str] | None = None, timeout: float = 60) -> float:
        """Wait until each SuperNode logged its node id (registered and activated at the SuperLink)."""
        names = list(names or self.supernodes)
        started = time.monotonic()
        while True:
            waiting = [n for n in names if "SuperNode ID:" not in self.supernodes[n].log_text()]
            if not waiting:
                return time.monotonic() - started
            for n in waiting:
                if self.supernodes[n].proc.poll() is not None:
                    raise DeploymentError(f"SuperNode {n} exited:\n{self.supernodes[n].tail()}")
            if time.monotonic() - started > timeout:
                raise DeploymentError(
                    f"SuperNodes {waiting} not connected after {timeout} s:\n{self.supernodes[waiting[0]].tail()}"
                )
            time.sleep(0.2)

    def kill_supernode(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop a hospital abruptly (SIGKILL: a crash or a cut cable) with its SuperExec and ClientApps."""
        _signal_all(process_tree(self.supernodes[name].proc.pid), sig)
        self.supernodes[name].proc.wait(timeout=10)

    # --- a run ---------------------------------------------------------------------------------
    def run(self, config: RunConfig, *, timeout: float, poll: Callable[[], None] | None = None) -> RunResult:
        """`flwr run APP CONNECTION --stream` with an app folder whose run config is `config`; bounded by `timeout`."""
        app_dir = self.root / "app"
        app_dir.mkdir(exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(config))
        return self.run_app(app_dir, timeout=timeout, poll=poll)

    def run_app(self, app_dir: Path, *, timeout: float, poll: Callable[[], None] | None = None) -> RunResult:
        """`flwr run APP_DIR CONNECTION --stream` for any app folder, as the coordinator types it."""
        started = time.monotonic()
        run = self.spawn("flwr-run", ["flwr", "run", str(app_dir), self.connection, "--stream"], home=self.cli_home)
        timed_out = False
        while run.proc.poll() is None:
            if time.monotonic() - started > timeout:
                timed_out = True
                break
            if poll is not None:
                poll()
            time.sleep(0.5)
        if timed_out:
            stop_processes(process_tree(run.proc.pid))
            run.proc.wait(timeout=10)
        return RunResult(run.proc.returncode, time.monotonic() - started, run.log_text(), timed_out)

    def logs(self, lines: int = 30) -> str:
        """The end of every log, for a failing assertion's message."""
        return "\n".join(f"--- {m.name} ---\n{m.tail(lines)}" for m in self.processes)

    def stop(self) -> None:
        """Stop every process started here and all their descendants; safe to call twice."""
        pids: list[int] = []
        for managed in reversed(self.processes):
            if managed.proc.poll() is None:
                pids += process_tree(managed.proc.pid)
        stop_processes(dict.fromkeys(pids))
        for managed in self.processes:  # orphans left in a session whose leader already exited
            try:
                os.killpg(managed.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for managed in self.processes:
            try:
                managed.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                managed.proc.kill()
