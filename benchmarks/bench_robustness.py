"""How far a minority of attacking sites moves each strategy's aggregate, alone and behind our defences.

One round on small random arrays (about 900 parameters) with the real strategies
(`fedbrats.strategies.build_strategy`) and the real attacks (`fedbrats.client.attack`). Honest
sites share a common update direction plus their own noise and report 10 to 59 training cases.
"alone": the strategy aggregates every reply as it arrives. "defended": the server's round loop
(`fedbrats.server.federation.Federation.train_round`) with its defaults: reply validation
(including the num-examples cap), update checks and update screening, then the strategy.
Each cell is ``|aggregate - honest mean| / |honest mean - global model|``, with the honest mean the
case-weighted mean of what every site (attackers included) would have sent had none attacked.
Runs in seconds; prints Markdown tables (docs/reliability.md holds a copy).

    python benchmarks/bench_robustness.py [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedbrats.client.attack import poison_metrics, poison_update  # noqa: E402
from fedbrats.server.federation import Federation  # noqa: E402
from fedbrats.shared.config import RunConfig  # noqa: E402
from fedbrats.strategies import available_strategies, build_strategy  # noqa: E402
from fedbrats.strategies.arithmetic import record_views, to_record  # noqa: E402
from fedbrats.strategies.client_dp import with_client_dp  # noqa: E402
from fedbrats.strategies.scaffold import CONTROL, CONTROL_DELTA  # noqa: E402

ATTACKS = ("none", "scale", "signflip", "noise", "inflate")
SETTINGS = ((5, 1), (7, 2))  # (sites, attackers)
CLIENT_DP = "fedavg + client-level DP"
SHAPES = {"conv.weight": (8, 4, 3, 3, 3), "conv.bias": (8,), "norm.weight": (8,), "head.weight": (3, 8)}


class Round:
    """One round's honest models and sizes; `attackers` (the last nodes) send `attack` instead."""

    def __init__(self, sites: int, attackers: int, attack: str, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.start = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
        direction = {k: rng.normal(0, 1e-2, s) for k, s in SHAPES.items()}
        self.nodes = list(range(1, sites + 1))
        self.models = {
            n: {k: (v + direction[k] + rng.normal(0, 5e-3, v.shape)).astype(np.float32) for k, v in self.start.items()}
            for n in self.nodes
        }  # fmt: skip
        self.sizes = {n: int(rng.integers(10, 60)) for n in self.nodes}
        self.attackers = set(self.nodes[sites - attackers:]) if attack != "none" else set()
        self.attack = attack
        self.seed = seed

    def honest_mean(self) -> dict[str, np.ndarray]:
        total = sum(self.sizes.values())
        return {k: sum(self.models[n][k].astype(np.float64) * self.sizes[n] for n in self.nodes) / total for k in SHAPES}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            arrays = self.models[node]
            metrics = {"num-examples": self.sizes[node], "num-val": 2, "train-loss": 0.5, "local-steps": 10,
                       "loss-before": 1.0 + 0.01 * node, "loss-after": 0.8}  # fmt: skip
            if node in self.attackers:
                rng = np.random.default_rng([self.seed, node])
                arrays = poison_update(self.attack, self.start, arrays, rng=rng)
                metrics = poison_metrics(self.attack, metrics)
            content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics),
                                  "site": ConfigRecord({"name": f"site{node}"})})  # fmt: skip
            if CONTROL in msg.content.array_records:
                content[CONTROL_DELTA] = to_record({k: np.zeros_like(v) for k, v in record_views(msg.content[CONTROL]).items()})
            replies.append(Message(content=content, reply_to=msg))
        return replies


def make_strategy(name: str, sites: int):
    if name == CLIENT_DP:
        return with_client_dp(build_strategy("fedavg"), noise_multiplier=0.01, clipping_norm=0.5,
                              num_sampled_sites=sites, total_sites=sites)  # fmt: skip
    return build_strategy(name)


def distance(result: dict[str, np.ndarray] | None, rnd: Round) -> float:
    if result is None:
        return math.nan
    mean = rnd.honest_mean()
    moved = math.sqrt(sum(float(np.sum((result[k].astype(np.float64) - mean[k]) ** 2)) for k in SHAPES))
    step = math.sqrt(sum(float(np.sum((mean[k] - rnd.start[k]) ** 2)) for k in SHAPES))
    return moved / step


def alone(name: str, rnd: Round) -> float:
    """The strategy aggregates every reply, as Flower's own loop would hand them over."""
    strategy = make_strategy(name, len(rnd.nodes))
    messages = list(strategy.configure_train(1, to_record(rnd.start), ConfigRecord({"server-round": 1}), rnd))
    try:
        arrays, _ = strategy.aggregate_train(1, rnd.send_and_receive(messages))
    except (ValueError, ArithmeticError) as err:
        logging.getLogger("bench").warning("%s alone raised %s", name, err)
        return math.nan
    return distance(None if arrays is None else record_views(arrays), rnd)


def defended(name: str, rnd: Round) -> tuple[float, list[str]]:
    """The server's round loop with its default defences; also which sites it dropped."""
    with tempfile.TemporaryDirectory() as out:
        dp = 0.01 if name == CLIENT_DP else 0.0
        config = RunConfig(rounds=1, min_sites=1, out_dir=out, client_dp_noise_multiplier=dp,
                           strategy="fedavg" if name == CLIENT_DP else name)  # fmt: skip
        start = to_record(rnd.start)
        federation = Federation(rnd, config, make_strategy(name, len(rnd.nodes)), start, out_dir=Path(out))
        results, info = federation.train_round(1, rnd.nodes)
        dropped = [r.site for r in results if r.dropped]
        if info["status"] != "ok":
            return math.nan, dropped
        return distance(record_views(federation.arrays), rnd), dropped


def robustness(seed: int = 0) -> list[dict]:
    """One row per (strategy, sites, attackers, attack): distances alone and defended, sites dropped."""
    rows = []
    for name in [*available_strategies(), CLIENT_DP]:
        for sites, attackers in SETTINGS:
            for attack in ATTACKS:
                rnd = Round(sites, attackers, attack, seed)
                moved, dropped = defended(name, rnd)
                rows.append({"strategy": name, "sites": sites, "attackers": attackers, "attack": attack,
                             "alone": alone(name, rnd), "defended": moved, "dropped": dropped})  # fmt: skip
    return rows


def _cell(value: float) -> str:
    return "fails" if math.isnan(value) else f"{value:.2g}"


def markdown(rows: list[dict]) -> str:
    lines = []
    for sites, attackers in SETTINGS:
        lines += [f"\n{attackers} attacker(s) of {sites} sites: alone / defended\n",
                  "| strategy | " + " | ".join(ATTACKS) + " |", "|---|" + "---:|" * len(ATTACKS)]  # fmt: skip
        for name in dict.fromkeys(r["strategy"] for r in rows):
            cells = {r["attack"]: r for r in rows if r["strategy"] == name and r["sites"] == sites}
            lines.append(f"| {name} | " + " | ".join(
                f"{_cell(cells[a]['alone'])} / {_cell(cells[a]['defended'])}" for a in ATTACKS) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # Messages outside a Flower run
    for name in ("flwr", "fedbrats", "fedbrats.server", "fedbrats.strategies", "fedbrats.client_dp"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(markdown(robustness(args.seed)))


if __name__ == "__main__":
    main()
