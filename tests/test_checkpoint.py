"""Checkpoints: safetensors only (no pickle), bit-identical round trip, metadata, atomic writes, clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from fedbrats.shared.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from fedbrats.shared.models import create_model


def _model(seed: int = 0, **config):
    torch.manual_seed(seed)
    return create_model("resunet", **{"width": 8, "depth": 2, **config})


def _safetensors_layout(path):
    """Parse the file by hand: 8-byte header length, JSON header, raw tensor bytes; nothing else."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return raw, n, header


def test_round_trip_is_bit_identical_and_carries_metadata(tmp_path):
    model = _model(se=True)
    path = save_checkpoint(
        tmp_path / "ckpt.safetensors", model, extra={"patch_size": (16, 16, 16), "label_set": "brats2021", "round": 3}
    )
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is type(model)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert meta["model_name"] == "resunet"
    assert meta["model_config"]["width"] == 8 and meta["model_config"]["se"] is True
    assert meta["patch_size"] == [16, 16, 16]
    assert meta["label_set"] == "brats2021" and meta["round"] == 3
    assert not loaded.training  # ready for inference


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "c.safetensors", model, extra={"round": 1})
    raw, n, header = _safetensors_layout(path)
    metadata = header.pop("__metadata__")
    assert metadata["format"].startswith("fedbrats-checkpoint")
    assert json.loads(metadata["model_config"])["depth"] == 2
    end = max(entry["data_offsets"][1] for entry in header.values())
    assert 8 + n + end == len(raw)  # every byte is header or tensor data: no room for a pickle
    assert set(header) == set(model.state_dict())
    assert {entry["dtype"] for entry in header.values()} == {"F32"}


def test_weights_are_saved_fp32(tmp_path):
    model = _model().double()
    path = save_checkpoint(tmp_path / "c.safetensors", model)
    _, _, header = _safetensors_layout(path)
    header.pop("__metadata__")
    assert {entry["dtype"] for entry in header.values()} == {"F32"}
    loaded, _ = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _model(0), extra={"round": 1})
    save_checkpoint(path, _model(1), extra={"round": 2})
    assert read_metadata(path)["round"] == 2
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(path, _model(2), extra={"round": object()})
    assert read_metadata(path)["round"] == 2  # the failed save did not touch the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_reserved_and_missing_names_are_errors(tmp_path):
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "c.safetensors", _model(), extra={"model_name": "x"})
    with pytest.raises(CheckpointError, match="model_name"):
        save_checkpoint(tmp_path / "c.safetensors", torch.nn.Conv3d(4, 3, 1))


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(foreign)


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _model(), model_name="resunet",
                           model_config={"width": 16, "depth": 2})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_a_stored_digest_is_checked_on_load(tmp_path):
    from fedbrats.shared.records import model_to_record, record_digest

    model = _model()
    digest = record_digest(model_to_record(model))
    path = save_checkpoint(tmp_path / "c.safetensors", model, extra={"digest": digest})
    _, meta = load_checkpoint(path)  # the digest of the weights as saved and reloaded is the server's
    assert meta["digest"] == digest
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the digest stored"):
        load_checkpoint(path)
