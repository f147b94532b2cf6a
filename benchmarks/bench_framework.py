"""Per-round overhead of our federation against plain Flower with the same payload, and peak memory.

For each number of sites N, one real `fedbrats simulate` run (`simulations.simulate.simulate`: a local
SuperLink, Flower's simulation engine, sites run one at a time with num_cpus = os.cpu_count()) on a
5 mm phantom with 2 cases per site and a tiny model (width 8, depth 2, patch 16, 1 local step, 3 rounds,
evaluation every round, memory cache). Its overhead per round is the round's wall time (history
``wall_seconds``) minus the slowest site's local compute (max train ``seconds`` + max ``eval-seconds``);
as the sites run one after another we also subtract the summed compute of all sites. The baseline is a
plain Flower app written at run time: the ServerApp sends the same arrays (same names, shapes and
bytes as our model's ArrayRecord) to every site for train, then for evaluate; the ClientApp replies at
once (train: the received arrays, evaluate: one metric, like our sites). No-op sites reply within Flower's
0.1 s polling of replies, which hides Flower's own per-message cost; a second plain run therefore has its
sites sleep as long as ours computed (median train and evaluate seconds per message of our run), and its
overhead (round minus summed sleeps) is the like-for-like baseline of ours (round minus summed compute).
Medians over rounds 2.. (round 1
includes warm-up: Ray actors, imports, the sites' data loading). Round 1 is compared with both plain runs:
the sleeping one's round 1 holds the same sites' compute, so it is the like-for-like start-up baseline. With ``--evaluate-in-train`` our run
sets evaluate-in-train (each round's model is evaluated inside the next round's train messages) and
the plain app likewise sends one message per site per round (evaluate only in the last round); a
site's compute is then counted in the round that did it. While each run goes, a thread polls
/proc every 0.5 s and sums RSS (and PSS) over every process the run started (descendants of this
process, or processes whose environment names the run's FLWR_HOME, and their descendants).

    python benchmarks/bench_framework.py [--sites 4 8 17] [--rounds 3] [--evaluate-in-train] [--workdir DIR] [--keep]

A deployed site's per-message overhead (a fresh ClientApp process per message): bench_site_message.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.models import create_model
from fedbrats.shared.records import model_to_record, record_nbytes
from fedbrats.simulations.simulate import LOCAL, run_flower, simulate, stop_local_superlink

PLAIN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plain-flower"
version = "1.0.0"
description = "A no-op Flower app: the baseline of bench_framework.py"
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedbrats"

[tool.flwr.app.components]
serverapp = "plainflower.server_app:app"
clientapp = "plainflower.client_app:app"

[tool.flwr.app.config]
rounds = {rounds}
sites = {sites}
evaluate-in-train = {in_train}
payload = "{payload}"
out = "{out}"
train-sleep = {train_sleep}
eval-sleep = {eval_sleep}
"""

PLAIN_SERVER = '''\
"""Plain Flower: per round, one train and one evaluate exchange of the same arrays with every site."""

import json
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def exchange(grid, nodes, arrays, message_type, rnd):
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}),
                dst_node_id=node, message_type=message_type)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=600))
    return len(replies), sum(r.has_error() for r in replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    spec = json.loads(Path(cfg["payload"]).read_text())
    arrays = ArrayRecord({name: Array(np.zeros(shape, dtype=dtype)) for name, shape, dtype in spec["arrays"]})
    nbytes = sum(len(a.data) for a in arrays.values())
    nodes, deadline = [], time.monotonic() + 120
    while len(nodes) < int(cfg["sites"]) and time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.1)
    rounds = []
    for rnd in range(1, int(cfg["rounds"]) + 1):
        start = time.monotonic()
        train = exchange(grid, nodes, arrays, MessageType.TRAIN, rnd)
        train_seconds = time.monotonic() - start
        evaluate = (0, 0)
        if not cfg["evaluate-in-train"] or rnd == int(cfg["rounds"]):
            evaluate = exchange(grid, nodes, arrays, MessageType.EVALUATE, rnd)
        wall = time.monotonic() - start
        rounds.append({"round": rnd, "wall_seconds": wall, "train_seconds": train_seconds,
                       "replies": train[0] + evaluate[0], "errors": train[1] + evaluate[1]})
        log(INFO, "round %d/%d [ok] %d sites | %.2f s", rnd, int(cfg["rounds"]), len(nodes), wall)
    Path(cfg["out"]).write_text(json.dumps({"nbytes": nbytes, "sites": len(nodes), "rounds": rounds}))
'''

