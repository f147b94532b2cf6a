"""The hospital's app gate: a SuperNode that runs FedBraTS and nothing else.

A Flower run ships an app (a FAB) that every SuperNode executes. Flower's own app verification
(`flower-supernode --trusted-entities`) accepts only FABs signed by Flower's hub, which needs the
internet and refuses every app submitted with `flwr run`, so it cannot serve an offline
consortium. The gate is the allow-list instead: the SuperNode runs with `--isolation process`
(it starts no ClientApp itself), and `fedbrats deploy gate` takes its ClientApp tasks from the
SuperNode's local runtime API and starts each in a process that refuses the task before anything
from the FAB is installed or imported, unless the FAB is a FedBraTS app folder: only
`pyproject.toml`, whose components are FedBraTS's installed ServerApp and ClientApp. With no code
in the FAB, what runs is the FedBraTS version the hospital's IT installed. A refused task
answers the server with an error reply naming the reason (the round records the site as dropped).

Each task still runs in a process of its own, but on Unix the gate forks it from a fork server that has
imported the ClientApp's modules once (`fedbrats.client.preload`, `PRELOAD`): a fresh interpreter paid
those imports on every message. `--no-preload` (and platforms without fork) start a fresh interpreter.
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing
import os
import subprocess
import sys
import time
import tomllib
import zipfile

#: the files a FedBraTS app folder may hold once Flower has built it into a FAB
ALLOWED_FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
#: seconds between two polls of the SuperNode's runtime API (Flower's SuperExec default)
POLL_SECONDS = 1.0

#: what the fork server imports once: the site's code and Flower's ClientApp runtime (`run_gated_clientapp`)
PRELOAD = ("fedbrats.client.preload", "flwr.cli.install", "flwr.supernode.cli.flwr_clientapp",
           "flwr.supernode.runtime.run_clientapp")  # fmt: skip

log = logging.getLogger("fedbrats.gate")


class AppRefused(RuntimeError):
    """A FAB that is not a FedBraTS app folder; the message says why."""


def fedbrats_components() -> dict[str, str]:
    """The components of the app `fedbrats deploy app` writes (one source: `app_pyproject`)."""
    from fedbrats.shared.config import RunConfig
    from fedbrats.simulations.simulate import app_pyproject

    return dict(tomllib.loads(app_pyproject(RunConfig()))["tool"]["flwr"]["app"]["components"])


def check_fab(fab: bytes) -> dict[str, str]:
    """Refuse (AppRefused) a FAB that is not a FedBraTS app folder; return its run config."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        names = set(archive.namelist())
    except zipfile.BadZipFile as err:
        raise AppRefused(f"the app is not a FAB (zip archive): {err}") from None
    extra = sorted(names - ALLOWED_FAB_FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise AppRefused(f"the app carries files other than pyproject.toml ({shown}); FedBraTS apps carry no code")
    if "pyproject.toml" not in names:
        raise AppRefused("the app has no pyproject.toml")
    try:
        project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise AppRefused(f"the app's pyproject.toml is not valid TOML: {err}") from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components, expected = app.get("components", {}), fedbrats_components()
    if components != expected:
        raise AppRefused(f"the app's components are {components}, a FedBraTS app has {expected}")
    return dict(app.get("config", {}))


def run_gated_clientapp() -> None:
    """Flower's `flwr-clientapp` (same arguments), with the FAB checked before Flower installs it."""
    from flwr.cli.install import install_from_fab
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    def checked_install(fab_content, *args, **kwargs):
        try:
            check_fab(bytes(fab_content))
        except AppRefused as err:
            log.error("refused the run's app: %s", err)
            raise
        return install_from_fab(fab_content, *args, **kwargs)

    runtime.install_from_fab = checked_install  # the one call between pulling the task and loading its code
    flwr_clientapp()


class ClientAppStarter:
    """Starts one gated ClientApp process per task: forked from the preloaded fork server, or a fresh interpreter."""

    def __init__(self, *, preload: bool = True) -> None:
        self.context = None
        if preload and "forkserver" in multiprocessing.get_all_start_methods():
            from multiprocessing import forkserver

            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(list(PRELOAD))
            started = time.monotonic()
            forkserver.ensure_running()  # the imports are paid here, before the first task, not by it
            log.info("app gate: ClientApps fork from a server that imported %s (%.1f s)", ", ".join(PRELOAD),
                     time.monotonic() - started)  # fmt: skip

    def start(self, argv: list[str]) -> multiprocessing.process.BaseProcess | subprocess.Popen:
        """A running ClientApp process for `argv` (`flwr-clientapp`'s arguments)."""
        if self.context is None:
            return subprocess.Popen([sys.executable, "-m", "fedbrats.app_gate", *argv])  # noqa: S603 - our own module
        process = self.context.Process(target=forked_clientapp, args=(argv,), name="clientapp")
        process.start()
        return process

    @staticmethod
    def running(process: multiprocessing.process.BaseProcess | subprocess.Popen) -> bool:
        """Whether `process` still runs (a finished one is reaped)."""
        return process.poll() is None if isinstance(process, subprocess.Popen) else process.is_alive()


def forked_clientapp(argv: list[str]) -> None:
    """A forked ClientApp process: `python -m fedbrats.app_gate ARGV` without the interpreter's start-up."""
    site_logging()
    sys.argv = ["flwr-clientapp", *argv]
    try:
        run_gated_clientapp()
    finally:
        atexit._run_exitfuncs()  # a forked process leaves through os._exit, which runs no exit handler


def serve(runtime_api_address: str, *, poll_seconds: float = POLL_SECONDS, preload: bool = True) -> None:
    """Take the SuperNode's ClientApp tasks and start each as a gated ClientApp process (Flower's SuperExec loop)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )  # fmt: skip
    log.info("app gate: taking ClientApp tasks from %s; only FedBraTS apps run", runtime_api_address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[])
    starter = ClientAppStarter(preload=preload)
    running: list = []
    try:
        while True:
            running = [proc for proc in running if starter.running(proc)]  # reap finished ClientApps
            reply = client.AcquireTask(request)
            if reply.HasField("task") and reply.token:
                argv = ["--runtime-api-address", runtime_api_address, "--token", reply.token, "--insecure",
                        "--parent-pid", str(os.getpid())]  # fmt: skip
                log.info("app gate: task %d of run %d", reply.task.task_id, reply.task.run_id)
                running.append(starter.start(argv))
            time.sleep(poll_seconds)
    finally:
        client.close()


def site_logging() -> None:
    """Our INFO lines (the gate's, a site's summary per message) reach the site log; `fedbrats deploy log` adds
    the time. Flower's logger keeps its own handler (no doubled lines); httpx's line per poll is left out."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


if __name__ == "__main__":
    site_logging()
    run_gated_clientapp()
