"""Model weights <-> Flower ArrayRecord, without pickle, always fp32 (bf16 arrays fail in Flower)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import ArrayRecord


def model_to_record(model: torch.nn.Module) -> ArrayRecord:
    """The model's state as an ArrayRecord of fp32 (float) tensors, keyed by parameter name."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in model.state_dict().items()}
    return ArrayRecord(state)


def record_to_model(record: ArrayRecord, model: torch.nn.Module) -> torch.nn.Module:
    """Load an ArrayRecord into `model` (strict: a missing or extra name is an error)."""
    model.load_state_dict(record.to_torch_state_dict(), strict=True)
    return model


def record_nbytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord: what crosses the network for one site."""
    return int(sum(len(array.data) for array in record.values()))


def record_digest(record: ArrayRecord) -> str:
    """SHA-256 over names and raw array bytes: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name in sorted(record.keys()):
        array = record[name].numpy()
        digest.update(name.encode())
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
