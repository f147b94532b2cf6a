"""Server checkpoint after every round: global weights, round, strategy state, history position.

A round's checkpoint is two safetensors files (no pickle): ``global.safetensors.r<k>`` holds the
weights and, in its header, everything else (round, digests, strategy metadata, array order), so it
describes itself; ``strategy.safetensors.r<k>`` holds the strategy's arrays. Both are written through
the atomic write and read back to check their digests before ``server_state.json`` (the commit point)
names the new round; the previous round's files are kept, so a checkpoint damaged later still leaves
one to fall back to. Loading checks the digests and falls back, saying so, to the newest intact round.

A strategy with state (FedOpt moments, FedPIDAvg loss history) exposes ``state_dict()`` returning
``(arrays: dict[str, ndarray], meta: dict)`` and ``load_state_dict(arrays, meta)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load, save

from fedbrats.shared.atomic import atomic_write, atomic_write_json
from fedbrats.shared.config import MODEL_ARGUMENTS, RunConfig
from fedbrats.strategies.arithmetic import record_views, to_array

log = logging.getLogger("fedbrats.server")

WEIGHTS = "global.safetensors"
STRATEGY = "strategy.safetensors"
META = "server_state.json"
RUN_CONFIG = "run_config.json"
_ROUND_FILE = re.compile(r"^(?:global|strategy)\.safetensors\.r(\d+)$")

#: Run-configuration keys that may differ when a run is resumed, because they change how the run is
#: operated, not what it computes: `rounds` (train longer or stop earlier, never below the rounds
#: already completed; the learning-rate schedule then follows the new total), `out-dir` (the same
#: folder reached by another path), `timeout` and `min-sites` (how long to wait, how many replies a
#: round needs), and `resume-override` itself. Any other difference needs `resume-override = true`.
RESUMABLE_CHANGES = frozenset({"rounds", "out-dir", "timeout", "min-sites", "resume-override", "tracking",
                               "tracking-uri", "final-evaluation"})  # fmt: skip
#: What a run started before a key existed did, where that is not the key's default today; any other
#: key missing from a stored configuration ran as its default does (a new key keeps old behaviour).
LEGACY_VALUES = {"hd95-definition": "max", "model-class-head": "bottleneck"}


class ResumeError(RuntimeError):
    """A run folder that cannot be resumed as it is; the message says why and how to start over."""


@dataclass
class ServerState:
    round: int
    arrays: ArrayRecord
    meta: dict[str, Any] = field(default_factory=dict)
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_meta: dict[str, Any] = field(default_factory=dict)
    #: Why newer checkpoints were passed over when this one was loaded (empty: it is the newest).
    skipped: list[str] = field(default_factory=list)


def weights_digest(arrays: ArrayRecord | dict[str, np.ndarray]) -> str:
    """`shared.records.record_digest` (same SHA-256) read from the arrays' bytes without parsing each .npy."""
    views = record_views(arrays) if isinstance(arrays, ArrayRecord) else arrays
    digest = hashlib.sha256()
    for name in sorted(views):
        array = views[name]
        digest.update(name.encode())
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _start_over(run_dir: Path) -> str:
    return f"to start over, remove {run_dir} or choose another --out"


