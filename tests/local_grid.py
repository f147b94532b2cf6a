"""An in-process grid whose sites run the real ClientApp handlers: the whole stack without Ray or gRPC."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from fedbrats.client.app import _guarded as guarded
from fedbrats.client.app import handle_evaluate, handle_train
from fedbrats.shared.data.phantom import generate_phantom


class LocalGrid:
    """Sites numbered 1..N; node i has ``partition-id`` i-1, as Flower's simulation engine assigns."""

    def __init__(self, run_config: dict, sites: int, node_configs: dict[int, dict] | None = None):
        self.run_config = run_config
        self.node_configs = node_configs or {i: {"partition-id": i - 1, "num-partitions": sites} for i in range(1, sites + 1)}
        self.replies: list[Message] = []
        self.down: set[int] = set()

    def get_node_ids(self):
        return sorted(set(self.node_configs) - self.down)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.down:
                continue
            context = Context(1, node, self.node_configs[node], RecordDict(), self.run_config)
            handler = guarded(handle_train if msg.metadata.message_type.startswith("train") else handle_evaluate)
            reply = handler(msg, context)
            replies.append(reply)
        self.replies += replies
        return replies


def tiny_phantom(root, cases_per_site: int):
    """Two phantom sites of `cases_per_site` cases at 5 mm: enough for a real round, in seconds."""
    generate_phantom(root, sites=2, cases_per_site=cases_per_site, voxel_size=5.0, seed=3, progress=False)
    return root
