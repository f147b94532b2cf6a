"""Aggregation time of the server strategies for FeTS-sized rounds, against the memory-bandwidth bound.

17 site updates (FeTS 2021 partitioning_1 has 17 institutions) of a 20M-parameter float32 model,
as the server receives them (Flower ArrayRecords in reply Messages). The bound is one numpy pass
over the same updates already stacked in one preallocated array (``np.mean(stack, axis=0)``): no
aggregation that reads every update can be faster. Everything runs in this one process; each
strategy gets fresh reply Messages that share the received bytes (FedMedian empties its inputs).
The bound is timed again between strategies and right before every timed aggregation (a loaded
machine drifts); "best/median / best bound" divide by the best bound time of the whole run, "paired"
divides each aggregation by the bound run just before it. Peak extra memory is tracemalloc's peak during the aggregation (numpy reports its
buffers to it), in units of one model's size. Prints a Markdown table.

    python benchmarks/bench_aggregation.py [--sites 17] [--params 20e6] [--repeats 3] [--flower]
    python benchmarks/bench_aggregation.py --chunks 2048,8192,32768   # block size of the robust kernels
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum
from flwr.supercore.task_identity import TaskIdentity

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedbrats.strategies import build_strategy, robust  # noqa: E402


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


def fresh(replies: list[Message], control: bool = False) -> list[Message]:
    """New Messages over the same received bytes (no copy), so a strategy may empty its records.
    `control`: SCAFFOLD's control-variate change too (the same bytes as the update: timing only)."""
    out = []
    for r in replies:
        sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=r.metadata.src_node_id,
                       message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord(dict(r.content["arrays"].items())),
                              "metrics": r.content["metrics"], "site": r.content["site"]})
        if control:
            content["control-delta"] = ArrayRecord(dict(r.content["arrays"].items()))
        out.append(Message(content=content, reply_to=sent))
    return out


def timed(fn: Callable[[object], object], repeats: int, prepare: Callable[[], object] = lambda: None,
          before: Callable[[], float] | None = None) -> tuple[list[float], int, list[float]]:
    """Seconds of each of `repeats` calls of ``fn(prepare())`` (preparing is not timed), and, from one
    more call traced by tracemalloc (which slows allocation, so it is not timed), the peak memory
    allocated above the start of the call, in bytes. With `before` (the bound), each call is preceded by
    one bound run, and each time is also returned divided by that run's (paired ratios: on a machine
    whose load changes by the second, a ratio of neighbours drifts less than one to the best bound)."""
    times, ratios = [], []
    for _ in range(repeats):
        reference = before() if before else None
        argument = prepare()
        gc.collect()
        t0 = time.perf_counter()
        result = fn(argument)
        times.append(time.perf_counter() - t0)
        if reference:
            ratios.append(times[-1] / reference)
        del result, argument
    argument = prepare()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = fn(argument)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result, argument
    return times, peak, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=17)
    parser.add_argument("--params", type=float, default=20e6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flower", action="store_true", help="also time Flower's FedMedian and Krum (slow)")
    parser.add_argument("--chunks", default="", help="comma-separated block sizes: time the robust kernels only")
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
    bounds: list[float] = []

    def bound() -> None:
        bounds.extend(timed(lambda _: np.mean(stack, axis=0), 2)[0])  # (its memory is ignored)

    def one_bound() -> float:
        gc.collect()
        t0 = time.perf_counter()
        np.mean(stack, axis=0)
        bounds.append(time.perf_counter() - t0)
        return bounds[-1]

    rows: list[tuple[str, list[float], int]] = []
    if args.chunks:
        flat = list(stack)
        for chunk in (int(c) for c in args.chunks.split(",")):
            for label, fn in [("median", lambda c=chunk: robust.coordinate_median(flat, c)),
                              ("trimmed mean 0.2", lambda c=chunk: robust.trimmed_mean(flat, 0.2, c)),
                              ("distances", lambda c=chunk: robust.squared_distances([{"w": f} for f in flat], c))]:
                bound()
                rows.append((f"{label}, chunk {chunk}", *timed(lambda _, fn=fn: fn(), args.repeats, before=one_bound)))
    else:
        f = max(0, (args.sites - 3) // 4)
        candidates: list[tuple[str, object, int]] = [
            ("FedAvg (Flower's class)", FedAvg(**common), args.repeats),
            ("FedAvg (registered as fedavg and fedprox: ours)", build_strategy("fedavg"), args.repeats),
            ("FedAvgM momentum 0.9 (ours, step fused into the mean)",
             build_strategy("fedavgm", {"server_momentum": 0.9}), args.repeats),
            ("FedPIDAvg (ours)", build_strategy("fedpidavg"), args.repeats),
            ("FedCostWAvg (ours)", build_strategy("fedcostwavg"), args.repeats),
            ("FedNova (ours)", build_strategy("fednova"), args.repeats),
            ("SCAFFOLD server step (ours; reads updates and control changes: 2x the bound's bytes)",
             build_strategy("scaffold"), args.repeats),
            ("FeTS clipped (ours, median of per-site percentiles)", build_strategy("fets_clipped"), args.repeats),
            ("FeTS clipped (pooled=1, FeTS's rule)", build_strategy("fets_clipped", {"pooled": 1}), args.repeats),
            ("FedMedian (registered)", build_strategy("fedmedian"), args.repeats),
            ("FedTrimmedAvg beta 0.2 (registered)", build_strategy("fedtrimmedavg"), args.repeats),
            (f"Krum f={f} (registered)", build_strategy("krum", {"num_malicious_nodes": f}), args.repeats),
            (f"Multi-Krum f={f}, 3 selected (registered)",
             build_strategy("multikrum", {"num_malicious_nodes": f, "num_nodes_to_select": 3}), args.repeats),
            (f"Bulyan f={f} (registered)", build_strategy("bulyan", {"num_malicious_nodes": f}), args.repeats),
        ]
        if args.flower:
            candidates += [("FedMedian (Flower)", FedMedian(**common), 1), ("Krum (Flower)", Krum(**common), 1)]
        grid = Grid([r.metadata.src_node_id for r in replies])
        for label, strategy, repeats in candidates:
            bound()
            list(strategy.configure_train(1, start, ConfigRecord({}), grid))
            control = label.startswith("SCAFFOLD")
            rows.append((label, *timed(lambda batch, s=strategy: s.aggregate_train(1, batch), repeats,
                                       lambda c=control: fresh(replies, c), one_bound)))
    bound()

    best_bound = min(bounds)
    model = n_params * 4
    gb = args.sites * model / 1e9
    print(f"\n{args.sites} updates x {n_params / 1e6:.0f}M float32 parameters ({gb:.2f} GB read per aggregation); "
          f"bound best {best_bound:.3f} s, median {statistics.median(bounds):.3f} s over {len(bounds)} runs\n")
    print("| aggregation | best / best bound | median / best bound | paired ratio: best | paired: median | repeats "
          "| peak extra memory (models) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, times, peak, ratios in rows:
        paired = f"{min(ratios):.2f} | {statistics.median(ratios):.2f}" if ratios else "- | -"
        print(f"| {label} | {min(times) / best_bound:.2f} | {statistics.median(times) / best_bound:.2f} | {paired} | "
              f"{len(times)} | {peak / model:.2f} |")


if __name__ == "__main__":
    main()