def save_state(folder: Path, state: ServerState) -> None:
    """Write round `state.round`, verify it, commit it in server_state.json, keep one previous round."""
    folder = Path(folder)
    strategy_bytes = save(
        {k: np.ascontiguousarray(v) for k, v in state.strategy_arrays.items()} or {"_empty": np.zeros(0, np.float32)}
    )
    views = record_views(state.arrays)
    digest = weights_digest(views)
    header = {
        "round": state.round,
        "digest": digest,
        "strategy_sha256": hashlib.sha256(strategy_bytes).hexdigest(),
        "strategy_meta": state.strategy_meta,
        "array_order": list(state.arrays.keys()),  # safetensors sorts names; positional strategies need the order
        "meta": state.meta,
    }
    weights = {name: np.ascontiguousarray(array) for name, array in views.items()}
    names = {"weights": f"{WEIGHTS}.r{state.round}", "strategy": f"{STRATEGY}.r{state.round}"}
    atomic_write(folder / names["strategy"], strategy_bytes)
    atomic_write(folder / names["weights"], save(weights, metadata={k: json.dumps(v) for k, v in header.items()}))
    try:
        _load_round(folder, state.round)  # read back: never commit a checkpoint that does not verify
    except ValueError as err:
        raise RuntimeError(
            f"the checkpoint of round {state.round} in {folder} did not verify after writing ({err}); "
            "the previous checkpoint is still the committed one"
        ) from err
    atomic_write_json(folder / META, {**header, **state.meta, **names})  # the commit point
    earlier = [r for r in checkpoint_rounds(folder) if r < state.round]
    keep = {state.round, *earlier[:1]}  # the new round and one to fall back to
    for old in folder.iterdir():
        match = _ROUND_FILE.match(old.name)
        if match and int(match.group(1)) not in keep:
            old.unlink(missing_ok=True)


def checkpoint_rounds(folder: Path) -> list[int]:
    """Rounds that have a weights file in `folder`, newest first."""
    if not Path(folder).is_dir():
        return []
    found = {int(m.group(1)) for p in Path(folder).iterdir() if (m := _ROUND_FILE.match(p.name)) and p.name.startswith("global")}
    return sorted(found, reverse=True)


def _load_round(folder: Path, rnd: int) -> ServerState:
    """Round `rnd` from its own files, digests checked; ValueError says what is wrong."""
    weights_path, strategy_path = folder / f"{WEIGHTS}.r{rnd}", folder / f"{STRATEGY}.r{rnd}"
    for path in (weights_path, strategy_path):
        if not path.is_file():
            raise ValueError(f"{path.name} is missing")
    try:
        with safe_open(str(weights_path), framework="np") as handle:
            header = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        weights = load(weights_path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path.name} is unreadable ({err})") from err
    try:
        strategy_bytes = strategy_path.read_bytes()
        strategy_arrays = load(strategy_bytes)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{strategy_path.name} is unreadable ({err})") from err
    if "digest" not in header:  # fedbrats before per-round headers: the rest lives in server_state.json
        header = _legacy_header(folder, rnd, strategy_bytes)
    order = header.get("array_order") or sorted(weights)
    if sorted(order) != sorted(weights):
        raise ValueError(f"{weights_path.name} holds arrays {sorted(weights)}, its header names {sorted(order)}")
    arrays = ArrayRecord({k: to_array(weights[k]) for k in order})
    stored = header["digest"]
    if weights_digest({k: weights[k] for k in order}) != stored:
        raise ValueError(f"{weights_path.name} does not match its stored digest {stored[:12]}")
    if hashlib.sha256(strategy_bytes).hexdigest() != header.get("strategy_sha256"):
        raise ValueError(f"{strategy_path.name} does not match its stored digest")
    if int(header.get("round", -1)) != rnd:
        raise ValueError(f"{weights_path.name} says it is round {header.get('round')}")
    strategy_arrays.pop("_empty", None)
    meta = dict(header.get("meta") or {})
    return ServerState(rnd, arrays, meta, strategy_arrays, dict(header.get("strategy_meta") or {}))