PLAIN_CLIENT = '''\
"""Plain Flower: a site that does nothing (or sleeps as long as our sites compute) and replies."""

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(float(context.run_config["train-sleep"]))
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    time.sleep(float(context.run_config["eval-sleep"]))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
'''


# --- memory of the processes a run started ------------------------------------------------------------
def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def run_pids(flwr_home: Path) -> set[int]:
    """Our descendants plus processes whose environment or command line names `flwr_home` (Ray daemons
    and the SuperLink may be re-parented), and their descendants; never this process itself."""
    me = os.getpid()
    marker_env, marker = f"FLWR_HOME={flwr_home}\0".encode(), str(flwr_home).encode()
    parent: dict[int, int] = {}
    seeds: set[int] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        stat = _read(proc / "stat")
        if not stat:
            continue
        pid, ppid = int(proc.name), int(stat[stat.rindex(b")") + 2 :].split()[1])
        parent[pid] = ppid
        if ppid == me or marker_env in _read(proc / "environ") or marker in _read(proc / "cmdline"):
            seeds.add(pid)
    pids, changed = set(seeds), True
    while changed:
        grown = {pid for pid, ppid in parent.items() if ppid in pids} - pids
        pids |= grown
        changed = bool(grown)
    return pids - {me}


def _kib(path: Path, key: bytes) -> int:
    for line in _read(path).splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


