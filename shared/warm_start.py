"""Warm start (run key `init-checkpoint`): the initial model from a fedbrats checkpoint, checked as untrusted input.

DP-SGD learns far better from a model pre-trained on public data than from random weights (the
DP recipe in docs/privacy.md: `fedbrats train` on a phantom of another seed stands in for public
data outside the federation). The federation's server (`server.app.initial_model`) and
`fedbrats train` both start from it. The file is input from outside the run: it must be a fedbrats
checkpoint (safetensors, so loading cannot execute code), of the run's task, model name and model
configuration (an error names the file and every differing key), and its weights must match the
digest stored with them when it has one.

A segmentation checkpoint also starts a `multitask` run of the same U-Net: the consortium that has a
segmentation model adds a case label without retraining it; the class head starts as the model builds it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord
from torch import nn

from fedbrats.shared.checkpoint import CheckpointError, load_weights, read_metadata
from fedbrats.shared.config import MODEL_ARGUMENTS, RunConfig
from fedbrats.shared.records import record_digest

_MISSING = "(absent)"
#: the multi-task U-Net's class head: its constructor arguments and its weights' prefix
HEAD_ARGUMENTS = ("n_classes", "class_head")
HEAD_PREFIX = "class_head."


def adds_a_head(found_task: str | None, config: RunConfig) -> bool:
    """True when a segmentation checkpoint (or one older than tasks) starts a multitask run's U-Net."""
    return config.task == "multitask" and found_task in (None, "segmentation")


@dataclass(frozen=True)
class WarmStart:
    """Where the initial weights came from: the checkpoint's path and the digest of its weights."""

    path: str
    digest: str

    def describe(self) -> str:
        return f"warm start from {self.path} (digest {self.digest[:12]})"


def _key_name(arg: str) -> str:
    """A constructor argument as the user sets it: `width (model-width)`."""
    field = MODEL_ARGUMENTS.get(arg)
    return f"{arg} ({field.replace('_', '-')})" if field else arg


def _with_defaults(model: str, found: dict) -> dict:
    """A checkpoint's model config with the constructor's defaults for the arguments it does not name:
    one written before an argument existed was built with that argument's default."""
    from fedbrats.shared.models import MODELS

    try:
        parameters = inspect.signature(MODELS.get(model)).parameters.values()
    except (KeyError, TypeError, ValueError):
        return found
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {**defaults, **found} if set(found) <= set(defaults) else found


def check_compatible(path: Path, meta: dict, config: RunConfig, expected: dict) -> None:
    """Raise CheckpointError unless the checkpoint's task, model name and model config (`expected`: the
    run's model's full constructor arguments, `model.config`) are the run's."""
    found_task = meta.get("task")
    head = adds_a_head(found_task, config)
    if found_task is not None and found_task != config.task and not head:
        raise CheckpointError(
            f"init-checkpoint {path} holds a {found_task} model ({meta['model_name']!r}); this run's task is "
            f"{config.task}: a warm start needs a checkpoint of the same task and model (e.g. `fedbrats train` "
            f"with the run's model settings on public or phantom data)"
        )
    found = _with_defaults(config.model, meta["model_config"])
    if head:  # the segmentation checkpoint has no class head to compare
        found, expected = ({k: v for k, v in d.items() if k not in HEAD_ARGUMENTS} for d in (found, expected))
    differences = [f"model: expected {config.model!r}, found {meta['model_name']!r}"] * (
        meta["model_name"] != config.model
    )
    differences += [f"{_key_name(k)}: expected {expected.get(k, _MISSING)!r}, found {found.get(k, _MISSING)!r}"
                    for k in sorted(set(expected) | set(found)) if expected.get(k, _MISSING) != found.get(k, _MISSING)]  # fmt: skip
    if differences:
        raise CheckpointError(f"init-checkpoint {path} does not fit this run's model: {'; '.join(differences)} "
                              "(set the run's model keys as the checkpoint has them, or train a matching one)")  # fmt: skip


def load_warm_start(model: nn.Module, config: RunConfig) -> WarmStart:
    """Load `config.init_checkpoint` into `model` (strict names and shapes); return its source.

    Raises CheckpointError (a ValueError) naming the file: missing, not a fedbrats checkpoint, another
    task, model or model configuration, weights that do not match their stored digest or the model.
    """
    path = Path(config.init_checkpoint).expanduser()
    if not config.init_checkpoint:
        raise ValueError("init-checkpoint is empty: there is nothing to warm-start from")
    if not path.is_file():
        raise CheckpointError(f"init-checkpoint {path} does not exist; expected a .safetensors file written by "
                              "fedbrats (e.g. RUN_DIR/checkpoint.safetensors of `fedbrats train`)")  # fmt: skip
    meta = read_metadata(path)
    check_compatible(path, meta, config, dict(getattr(model, "config", None) or config.model_config))
    state = load_weights(model, path, meta, f"init-checkpoint {path}: its weights do not fit model {config.model!r}",
                         as_built=HEAD_PREFIX if adds_a_head(meta.get("task"), config) else "")  # fmt: skip
    return WarmStart(str(path.resolve()), record_digest(ArrayRecord(state)))

