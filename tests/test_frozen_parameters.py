"""Parameters a run freezes (`trainable`) are the server's: no site may change them, and no noise lands on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedbrats.server.app import run_server
from fedbrats.server.history import read_history
from fedbrats.server.update_checks import conform_aggregate, update_problem
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.models import create_model
from fedbrats.shared.models.trainable import frozen_parameters
from fedbrats.strategies.arithmetic import to_record

from .local_grid import LocalGrid, tiny_phantom


def _global() -> ArrayRecord:
    return to_record({"encoder.w": np.arange(6, dtype=np.float32).reshape(2, 3), "head.w": np.ones(3, np.float32)})


def _reply(**arrays: np.ndarray) -> Message:
    values = {"encoder.w": np.arange(6, dtype=np.float32).reshape(2, 3), "head.w": np.ones(3, np.float32), **arrays}
    content = RecordDict({"arrays": to_record(values), "config": ConfigRecord({})})
    return Message(content, dst_node_id=1, message_type="train")


def test_a_reply_that_changes_a_frozen_parameter_is_refused_by_name():
    nudged = np.arange(6, dtype=np.float32).reshape(2, 3)
    nudged[0, 0] = np.nextafter(np.float32(0), np.float32(1))  # one bit is enough
    reply = _reply(**{"encoder.w": nudged, "head.w": np.full(3, 2.0, np.float32)})
    problem = update_problem(reply, _global(), frozenset({"encoder.w"}))
    assert problem is not None and "'encoder.w'" in problem and "freezes" in problem
    assert update_problem(reply, _global()) is None  # nothing frozen: an ordinary update
    trained_only = _reply(**{"head.w": np.full(3, 2.0, np.float32)})
    assert update_problem(trained_only, _global(), frozenset({"encoder.w"})) is None


def test_the_new_global_model_keeps_frozen_parameters_bit_for_bit():
    noisy = to_record({"encoder.w": np.full((2, 3), 9.0, np.float64), "head.w": np.full(3, 2.5, np.float64)})
    conformed, problem = conform_aggregate(noisy, _global(), frozenset({"encoder.w"}))
    assert problem is None
    assert np.array_equal(conformed["encoder.w"].numpy(), _global()["encoder.w"].numpy())
    assert conformed["encoder.w"].numpy().dtype == np.float32
    assert np.array_equal(conformed["head.w"].numpy(), np.full(3, 2.5, np.float32))


def test_frozen_parameters_are_the_parameters_trainable_leaves_out():
    model = create_model("resunet", width=8, depth=2)
    names = {n for n, _ in model.named_parameters()}
    frozen = frozen_parameters(model, "head.*")
    assert frozen == {n for n in names if not n.startswith("head.")} and frozen
    assert frozen_parameters(model, "*") == frozenset()
    with pytest.raises(ValueError, match="match no parameter"):
        frozen_parameters(model, "nothing.*")


@pytest.mark.slow
def test_client_level_dp_noises_only_what_the_sites_train(tmp_path):
    """A warm-started fine-tune under client-level DP: the noise of std z S / k used to land on every
    parameter, so a frozen public encoder came back corrupted; now it comes back exactly."""
    phantom = tiny_phantom(tmp_path / "phantom", cases_per_site=3)
    config = RunConfig(rounds=2, min_sites=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                       out_dir=str(tmp_path / "run"), model="resunet", model_width=8, model_depth=2, patch_size=16,
                       batch_size=2, local_steps=1, cache="memory", trainable="head.*",
                       client_dp_noise_multiplier=1.0, client_dp_clipping_norm=0.5)  # fmt: skip
    checkpoint = run_server(LocalGrid(config.to_flower(), sites=2), config)
    history = read_history(tmp_path / "run" / "history.jsonl")
    assert [h["status"] for h in history] == ["ok", "ok"]
    assert all(t["dropped"] is None for h in history for t in h["train"])
    final, _ = load_checkpoint(checkpoint)
    torch.manual_seed(config.seed)
    start = create_model("resunet", **config.model_config)
    moved = {n for n, p in final.state_dict().items() if not torch.equal(p, start.state_dict()[n])}
    assert moved == {"head.weight", "head.bias"}  # the noise (std 0.25) moved the head, nothing else
