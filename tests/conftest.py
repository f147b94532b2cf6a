"""Test-wide setup: Flower messages need a task identity even outside a Flower process."""

import os

import pytest
import torch

# Tests use tiny tensors: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one torch thread again, whatever the test before it set."""
    torch.set_num_threads(1)
    yield

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(autouse=True)
def flower_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