def _legacy_header(folder: Path, rnd: int, strategy_bytes: bytes) -> dict[str, Any]:
    """The header of a checkpoint written before digests lived in each round's file."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"written by an older fedbrats and {META} is unreadable ({err})") from None
    if meta.get("round") != rnd or not meta.get("digest"):
        raise ValueError("written by an older fedbrats, without a stored digest")
    extra = {k: v for k, v in meta.items() if k not in ("round", "weights", "strategy", "strategy_meta", "array_order")}
    return {
        "round": rnd,
        "digest": meta["digest"],
        "strategy_sha256": hashlib.sha256(strategy_bytes).hexdigest(),  # older files had none to check
        "strategy_meta": meta.get("strategy_meta", {}),
        "array_order": meta.get("array_order"),
        "meta": extra,
    }


def load_state(folder: Path) -> ServerState | None:
    """The newest intact checkpoint, or None when the folder holds none (no server_state.json).

    A damaged server_state.json is a `ResumeError`; a damaged newest round falls back to the round
    before it, with a warning, and the state lists what was skipped (`.skipped`).
    """
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        return None
    try:
        committed = int(json.loads(meta_path.read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"{meta_path} is damaged ({err}); it says which round the run completed, so the run in "
            f"{folder.parent} cannot be resumed safely; {_start_over(folder.parent)}"
        ) from None
    skipped: list[str] = []
    for rnd in [committed] + [r for r in checkpoint_rounds(folder) if r < committed]:
        try:
            state = _load_round(folder, rnd)
        except ValueError as err:
            skipped.append(f"round {rnd}: {err}")
            log.warning("checkpoint of round %d in %s is damaged: %s; trying an earlier one", rnd, folder, err)
            continue
        state.skipped = skipped
        if skipped:
            log.warning("resuming from the checkpoint of round %d instead of round %d", rnd, committed)
        return state
    raise ResumeError(
        f"no intact checkpoint in {folder} (server_state.json says round {committed}): {'; '.join(skipped)}; "
        f"{_start_over(folder.parent)}"
    )


# --- the run configuration stored with the run ------------------------------------------------
def write_run_config(run_dir: Path, config: RunConfig) -> Path:
    return atomic_write_json(Path(run_dir) / RUN_CONFIG, config.to_flower())


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The stored run configuration (Flower's flat keys), None when the run has none."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"{path} is damaged ({err}); {_start_over(Path(run_dir))}") from None
    if not isinstance(stored, dict):
        raise ResumeError(f"{path} should hold a JSON object of run-configuration keys; {_start_over(Path(run_dir))}")
    return stored


def config_changes(stored: dict[str, Any], config: RunConfig) -> dict[str, list[Any]]:
    """Keys whose value differs from the stored configuration, as {key: [stored, now]}, minus the resumable ones."""
    now = config.to_flower()
    defaults = type(config)().to_flower()
    stored = {**defaults, **LEGACY_VALUES, **stored}
    unread = _unread_model_keys(config)
    return {
        key: [stored.get(key), now.get(key)]
        for key in sorted(set(stored) | set(now))
        if key not in RESUMABLE_CHANGES | unread and stored.get(key) != now.get(key)
    }


def _unread_model_keys(config: RunConfig) -> frozenset[str]:
    """Model keys the run's model and task do not build from (a class head's kind in a segmentation run):
    they change nothing it computes, so a difference in them is no change. A change of model is."""
    used = set(config.model_config)
    return frozenset(field.replace("_", "-") for arg, field in MODEL_ARGUMENTS.items() if arg not in used)


def check_resume_config(run_dir: Path, config: RunConfig, completed_round: int) -> dict[str, list[Any]]:
    """Refuse to resume with another configuration unless `resume_override` is set; return what differs."""
    if config.rounds < completed_round:
        raise ResumeError(
            f"rounds = {config.rounds}, but the run in {run_dir} already completed {completed_round} rounds; "
            f"ask for at least {completed_round} rounds, or {_start_over(Path(run_dir))}"
        )
    stored = read_run_config(run_dir)
    if stored is None:
        log.warning("%s has no %s: the configuration it was started with cannot be checked", run_dir, RUN_CONFIG)
        return {}
    changes = config_changes(stored, config)
    if changes and not config.resume_override:
        detail = ", ".join(f"{k}: {before!r} -> {now!r}" for k, (before, now) in changes.items())
        raise ResumeError(
            f"the run in {run_dir} was started with another configuration ({detail}); resume it with the "
            f"configuration in {Path(run_dir) / RUN_CONFIG}, set resume-override = true to continue anyway "
            f"(recorded in its history), or {_start_over(Path(run_dir))}"
        )
    if changes:
        log.warning("resuming %s with another configuration (resume-override): %s", run_dir, sorted(changes))
    return changes
