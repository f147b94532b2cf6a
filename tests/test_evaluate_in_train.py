"""evaluate-in-train: a train message also evaluates the incoming model; history keeps each round's evaluation.
Also what a site's first message pays: MONAI imported without the packages it would only load for us."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedbrats.server.app import run_server
from fedbrats.server.history import RunHistory, read_history
from fedbrats.server.replies import EVALUATION, EVALUATION_ERROR, EmbeddedEvaluation, split_evaluation
from fedbrats.server.state import load_state
from fedbrats.shared.config import RunConfig

from .fresh_python import fresh_python
from .local_grid import LocalGrid, tiny_phantom

TINY = dict(model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=1, local_epochs=1, cache="memory")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return tiny_phantom(tmp_path_factory.mktemp("phantom"), cases_per_site=2)


def _run(phantom, out, rounds=2, **changes):
    config = RunConfig(rounds=rounds, min_sites=2, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
                       out_dir=str(out), **TINY, **changes)  # fmt: skip
    grid = LocalGrid(config.to_flower(), sites=2)
    run_server(grid, config)
    return grid, read_history(out / "history.jsonl")


def _kinds(grid):
    return [r.metadata.message_type.split(".")[0] for r in grid.replies]


@pytest.mark.slow  # four 2-round federations of 2 sites, in process
def test_train_replies_carry_the_evaluation_of_the_incoming_model(phantom, tmp_path):
    grid, history = _run(phantom, tmp_path / "in-train", evaluate_in_train=True)
    plain_grid, plain = _run(phantom, tmp_path / "separate")
    # round 1's model was scored by round 2's train messages: 2 sites x (2 trains + 1 final evaluate)
    assert _kinds(grid) == ["train"] * 4 + ["evaluate"] * 2
    assert _kinds(plain_grid) == (["train"] * 2 + ["evaluate"] * 2) * 2
    assert [h["round"] for h in history] == [1, 2] and history[0]["evaluated_in_round"] == 2
    assert "evaluation_pending" not in history[0]
    for got, want in zip(history, plain, strict=True):  # same model, same cases: the same evaluation
        assert {e["site"] for e in got["evaluate"]} == {"1", "2"}
        for a, b in zip(sorted(got["evaluate"], key=lambda e: e["site"]), sorted(want["evaluate"], key=lambda e: e["site"]),
                        strict=True):  # fmt: skip
            assert a["dropped"] is None and a["dice-WT"] == pytest.approx(b["dice-WT"], abs=1e-6)
            assert a["hd95-TC"] == pytest.approx(b["hd95-TC"], abs=1e-6)
        assert got["mean_dice"] == pytest.approx(want["mean_dice"], abs=1e-6)
        assert [t["train-loss"] for t in got["train"]] == pytest.approx([t["train-loss"] for t in want["train"]])
    # training is unchanged by the evaluation before it: identical global weights
    a, b = load_state(tmp_path / "in-train" / "server"), load_state(tmp_path / "separate" / "server")
    for name in a.arrays.keys():
        np.testing.assert_array_equal(a.arrays[name].numpy(), b.arrays[name].numpy())
    # Flower's strategies saw one MetricRecord per train reply: the evaluation was taken out before them
    assert all(set(r.content.metric_records) == {"metrics"} for r in grid.replies)


def _train_reply(**records):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 2}), "site": ConfigRecord({"name": "a"}), **records})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_split_evaluation_takes_the_evaluation_or_says_why_there_is_none():
    reply = _train_reply(**{EVALUATION: MetricRecord({"num-examples": 1, "dice-WT": 0.5})})
    embedded = split_evaluation(reply)
    assert isinstance(embedded, EmbeddedEvaluation) and not embedded.has_error()
    assert dict(embedded.content["metrics"]) == {"num-examples": 1, "dice-WT": 0.5}
    assert set(reply.content.metric_records) == {"metrics"}  # what the strategy will see
    failed = split_evaluation(_train_reply(**{EVALUATION_ERROR: ConfigRecord({"reason": "no validation case"})}))
    assert failed.has_error() and failed.error.reason == "no validation case"
    assert "carried no evaluation" in split_evaluation(_train_reply()).error.reason


def test_replace_round_rewrites_one_line_and_keeps_events(tmp_path):
    history = RunHistory(tmp_path / "history.jsonl")
    history.append({"round": 1, "evaluate": []})
    history.append_event("resume-override", after_round=1)
    history.append({"round": 2, "evaluate": []})
    history.replace_round({"round": 1, "evaluate": [{"site": "a"}]})
    assert [r["evaluate"] for r in history.records()] == [[{"site": "a"}], []]
    assert len(history.events()) == 1
    with pytest.raises(ValueError, match="no round 3"):
        history.replace_round({"round": 3})


LIGHT_PROBE = """
import json, sys
from fedbrats.client.monai_import import MONAI_DEFERRED, MONAI_UNUSED, import_monai_light
import_monai_light()
skipped = [m for m in MONAI_UNUSED if m in sys.modules]
deferred = [m for m in MONAI_DEFERRED if m in sys.modules]
# nor any of their submodules: a deferred package imported and then thrown away would still cost its import
deferred += sorted({k for k in sys.modules for m in MONAI_DEFERRED + ("pydicom",) if k.startswith(m + ".")})
import torch
from monai.metrics import compute_hausdorff_distance  # MONAI's HD95 uses the deferred scipy.ndimage and KDTree
pred = torch.zeros(1, 1, 9, 9, 9); pred[..., 2:6, 2:6, 2:6] = 1
truth = torch.zeros(1, 1, 9, 9, 9); truth[..., 3:7, 2:6, 2:6] = 1
hd95 = float(compute_hausdorff_distance(pred, truth, percentile=95))
used = [m for m in ("scipy.ndimage", "scipy.spatial") if m in sys.modules]
from fedbrats.shared.models.losses import RegionLoss
import torch
x = torch.zeros(1, 3, 4, 4, 4)
loss = float(RegionLoss()(x, (x > 0).float()))
import pandas, scipy.signal  # still importable by whoever needs them
from scipy.signal import hilbert
print(json.dumps({"loaded": skipped, "monai": "monai.transforms" in sys.modules, "loss": loss, "deferred": deferred,
                  "hd95": hd95, "used": used}))
"""


@pytest.mark.slow
def test_a_site_imports_monai_without_what_it_never_uses(tmp_path):
    found = fresh_python(LIGHT_PROBE, tmp_path)
    assert found["loaded"] == [] and found["monai"] and np.isfinite(found["loss"])
    assert found["deferred"] == []  # MONAI imported without nibabel or scipy.ndimage/spatial ...
    assert found["hd95"] == 1.0 and found["used"] == ["scipy.ndimage", "scipy.spatial"]  # ... which load when used


def test_the_checkpoint_digest_read_from_the_bytes_is_record_digest():
    from flwr.app import Array, ArrayRecord

    from fedbrats.server.state import weights_digest
    from fedbrats.shared.records import record_digest

    record = ArrayRecord({"w": Array(np.arange(24, dtype=np.float32).reshape(2, 3, 4)), "i": Array(np.arange(5)),
                          "f": Array(np.asfortranarray(np.ones((3, 4), np.float32)) * 2), "s": Array(np.ones((), np.float64))})  # fmt: skip
    assert weights_digest(record) == record_digest(record)
    record["w"] = Array(np.zeros((2, 3, 4), np.float32))
    assert weights_digest(record) == record_digest(record)
