"""Per-message overhead of a deployed site: Flower starts a fresh ClientApp process for every message.

R rounds of one site (5 mm phantom, 2 cases, the tiny model of bench_framework.py, disk cache as a
hospital keeps it); each message runs in a new Python process that imports `fedbrats.client.app`,
opens the site and handles the message. Overhead = the process's wall time minus the compute its reply
reports (train ``seconds`` + ``eval-seconds``). Round 1 (it fills the disk cache) is left out. Once with
a train and an evaluate message per round, once with evaluate-in-train (one message per round); each
both as a fresh interpreter (`fedbrats deploy gate --no-preload`, Flower's own SuperNode) and forked from
the app gate's fork server, which imported `fedbrats.app_gate.PRELOAD` once (the gate's default).

    python benchmarks/bench_site_message.py [--rounds 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.numpy import save_file

from fedbrats.app_gate import ClientAppStarter
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.models import create_model
from fedbrats.shared.records import model_to_record

SITE_MESSAGE = """
import json, sys, time
from pathlib import Path
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedbrats.client.app import handle_evaluate, handle_train
from fedbrats.shared.config import RunConfig
from safetensors.numpy import load_file
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
config, kind, rnd, weights, data = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
arrays = ArrayRecord({k: Array(v) for k, v in load_file(weights).items()})
settings = {"server-round": rnd, "run-key": "bench", "lr": 1e-3, "local-epochs": 1, "local-steps": 1}
if kind == "train-evaluate":
    settings["evaluate-incoming"] = True
msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(settings)}), dst_node_id=1,
              message_type="evaluate" if kind == "evaluate" else "train")
context = Context(1, 1, {"data-dir": data, "site-name": "1", "partition": data + "/partitioning_1.csv"},
                  RecordDict(), config)
reply = (handle_evaluate if kind == "evaluate" else handle_train)(msg, context)
assert not reply.has_error(), reply.error.reason
metrics = {**reply.content["metrics"], **(reply.content["evaluation"] if "evaluation" in reply.content else {})}
Path(sys.argv[6]).write_text(json.dumps({"compute": metrics.get("seconds", 0.0) + metrics.get("eval-seconds", 0.0)}))
"""


def run_deployed(config: RunConfig, rounds: int, work: Path) -> dict[str, dict[str, float]]:
    """Per-message seconds of a site whose every message is a fresh process (see the module docstring)."""
    data = generate_phantom(work / "phantom-deployed", sites=1, cases_per_site=2, voxel_size=5.0, seed=0, progress=False)
    weights = work / "weights.safetensors"
    save_file({n: a.numpy() for n, a in model_to_record(create_model(config.model, **config.model_config)).items()},
              str(weights))  # fmt: skip
    server = ClientAppStarter().context  # the gate's fork server, its imports paid here, before any message
    results = {}
    modes = (("train + evaluate", ("train", "evaluate")), ("evaluate-in-train", ("train-evaluate",)))
    starts = (False, True) if server is not None else (False,)  # no fork server where the platform cannot fork
    for (mode, kinds), forked in ((m, f) for f in starts for m in modes):
        settings = json.dumps(config.replace(cache="disk", out_dir=str(work / "deployed-out")).to_flower())
        walls, computes = [], []
        for rnd in range(1, rounds + 1):
            for kind in kinds:
                argv = [settings, kind, str(rnd), str(weights), str(data), str(work / "reply.json")]
                started = time.monotonic()
                if forked:
                    code = f"import sys; sys.argv = {['-c', *argv]!r}\n" + SITE_MESSAGE
                    process = server.Process(target=exec, args=(code, {"__name__": "__main__"}))
                    process.start()
                    process.join()
                    failed = process.exitcode != 0 and f"exit code {process.exitcode}"
                else:
                    done = subprocess.run([sys.executable, "-c", SITE_MESSAGE, *argv], cwd=work, capture_output=True,
                                          text=True, check=False)  # fmt: skip
                    failed = done.returncode != 0 and done.stderr[-2000:]
                if failed:
                    raise RuntimeError(f"deployed {kind} message failed: {failed}")
                if rnd > 1:  # round 1 fills the site's disk cache
                    walls.append(time.monotonic() - started)
                    computes.append(json.loads((work / "reply.json").read_text())["compute"])
        n = rounds - 1
        results[f"{mode}, {'forked by the gate' if forked else 'fresh interpreter'}"] = {
            "messages per round": len(kinds), "round wall": sum(walls) / n, "compute": sum(computes) / n,
            "overhead per message": (sum(walls) - sum(computes)) / len(walls),
        }  # fmt: skip
    return results



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 fills the disk cache")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-site-message-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = RunConfig(local_steps=1, model_width=8, model_depth=2, patch_size=16, phantom_voxel_size=5.0, seed=0)
    load = os.getloadavg()
    try:
        for mode, figures in run_deployed(config, args.rounds, work).items():
            print(f"{mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
