"""`fedbrats simulate`: the ServerApp and ClientApp on Flower's simulation engine, one virtual site per partition.

We take Flower's supported path, ``flwr run APP --federation-config num-supernodes=N --stream``,
because it is the one that hands the run config to every ClientApp (the deprecated
``run_simulation`` leaves ``context.run_config`` empty). The run's resolved configuration is
written into a generated app folder, so the ServerApp and each site read exactly what was asked.
Flower's home (``FLWR_HOME``) lives inside the run folder and the local SuperLink it starts is
stopped when the run ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedbrats.server.history import read_history
from fedbrats.shared.atomic import atomic_write_text
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.partition import read_partition
from fedbrats.shared.dp_recipe import recipe_notes

console = Console()
PACKAGES = ("fedbrats", "flwr", "torch", "monai", "opacus", "numpy")

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_pyproject(config: RunConfig) -> str:
    """A Flower app manifest whose run config is exactly `config` (one schema: `RunConfig`)."""
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedbrats-run"',
        'version = "1.0.0"',
        'description = "A FedBraTS run"',
        'license = "Apache-2.0"',
        'dependencies = ["fedbrats"]',
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedbrats"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedbrats.server.app:app"',
        'clientapp = "fedbrats.client.app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.to_flower().items()]
    return "\n".join(lines) + "\n"


def phantom_for(config: RunConfig, sites: int) -> Path:
    """The default dataset: a phantom generated once per (seed, sites, voxel size) and cached."""
    from fedbrats.shared.data.phantom import generate_phantom

    cache = Path(os.environ.get("FEDBRATS_CACHE", Path.home() / ".cache" / "fedbrats"))
    from fedbrats.shared.data.phantom.sites import GENERATOR_VERSION

    # the generator's version in the name: a newer generator never reuses an older one's cases
    root = cache / "phantom" / f"seed{config.seed}-sites{sites}-{config.phantom_voxel_size:g}mm-v{GENERATOR_VERSION}"
    if not (root / "partitioning_1.csv").is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        console.print(f"generating the phantom dataset in {root} (cached for later runs)")
        generate_phantom(tmp, sites=sites, voxel_size=config.phantom_voxel_size, seed=config.seed, progress=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


def stop_local_superlink(flwr_home: Path) -> None:
    """Stop the SuperLink that `flwr run` started under this run's FLWR_HOME, with everything it runs.

    Every process of the run inherits FLWR_HOME: the SuperLink, its executor (`flower-superexec`), the
    federation itself (`flwr-simulation`), its Ray instance and the sites. All of them are stopped:
    when the SuperLink declares a run over while the federation still runs (it does so when it misses
    the task's heartbeats on an overloaded machine), the federation would otherwise go on writing into
    the run folder beside the next run or a resume."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL for what ignores or outlives SIGTERM
        left = _run_processes(flwr_home)
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _run_processes(flwr_home)
        if not left:
            return


#: How long the processes of a stopped run get to exit on SIGTERM before they are killed.
STOP_GRACE_SECONDS = 10.0


def _run_processes(flwr_home: Path) -> list[int]:
    """Live (not zombie) processes whose environment names this run's FLWR_HOME, this one excepted."""
    marker, found = f"FLWR_HOME={flwr_home}".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and int(proc.name) != os.getpid():
                if (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


#: Flower gives the local SuperLink it starts 15 s, too little on a loaded machine (the run then fails
#: before round 1); we start it first, through Flower's own launcher, with this much time.
SUPERLINK_START_SECONDS = 180.0
_START_SUPERLINK = (
    "import sys, flwr.cli.local_superlink as link; "
    "link.LOCAL_SUPERLINK_STARTUP_TIMEOUT = float(sys.argv[1]); link._start_local_superlink()"
)


def start_local_superlink(env: dict[str, str], cwd: Path) -> str:
    """Start the run's local SuperLink (`flwr run` then finds it running); its output for the log.

    Uses Flower's private launcher: when a Flower release lacks it, `flwr run` starts the SuperLink
    itself as before, so the worst case is Flower's own behaviour."""
    done = subprocess.run([sys.executable, "-c", _START_SUPERLINK, str(SUPERLINK_START_SECONDS)],
                          env=env, cwd=cwd, capture_output=True, text=True)  # fmt: skip
    return done.stdout + done.stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RoundNote = Callable[[int], str]


@dataclass(frozen=True)
class Engine:
    """Where the simulated sites run: the GPU share of each site, and an existing Ray cluster to join
    (`ray start --head` on the machines; None starts a private Ray instance on this machine)."""

    gpus_per_site: float = 0.0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.gpus_per_site <= 1:
            raise ValueError(f"--gpus-per-site must be in [0, 1] (a share of one GPU), got {self.gpus_per_site}")
        if self.ray_address is not None and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}|auto", self.ray_address):
            raise ValueError(f"--ray-address must be HOST:PORT of a Ray head (or 'auto'), got {self.ray_address!r}")

    def environment(self) -> dict[str, str]:
        """Environment of `flwr run`: Flower's Ray backend calls `ray.init()`, which joins RAY_ADDRESS.

        Without an address Ray would join the latest cluster `ray start` left on this machine (and an
        inherited RAY_ADDRESS): "local" keeps a simulation without `--ray-address` on its own instance."""
        return {"RAY_ADDRESS": self.ray_address or "local"}


#: This machine, no GPU: the default engine.
LOCAL = Engine()


def run_flower(
    app_dir: Path,
    out: Path,
    sites: int,
    *,
    cpus_per_site: float,
    engine: Engine,
    rounds: int,
    round_note: RoundNote | None = None,
) -> int:
    """Run the app on the simulation engine, showing one progress step and one line per round.

    `round_note(round)` is appended to each round's line (a comparison adds its own time left).
    """
    flwr_home = out / ".flwr"
    # Flower's local SuperLink listens on fixed ports (39091, 39093) unless told otherwise: a second
    # simulation would silently submit its run to the first one's SuperLink. Each run gets its own.
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        **engine.environment(),
    }
    federation = (
        f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site:g} "
        f"client-resources-num-gpus={engine.gpus_per_site:g}"
    )
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    command = [flwr, "run", str(app_dir), "--federation-config", federation, "--stream"]
    log_path = out / "flower.log"
    round_line = re.compile(r"round (\d+)/(\d+) \[")
    started = time.monotonic()
    with open(log_path, "w") as log, Progress(
        TextColumn("[bold]federation"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("rounds", total=rounds)
        shown: set[int] = set()
        proc: subprocess.Popen | None = None
        try:  # from the SuperLink's start on: whatever stops us (error, Ctrl-C, SIGTERM) stops it too
            log.write(start_local_superlink(env, out))
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    cwd=out)  # fmt: skip
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                clean = re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
                match = round_line.search(clean)
                if match and int(match.group(1)) not in shown:  # Flower may relay a log line twice
                    shown.add(int(match.group(1)))
                    progress.update(task, completed=int(match.group(1)))
                    note = f" | {round_note(int(match.group(1)))}" if round_note else ""
                    progress.console.print(escape(clean[clean.index("round") :] + note))
                elif "ERROR" in clean or "Traceback" in clean or "dropped update" in clean:
                    progress.console.print(f"[red]{escape(clean)}")
            code = proc.wait()
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
            stop_local_superlink(flwr_home)
    console.print(f"Flower finished in {time.monotonic() - started:.1f} s (full log: {log_path})")
    return code


def prepare_data(config: RunConfig, data: Path | None, partition: Path | None, sites: int | None) -> tuple[Path, Path]:
    """The dataset and partition to simulate: given ones, or the cached phantom split by institution."""
    if data is None:
        data = phantom_for(config, sites or 4)
    elif not data.is_dir():
        raise ValueError(f"--data {data} is not a folder")
    partition = partition or data / "partitioning_1.csv"
    if not partition.is_file():
        raise ValueError(f"no partition CSV: {partition} does not exist (make one with `fedbrats data partition`)")
    return data, partition


def package_versions() -> dict[str, str]:
    """Python and package versions, plus the commit of this source tree (the code the runs imported)."""
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    root = Path(__file__).resolve().parents[1]
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout
        versions["fedbrats-source"] = f"{root} @ {commit}" + (
            " (with uncommitted changes)" if dirty.strip() else ""
        )
        versions["fedbrats-commit"] = commit[:7] + ("+changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        versions["fedbrats-source"] = str(root)
    return versions



def with_absolute_files(config: RunConfig) -> RunConfig:
    """`init-checkpoint` (and a `labels` file found here) as absolute paths, checked before Flower starts.

    A simulated federation's ServerApp and sites run in another folder: a path relative to the user's
    would otherwise fail there, and only in flower.log. A `labels` path not found here stays as given
    (it may be relative to the data folder, `shared.tasks`)."""
    changes: dict[str, str] = {}
    if config.init_checkpoint:
        path = Path(config.init_checkpoint).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"init-checkpoint {config.init_checkpoint}: no such file ({path}); expected a "
                                    ".safetensors checkpoint of fedbrats (`train`: RUN_DIR/checkpoint.safetensors; a "
                                    "federation: RUN_DIR/global_model.safetensors)")  # fmt: skip
        changes["init_checkpoint"] = str(path)
    if config.labels and Path(config.labels).expanduser().is_file():
        changes["labels"] = str(Path(config.labels).expanduser().resolve())
    return config.replace(**changes)


def simulate(
    config: RunConfig,
    data: Path,
    partition: Path,
    out: Path,
    *,
    engine: Engine = LOCAL,
    round_note: RoundNote | None = None,
) -> bool:
    """Run (or resume) one simulated federation into `out`; True when every round completed."""
    sites = len(read_partition(partition).sites)
    out = out.resolve()
    config = with_absolute_files(config).replace(
        data_dir=str(data.resolve()),
        partition=str(partition.resolve()),
        out_dir=str(out),
        min_sites=min(config.min_sites, sites),
    )
    from fedbrats.shared.tasks import with_label_classes  # torch: only once the run is really starting

    config = with_label_classes(config)  # a classifying task: every site numbers the classes alike
    app_dir = out / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    from fedbrats.server.state import load_state

    # A run may be resumed with newer code: every start records what it ran with.
    before = load_state(out / "server")
    start = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "from_round": before.round if before else 0}
    with open(out / "sources.jsonl", "a") as sources:
        sources.write(json.dumps({**start, "versions": package_versions()}) + "\n")
    atomic_write_text(app_dir / "pyproject.toml", app_pyproject(config))
    console.print(
        f"simulating {sites} sites, {config.rounds} rounds of {config.strategy} "
        f"(model {config.model} width {config.model_width}, patch {config.patch_size}) -> {out}"
    )
    for note in recipe_notes(config):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    code = run_flower(
        app_dir,
        out,
        sites,
        cpus_per_site=float(os.cpu_count() or 1),
        engine=engine,
        rounds=config.rounds,
        round_note=round_note,
    )
    state = load_state(out / "server")
    if code != 0 or state is None or state.round < config.rounds:
        done = 0 if state is None else state.round
        console.print(
            f"[red]the federation stopped after {done} of {config.rounds} rounds; see {out / 'flower.log'} "
            f"and {out / '.flwr' / 'local-superlink' / 'superlink.log'}. Run the same command with --out {out} to resume."
        )
        return False
    failure = untrained(read_history(out / "history.jsonl"))
    if failure:
        console.print(f"[red]the federation did not train: {escape(failure)}. See {out / 'flower.log'}.")
        return False
    return True


