"""server.exchange: a round's messages pushed once, replies pulled until all came or the timeout passed."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedbrats.server.exchange import send_and_receive


class SlowGrid:
    """Push/pull like Flower's grids; node n's reply is ready `delays[n]` seconds after the push."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays, self.pulls, self.sent = delays, 0, {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = (msg, time.monotonic() + self.delays[msg.metadata.dst_node_id])
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [mid for mid in message_ids if time.monotonic() >= self.sent[mid][1]]
        return [Message(RecordDict(), reply_to=self.sent.pop(mid)[0]) for mid in ready]


def _messages(nodes):
    return [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_replies_are_collected_soon_after_the_last_one_arrives():
    grid = SlowGrid({1: 0.0, 2: 0.15})
    started = time.monotonic()
    replies = send_and_receive(grid, _messages([1, 2]), timeout=5.0, poll_seconds=0.02)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert time.monotonic() - started < 1.0  # not Flower's 3 s pull interval of a deployment
    assert grid.pulls >= 2  # polled while site 2 was still working


def test_the_timeout_returns_the_replies_that_came():
    grid = SlowGrid({1: 0.0, 2: 60.0})
    replies = send_and_receive(grid, _messages([1, 2]), timeout=0.2, poll_seconds=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]


def test_a_grid_without_push_and_pull_answers_itself():
    class OwnGrid:
        def send_and_receive(self, messages, *, timeout=None):
            return [Message(RecordDict(), reply_to=m) for m in messages]

    assert len(send_and_receive(OwnGrid(), _messages([1, 2, 3]), timeout=1.0, poll_seconds=0.1)) == 3
