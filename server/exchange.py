"""Send a round's messages and collect the replies, polling faster than Flower's own grids.

Flower's `Grid.send_and_receive` sleeps between pulls: 0.1 s in a simulation (`InMemoryGrid`) and 3 s in
a deployment (the SuperLink's grid), so every phase of a round ends up to that much after its last reply:
in a deployment a round of two phases waits 3 s on average for nothing. The pull itself is cheap (a
lookup in the simulation's state, one small gRPC call to the SuperLink), so we poll at `poll_seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

#: Seconds between pulls: the simulation's in-memory state, and a SuperLink over gRPC.
SIMULATION_POLL_SECONDS = 0.02
DEPLOYMENT_POLL_SECONDS = 0.5


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, *, simulated: bool = True, poll_seconds: float | None = None
) -> list[Message]:
    """Push `messages`, then pull their replies every `poll_seconds` (default: by `simulated`) until all
    arrived or `timeout` passed.

    Grids without push/pull (the in-process test grid) fall back to their own `send_and_receive`."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    if poll_seconds is None:
        poll_seconds = SIMULATION_POLL_SECONDS if simulated else DEPLOYMENT_POLL_SECONDS
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        arrived = list(grid.pull_messages(waiting))
        replies += arrived
        waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        time.sleep(min(poll_seconds, left))
    return replies
