"""In-process sites for the trust tests: honest by default, each node's reply open to a hostile edit."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedbrats.server.federation import Federation
from fedbrats.shared.config import RunConfig
from fedbrats.strategies import build_strategy

Edit = Callable[[Message], None]


def model(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 3), value, np.float32)), "b": Array(np.zeros(3, np.float32))})


def fast_metrics(values: dict) -> MetricRecord:
    """A MetricRecord filled without Flower's per-key checks (200,000 keys take 6 s through them);
    what arrives from the wire is just as unchecked as far as our server is concerned."""
    record = MetricRecord()
    record._data.update(values)
    return record


def set_metric(key: str, value) -> Edit:
    def edit(reply: Message) -> None:
        metrics = dict(reply.content.metric_records["metrics"])
        metrics[key] = value
        reply.content["metrics"] = fast_metrics(metrics)

    return edit


def set_array(name: str, array: Array) -> Edit:
    def edit(reply: Message) -> None:
        arrays = dict(reply.content.array_records["arrays"].items())
        arrays[name] = array
        reply.content["arrays"] = ArrayRecord(arrays)

    return edit


def set_name(name) -> Edit:
    def edit(reply: Message) -> None:
        reply.content["site"] = ConfigRecord({"name": name})

    return edit


class Sites:
    """Nodes that 'train' by adding node id / 10 to every weight (all report 10 training cases) and
    evaluate to Dice 0.5 / 0.6 / 0.1 x node; `train` and `evaluate` edit a node's reply before it leaves."""

    def __init__(self, nodes=(1, 2, 3, 4), train: dict[int, Edit] | None = None, evaluate: dict[int, Edit] | None = None):
        self.nodes = list(nodes)
        self.train = train or {}
        self.evaluate = evaluate or {}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            training = msg.metadata.message_type.startswith("train")
            if training:
                metrics = {"num-examples": 10, "num-val": 2}
            else:
                metrics = {"num-examples": 2, "dice-ET": 0.5, "dice-TC": 0.6, "dice-WT": 0.1 * node}
            content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": f"s{node}"})})
            if training:
                content["arrays"] = ArrayRecord({k: Array(v.numpy() + node / 10) for k, v in msg.content["arrays"].items()})
            reply = Message(content=content, reply_to=msg)
            edit = (self.train if training else self.evaluate).get(node)
            if edit:
                edit(reply)
            replies.append(reply)
        return replies


def federation(tmp_path, grid, *, rounds=1, min_sites=2, strategy="fedavg", **changes) -> Federation:
    config = RunConfig(rounds=rounds, min_sites=min_sites, out_dir=str(tmp_path), strategy=strategy, **changes)
    return Federation(grid, config, build_strategy(strategy), model(), out_dir=tmp_path)
