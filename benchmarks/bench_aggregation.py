"""Aggregation time of the server strategies for FeTS-sized rounds, against the memory-bandwidth bound.

17 site updates (FeTS 2021 partitioning_1 has 17 institutions) of a 20M-parameter float32 model,
as the server receives them (Flower ArrayRecords in reply Messages). The bound is one numpy pass
over the same updates already stacked in one preallocated array (``np.mean(stack, axis=0)``): no
aggregation that reads every update can be faster. Everything runs in this one process; each
strategy gets fresh reply Messages that share the received bytes (FedMedian empties its inputs).
Prints a Markdown table: best and median seconds over the repeats, and best / bound.

    python benchmarks/bench_aggregation.py [--sites 17] [--params 20e6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum
from flwr.supercore.task_identity import TaskIdentity

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedbrats.strategies import build_strategy  # noqa: E402
from fedbrats.strategies.base import ReweightedFedAvg  # noqa: E402


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def model_shapes(n_params: int) -> list[tuple[int, ...]]:
    """A 3D U-Net-like layout: a few large 3x3x3 convolutions, many small norm vectors, a remainder."""
    shapes: list[tuple[int, ...]] = []
    conv = (320, 320, 3, 3, 3)
    size = int(np.prod(conv))
    while n_params - size * (len(shapes) + 1) > 40 * 320:
        shapes.append(conv)
    shapes += [(320,)] * 20
    rest = n_params - sum(int(np.prod(s)) for s in shapes)
    if rest > 0:
        shapes.append((rest,))
    return shapes


def make_round(n_sites: int, n_params: int, seed: int = 0) -> tuple[ArrayRecord, list[Message]]:
    rng = np.random.default_rng(seed)
    shapes = model_shapes(n_params)
    start = {f"layer{i}.weight": rng.standard_normal(s, dtype=np.float32) for i, s in enumerate(shapes)}
    replies = []
    for node in range(1, n_sites + 1):
        update = ArrayRecord(
            {k: Array(v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(0.01)) for k, v in start.items()}
        )
        metrics = MetricRecord({"num-examples": int(rng.integers(3, 130)), "train-loss": 0.5, "local-steps": 10,
                                "loss-before": 0.6 + 0.01 * node, "loss-after": 0.5})
        sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": update, "metrics": metrics, "site": ConfigRecord({"name": f"site{node}"})})
        replies.append(Message(content=content, reply_to=sent))
    return ArrayRecord({k: Array(v) for k, v in start.items()}), replies


def fresh(replies: list[Message]) -> list[Message]:
    """New Messages over the same received bytes (no copy), so a strategy may empty its records."""
    out = []
    for r in replies:
        sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=r.metadata.src_node_id,
                       message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord(dict(r.content["arrays"].items())),
                              "metrics": r.content["metrics"], "site": r.content["site"]})
        out.append(Message(content=content, reply_to=sent))
    return out


def timed(fn: Callable[[object], object], repeats: int, prepare: Callable[[], object] = lambda: None) -> list[float]:
    """Seconds of each of `repeats` calls of ``fn(prepare())``; preparing is not timed."""
    times = []
    for _ in range(repeats):
        argument = prepare()
        gc.collect()
        t0 = time.perf_counter()
        result = fn(argument)
        times.append(time.perf_counter() - t0)
        del result, argument
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=17)
    parser.add_argument("--params", type=float, default=20e6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # Messages outside a Flower run
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("fedbrats").setLevel(logging.WARNING)

    n_params = int(args.params)
    start, replies = make_round(args.sites, n_params)
    common = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}

    stack = np.empty((args.sites, n_params), np.float32)
    for i, r in enumerate(replies):
        stack[i] = np.concatenate([a.numpy().ravel() for a in r.content["arrays"].values()])
    bound = timed(lambda _: np.mean(stack, axis=0), args.repeats)
    stack = None  # free 1.4 GB before the strategies run

    candidates: list[tuple[str, object, int]] = [
        ("FedAvg (Flower)", FedAvg(**common), args.repeats),
        ("FedAvg (ours, strategies.base)", ReweightedFedAvg(**common), args.repeats),
        ("FedPIDAvg (ours)", build_strategy("fedpidavg"), args.repeats),
        ("FedNova (ours)", build_strategy("fednova"), args.repeats),
        ("FeTS clipped (ours)", build_strategy("fets_clipped"), max(1, args.repeats - 1)),
        ("FedMedian (Flower)", FedMedian(**common), max(1, args.repeats - 1)),
        ("Krum (Flower)", Krum(**common), max(1, args.repeats - 1)),
    ]
    rows = [("numpy mean over a preallocated stack (bound)", bound)]
    grid = Grid([r.metadata.src_node_id for r in replies])
    for label, strategy, repeats in candidates:
        list(strategy.configure_train(1, start, ConfigRecord({}), grid))
        rows.append((label, timed(lambda batch, s=strategy: s.aggregate_train(1, batch), repeats, lambda: fresh(replies))))

    best_bound = min(bound)
    gb = args.sites * n_params * 4 / 1e9
    print(f"\n{args.sites} updates x {n_params / 1e6:.0f}M float32 parameters ({gb:.2f} GB read per aggregation)\n")
    print("| aggregation | best s | median s | repeats | best / bound |")
    print("|---|---:|---:|---:|---:|")
    for label, times in rows:
        print(f"| {label} | {min(times):.3f} | {statistics.median(times):.3f} | {len(times)} | {min(times) / best_bound:.1f} |")


if __name__ == "__main__":
    main()
