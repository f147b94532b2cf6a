"""Server checkpoint after every round: global weights, round, strategy state, history position.

Weights go to safetensors (no pickle); everything else to JSON. Both are written to temporary
files and renamed, weights first, so a crash leaves the previous round's checkpoint intact.
A strategy with state (FedOpt moments, FedPIDAvg loss history) exposes ``state_dict()`` returning
``(arrays: dict[str, ndarray], meta: dict)`` and ``load_state_dict(arrays, meta)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

WEIGHTS = "global.safetensors"
STRATEGY = "strategy.safetensors"
META = "server_state.json"


@dataclass
class ServerState:
    round: int
    arrays: ArrayRecord
    meta: dict[str, Any] = field(default_factory=dict)
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_meta: dict[str, Any] = field(default_factory=dict)


def _atomic_save(arrays: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_state(folder: Path, state: ServerState) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: array.numpy() for name, array in state.arrays.items()}
    _atomic_save(weights, folder / f"{WEIGHTS}.r{state.round}", {"round": str(state.round)})
    _atomic_save(state.strategy_arrays or {"_empty": np.zeros(0, np.float32)}, folder / f"{STRATEGY}.r{state.round}")
    meta = {
        "round": state.round,
        "weights": f"{WEIGHTS}.r{state.round}",
        "strategy": f"{STRATEGY}.r{state.round}",
        "strategy_meta": state.strategy_meta,
        "array_order": list(state.arrays.keys()),  # safetensors sorts names; positional strategies need the model's order
        **state.meta,
    }
    tmp = folder / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, folder / META)  # the commit point: the new round is now the checkpoint
    for old in folder.glob("*.safetensors.r*"):
        if not old.name.endswith(f".r{state.round}"):
            old.unlink(missing_ok=True)


def load_state(folder: Path) -> ServerState | None:
    """The last completed round's state, or None when the folder holds no checkpoint."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        weights = load_file(str(Path(folder) / meta["weights"]))
        strategy_arrays = load_file(str(Path(folder) / meta["strategy"]))
    except Exception as err:  # noqa: BLE001 - any unreadable part means no usable checkpoint
        raise RuntimeError(f"server checkpoint in {folder} is unreadable: {err}") from err
    strategy_arrays.pop("_empty", None)
    rnd = int(meta.pop("round"))
    strategy_meta = meta.pop("strategy_meta", {})
    meta.pop("weights"), meta.pop("strategy")
    order = meta.pop("array_order", None) or list(weights)
    return ServerState(rnd, ArrayRecord({k: Array(weights[k]) for k in order}), meta, strategy_arrays, strategy_meta)
