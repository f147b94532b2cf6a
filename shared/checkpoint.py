"""Checkpoints that carry their own configuration: safetensors weights + JSON metadata, no pickle.

A FeTS complaint was "which model, which patch size, which labels does this file belong to?".
Here the file answers: the model name and its constructor config, the patch size, the label set and
the round live in the safetensors header, so `load_checkpoint(path)` rebuilds the model alone and
loading a checkpoint can never execute code (safetensors holds tensors and strings only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from fedbrats.shared.atomic import atomic_write

#: Written into every checkpoint; bump when the metadata layout changes.
FORMAT = "fedbrats-checkpoint-v1"
_RESERVED = ("format", "model_name", "model_config")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not describe a model we can build."""


def _jsonable(value: Any) -> Any:
    """Tuples become lists and paths strings, so the metadata survives JSON unchanged in meaning."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "name") and not isinstance(value, str | int | float | bool):
        return value.name  # LabelSet, Layout: stored by name
    return value


def state_dict_fp32(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of the state dict; floating tensors as fp32 (Flower and DP need fp32)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.contiguous().clone()
    return out


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    model_name: str | None = None,
    model_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` to `path` through the atomic write, so a crash never leaves half a checkpoint.

    `model_name`/`model_config` default to the `model_name`/`config` attributes that
    `shared.models.create_model` sets. `extra` (patch_size, label_set, round, metrics, ...) must be
    JSON-serialisable; it comes back merged into the metadata of `load_checkpoint`.
    """
    path = Path(path)
    model_name = model_name or getattr(model, "model_name", None)
    if model_config is None:
        model_config = getattr(model, "config", None)
    if not model_name or model_config is None:
        raise CheckpointError(
            f"cannot save {path}: model_name and model_config are needed to rebuild the model "
            "(pass them, or build the model with shared.models.create_model)"
        )
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise CheckpointError(f"extra metadata keys {clash} are reserved; rename them")
    metadata = {"format": FORMAT, "model_name": str(model_name), "model_config": json.dumps(_jsonable(model_config))}
    try:
        metadata.update({str(k): json.dumps(_jsonable(v)) for k, v in extra.items()})
    except TypeError as err:
        raise CheckpointError(f"extra metadata for {path} is not JSON-serialisable: {err}") from err
    return atomic_write(path, save(state_dict_fp32(model), metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint without loading the weights (model_name, model_config, extras)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; expected a .safetensors file from fedbrats")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a safetensors checkpoint: {err}") from err
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has format {raw.get('format')!r}; expected {FORMAT!r} (a checkpoint written by fedbrats)"
        )
    meta: dict[str, Any] = {"format": raw["format"], "model_name": raw.get("model_name")}
    for key, value in raw.items():
        if key in ("format", "model_name"):
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({err})") from err
    if not meta.get("model_name") or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{path} lacks model_name/model_config metadata; cannot rebuild the model")
    return meta


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights alone, as CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            out[key] = f.get_tensor(key)
    return out


def check_digest(path: str | Path, state: dict[str, torch.Tensor], stored: str | None) -> None:
    """Raise CheckpointError when `stored` (a `records.record_digest`) is given and the weights differ from it."""
    if not stored:
        return
    from flwr.app import ArrayRecord

    from fedbrats.shared.records import record_digest

    actual = record_digest(ArrayRecord(state))
    if actual != stored:
        raise CheckpointError(
            f"{path}: the weights do not match the digest stored with them ({actual[:12]} != {str(stored)[:12]}); "
            "the file is damaged: use another copy or the run's server checkpoint"
        )


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the checkpoint, load its weights strictly, return (model in eval mode, metadata).

    When the metadata carries a `digest` (the server's final model does), the weights must match it:
    a damaged file is an error, not a silently different model.
    """
    from fedbrats.shared.models import create_model

    meta = read_metadata(path)
    try:
        model = create_model(meta["model_name"], **meta["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build model {meta['model_name']!r}: {err}") from err
    load_weights(model, path, meta, f"{path}: weights do not fit model {meta['model_name']!r} {meta['model_config']}")
    model.eval()
    return model, meta


def load_weights(
    model: torch.nn.Module, path: Path, meta: dict[str, Any], misfit: str, *, as_built: str = ""
) -> dict[str, Any]:
    """Put the checkpoint's weights into `model` (strict names), checked against the metadata's digest.

    Weights named `as_built*` (a prefix; "" = none) must be absent from the file and keep the model's
    own values, e.g. the class head a segmentation checkpoint lacks. Returns the state read; a damaged
    file or weights that do not fit are a CheckpointError (`misfit` starts its message)."""
    state = load_state(path)
    check_digest(path, state, meta.get("digest"))
    if as_built:
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in state and not k.startswith(as_built)]
        unexpected = [k for k in state if k not in wanted or k.startswith(as_built)]
        problems = [f"{what} {names[:5]}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        if problems:
            raise CheckpointError(f"{misfit}: {', '.join(problems)} (weights under {as_built!r} keep the model's own)")
    try:
        model.load_state_dict(state, strict=not as_built)
    except RuntimeError as err:
        raise CheckpointError(f"{misfit}: {err}") from err
    return state