def untrained(history: list[dict]) -> str | None:
    """Why a finished federation never changed the global model (no round aggregated), else None.

    Every round "failing" still completes and checkpoints, so a run over sites without usable cases
    would otherwise look finished. The reason names the first failed round and its sites' replies.
    """
    if any(record.get("status") == "ok" for record in history):
        return None
    if not history:
        return "no round was recorded"
    first = history[0]
    replies = "; ".join(f"{t.get('site')}: {t['dropped']}" for t in first.get("train", []) if t.get("dropped"))
    return (
        f"all {len(history)} round(s) failed, round {first.get('round')}: {first.get('status', 'no status')}"
        + (f" ({replies})" if replies else "")
    )


def run_simulate(config: RunConfig, data: Path, partition: Path, out: Path, *, engine: Engine = LOCAL) -> int:
    """Run (or resume) the federation, then its final evaluation and report; exit status 0, or 1 when it
    did not run or train. `holdout-site` trains without that site and scores the model there."""
    from fedbrats.simulations.final_evaluation import EXTERNAL, final_evaluation
    from fedbrats.simulations.holdout import split_holdout

    site = config.holdout_site
    if site:
        partition, external = split_holdout(partition, site, out.resolve())
    if not simulate(config, data, partition, out, engine=engine):
        return 1
    from fedbrats.simulations.report import write_report

    scored = config.replace(data_dir=str(data.resolve()), partition=str(partition.resolve()))
    if config.final_evaluation:
        console.print("final evaluation: the global model on every site's validation cases (fedbrats evaluate)")
        final_evaluation(out, scored)
    if site:
        console.print(f"external site {site}: the global model on every one of its cases (left out of training)")
        final_evaluation(out, scored.replace(partition=str(external)), split="all", name=EXTERNAL,
                         title=f"External site {site} (left out of training)")  # fmt: skip
    report = write_report(out)
    console.print(f"report: {report}\nglobal model: {out / 'global_model.safetensors'}")
    return 0
