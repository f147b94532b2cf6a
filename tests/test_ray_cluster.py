"""`fedbrats simulate --ray-address`: the sites run on an existing Ray cluster, not a private Ray instance.

Starts a one-node cluster with `ray start --head` on 127.0.0.1 (as docs/scale.md tells a user to on
every machine), runs a one-round federation on it and stops the cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedbrats.simulations.simulate import free_port

pytestmark = pytest.mark.slow

TINY = ["--preset", "demo", "--set", "model-width=8", "--set", "model-depth=2", "--set", "patch-size=16",
        "--set", "phantom-voxel-size=6", "--set", "val-fraction=0.34", "--set", "cache=memory"]  # fmt: skip


def _ray() -> str:
    found = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(found).exists():
        pytest.skip("the ray command is not installed")
    return found


def _wait_for(port: int, head: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start --head exited with {head.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise AssertionError(f"the Ray head did not listen on 127.0.0.1:{port} within {seconds} s")


def _drivers(temp: str) -> list[Path]:
    """Drivers that joined the cluster: Ray writes one core-driver log per `ray.init()` into its session."""
    return list(Path(temp).glob("session_*/logs/python-core-driver-*.log"))


def test_simulate_joins_an_existing_ray_cluster(tmp_path):
    ray, port = _ray(), free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX's 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # --block keeps the head in the foreground: stopping its process group stops this cluster only
    # (`ray stop` would stop every Ray instance of the user, other simulations' included).
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--temp-dir", temp],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(port, head)
        assert not _drivers(temp)
        out = tmp_path / "run"
        run = subprocess.run(
            [sys.executable, "-m", "fedbrats", "simulate", "--sites", "2", "--rounds", "1", "--out", str(out),
             "--ray-address", f"127.0.0.1:{port}", *TINY],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert (out / "global_model.safetensors").exists()
        assert _drivers(temp), "no Ray driver joined the cluster: the sites ran elsewhere"
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