@dataclass
class MemoryPoll:
    """Peak summed RSS and PSS (MiB) of a run's processes, sampled every `interval` seconds."""

    flwr_home: Path
    interval: float = 0.5
    peak_rss: float = 0.0
    peak_pss: float = 0.0
    peak_processes: int = 0
    samples: int = 0
    peak_names: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        pids = run_pids(self.flwr_home)
        rss = sum(_kib(Path(f"/proc/{p}/status"), b"VmRSS:") for p in pids) / 1024
        pss = sum(_kib(Path(f"/proc/{p}/smaps_rollup"), b"Pss:") for p in pids) / 1024
        if rss > self.peak_rss:
            self.peak_rss, self.peak_processes = rss, len(pids)
            self.peak_names = sorted(_read(Path(f"/proc/{p}/comm")).decode().strip() for p in pids)
        self.peak_pss = max(self.peak_pss, pss)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemoryPoll:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stop_leftovers(flwr_home: Path, grace: float = 15.0) -> int:
    """Wait for the run's processes to exit; SIGTERM (by pid) any still there. Returns how many were left."""
    stop_local_superlink(flwr_home)
    deadline = time.monotonic() + grace
    while (left := run_pids(flwr_home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return len(left)


def check_own_superlink(out: Path) -> None:
    """A run served by another simulation's SuperLink (same ports) would measure that one's processes."""
    log = (out / "flower.log").read_text(errors="replace")
    if "Starting local SuperLink" not in log or str(out / ".flwr" / "apps") not in log:
        raise RuntimeError(
            f"{out}: the run was not served by its own local SuperLink; see {out / 'flower.log'}"
        )


# --- the two runs -------------------------------------------------------------------------------------------
def tiny_config(rounds: int, evaluate_in_train: bool = False) -> RunConfig:
    return RunConfig(
        rounds=rounds, local_steps=1, model_width=8, model_depth=2, patch_size=16, eval_every=1,
        cache="memory", phantom_voxel_size=5.0, seed=0, evaluate_in_train=evaluate_in_train,
    )  # fmt: skip


def payload_spec(config: RunConfig) -> dict:
    record = model_to_record(create_model(config.model, **config.model_config))
    arrays = [[name, list(a.shape), str(a.numpy().dtype)] for name, a in record.items()]
    return {"nbytes": record_nbytes(record), "arrays": arrays}


def run_ours(config: RunConfig, sites: int, work: Path) -> dict:
    data = generate_phantom(
        work / f"phantom-{sites}", sites=sites, cases_per_site=2, voxel_size=5.0, seed=0, progress=False
    )
    out = (work / f"ours-{sites}").resolve()
    started = time.monotonic()
    with MemoryPoll(out / ".flwr") as memory:
        ok = simulate(config, data, data / "partitioning_1.csv", out)
    total = time.monotonic() - started
    left = stop_leftovers(out / ".flwr")
    check_own_superlink(out)
    if not ok:
        raise RuntimeError(f"our simulation with {sites} sites failed; see {out / 'flower.log'}")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    # a site's evaluation seconds count in the round that computed them (evaluate-in-train: the next one)
    eval_seconds: dict[int, list[float]] = {}
    for record in history:
        done_in = record.get("evaluated_in_round", record["round"])
        eval_seconds.setdefault(done_in, []).extend(e["eval-seconds"] for e in record["evaluate"] if not e.get("dropped"))
    rounds = []
    for record in history:
        train = [t for t in record["train"] if not t.get("dropped")]
        evaluate = [e for e in record["evaluate"] if not e.get("dropped")]
        if len(train) != sites or len(evaluate) != sites:
            raise RuntimeError(
                f"round {record['round']} with {sites} sites: {len(train)} trained, {len(evaluate)} evaluated"
            )
        evaluated = eval_seconds.get(record["round"], [])
        slowest = max(t["seconds"] for t in train) + max(evaluated, default=0.0)
        summed = sum(t["seconds"] for t in train) + sum(evaluated)
        rounds.append({"wall": record["wall_seconds"], "slowest": slowest, "summed": summed})
    later = history[1:]  # round 1 is warm-up
    compute = {
        "train": _median([t["seconds"] for r in later for t in r["train"]]),
        "eval": _median([s for rnd, values in eval_seconds.items() if rnd > 1 for s in values]),
    }
    return {"rounds": rounds, "total": total, "memory": memory, "leftover": left, "compute": compute}


def run_plain(spec: dict, sites: int, rounds: int, work: Path, in_train: bool = False,
              compute: dict[str, float] | None = None) -> dict:
    """Plain Flower with no-op sites, or (`compute`: seconds per train / eval message) sites that sleep as
    long as ours computed, so that Flower's own per-message costs are not hidden in its 0.1 s polling."""
    out = (work / f"plain-{sites}{'-busy' if compute else ''}").resolve()
    app = out / "app"
    (app / "plainflower").mkdir(parents=True, exist_ok=True)
    (out / "payload.json").write_text(json.dumps(spec))
    result_file = out / "rounds.json"
    (app / "pyproject.toml").write_text(
        PLAIN_PYPROJECT.format(rounds=rounds, sites=sites, payload=out / "payload.json", out=result_file,
                               in_train="true" if in_train else "false",
                               train_sleep=(compute or {}).get("train", 0.0), eval_sleep=(compute or {}).get("eval", 0.0))
    )
    (app / "plainflower" / "__init__.py").write_text("")
    (app / "plainflower" / "server_app.py").write_text(PLAIN_SERVER)
    (app / "plainflower" / "client_app.py").write_text(PLAIN_CLIENT)
    started = time.monotonic()
    with MemoryPoll(out / ".flwr") as memory:
        code = run_flower(
            app, out, sites, cpus_per_site=float(os.cpu_count() or 1), engine=LOCAL, rounds=rounds
        )
    total = time.monotonic() - started
    left = stop_leftovers(out / ".flwr")
    check_own_superlink(out)
    if code != 0 or not result_file.is_file():
        raise RuntimeError(f"the plain Flower run with {sites} sites failed; see {out / 'flower.log'}")
    result = json.loads(result_file.read_text())
    if result["nbytes"] != spec["nbytes"] or any(
        r["errors"] or r["replies"] != (1 + (not in_train or i == rounds - 1)) * sites
        for i, r in enumerate(result["rounds"])
    ):
        raise RuntimeError(f"plain Flower run with {sites} sites: unexpected result {result}")
    sleeps = [((compute or {}).get("train", 0.0) + (compute or {}).get("eval", 0.0) * (r["replies"] > sites)) * sites
              for r in result["rounds"]]  # fmt: skip
    return {"rounds": [{"wall": r["wall_seconds"], "summed": z} for r, z in zip(result["rounds"], sleeps, strict=True)],
            "total": total, "memory": memory, "leftover": left}  # fmt: skip


# --- report -----------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: dict[int, tuple[dict, dict, dict]], spec: dict) -> str:
    lines = [
        f"Payload: {spec['nbytes']:,} bytes in {len(spec['arrays'])} arrays per message (the tiny model). Seconds are medians over "
        "rounds 2..; round 1 (warm-up) is shown apart.",
        "",
        "| sites | ours round (s) | slowest site compute (s) | overhead (s) | overhead vs summed compute (s) "
        "| plain Flower round (s) | overhead / plain | summed-compute overhead / plain | round 1 ours / plain (s) | whole run ours / plain (s) "
        "| peak RSS ours / plain (MiB) | peak PSS ours (MiB) | processes at peak "
        "| plain with sleeping sites: round / overhead (s) | summed-compute overhead / that overhead "
        "| round 1 ours / plain with sleeping sites (s) | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sites, (ours, plain, busy) in sorted(results.items()):
        later, plain_later = ours["rounds"][1:], plain["rounds"][1:]
        wall = _median([r["wall"] for r in later])
        slowest = _median([r["slowest"] for r in later])
        overhead = _median([r["wall"] - r["slowest"] for r in later])
        serial = _median([r["wall"] - r["summed"] for r in later])
        plain_wall = _median([r["wall"] for r in plain_later])
        busy_overhead = _median([r["wall"] - r["summed"] for r in busy["rounds"][1:]])
        m, pm = ours["memory"], plain["memory"]
        lines.append(
            f"| {sites} | {wall:.2f} | {slowest:.2f} | {overhead:.2f} | {serial:.2f} | {plain_wall:.2f} "
            f"| {overhead / plain_wall:.2f} | {serial / plain_wall:.2f} | {ours['rounds'][0]['wall']:.1f} / {plain['rounds'][0]['wall']:.1f} "
            f"| {ours['total']:.0f} / {plain['total']:.0f} | {m.peak_rss:.0f} / {pm.peak_rss:.0f} | {m.peak_pss:.0f} "
            f"| {m.peak_processes} | {_median([r['wall'] for r in busy['rounds'][1:]]):.2f} / {busy_overhead:.2f} "
            f"| {serial / busy_overhead:.2f} | {ours['rounds'][0]['wall']:.1f} / {busy['rounds'][0]['wall']:.1f} "
            f"| {ours['rounds'][0]['wall'] / busy['rounds'][0]['wall']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 8, 17])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--evaluate-in-train", action="store_true",
                        help="one message per site and round (ours: evaluate-in-train; plain: evaluate in the last round)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 is warm-up")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-framework-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = tiny_config(args.rounds, args.evaluate_in_train)
    spec = payload_spec(config)
    results: dict[int, tuple[dict, dict, dict]] = {}
    try:
        for sites in args.sites:
            ours = run_ours(config, sites, work)
            plain = run_plain(spec, sites, args.rounds, work, args.evaluate_in_train)
            busy = run_plain(spec, sites, args.rounds, work, args.evaluate_in_train, compute=ours["compute"])
            results[sites] = (ours, plain, busy)
            print(f"{sites} sites: our median compute per message: train {ours['compute']['train']:.3f} s, "
                  f"evaluate {ours['compute']['eval']:.3f} s (the sleeping plain sites sleep as long)")
            for name, run in (("ours", ours), ("plain", plain)):
                print(f"{name}, {sites} sites, processes at peak RSS: {', '.join(run['memory'].peak_names)}")
                if run["leftover"]:
                    print(
                        f"warning: {run['leftover']} process(es) of the {name} run with {sites} sites outlived it"
                    )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results, spec))


if __name__ == "__main__":
    main()
