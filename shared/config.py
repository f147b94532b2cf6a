"""The run configuration: one schema, read from defaults, a TOML file, the CLI or Flower's run config.

Flower's run config is flat with hyphenated keys (``local-epochs``); our dataclass uses
underscores. `RunConfig.to_flower` / `RunConfig.from_flower` are the only translation. Every
value is checked when a RunConfig is built (so at the start of every command); an error names the
key as a user types it (``model-width``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: Settings sized for a 2-core CPU: the README's first command must finish in minutes.
DEMO = {
    "rounds": 8,
    "local_epochs": 1,
    "model_width": 16,
    "model_depth": 4,
    "patch_size": 48,
    "batch_size": 2,
    "phantom_voxel_size": 3.0,
}

#: Model constructor argument -> the RunConfig field that sets it (its run-config key has hyphens).
#: A model registered with another argument needs a field and a line here (tests/test_config.py checks).
MODEL_ARGUMENTS = {
    "width": "model_width",
    "depth": "model_depth",
    "deep_supervision": "deep_supervision",
    "dropout": "model_dropout",
    "act": "model_act",
    "se": "model_se",
    "n_classes": "model_classes",  # classifiers (shared.models.classifier)
    "class_head": "model_class_head",  # multi-task U-Nets: bottleneck | profile (shared.models.classifier)
    "slice_branch": "model_slice_branch",  # unetpp, bifpn: the slice-wise classification branch
    "fp_removal": "model_fp_removal",  # unetpp, bifpn: slices the branch calls negative lose the region
    "bifpn_layers": "model_bifpn_layers",  # bifpn
}
#: Constructor arguments fixed by the data (MODALITIES in, REGIONS out), never by the run configuration.
DATA_ARGUMENTS = ("in_channels", "out_channels")

#: The allowed values of enumerated fields. Copies of the owners' tuples (shared imports no client
#: code and no torch here); tests/test_config.py checks that they agree.
CHOICES: dict[str, tuple[str, ...]] = {
    "selection": ("all", "fraction", "fastest", "deadline"),  # strategies.selection
    "lr_schedule": ("cosine", "poly", "constant"),  # client.trainer.SCHEDULES
    "local_optimizer": ("adam", "sgd"),  # client.optimizers.OPTIMIZERS
    "cache": ("memory", "disk", "none"),
    "model_act": ("leakyrelu", "relu"),  # shared.models.blocks.ACTIVATIONS
    "dp_accountant": ("rdp", "prv"),  # client.ledger.ACCOUNTANTS
    "dp_grad_sample_mode": ("auto", "functorch", "hooks"),  # client.privacy.GRAD_SAMPLE_MODES
    "dp_eval_metrics": ("suppress", "aggregate"),  # client.privacy_plan.EVAL_RELEASE
    "attack": ("none", "scale", "signflip", "noise", "inflate", "labelflip"),  # client.attack.ATTACKS
    "task": ("segmentation", "classification", "multitask"),  # shared.tasks.TASKS
    "model_class_head": ("bottleneck", "profile"),  # shared.models.classifier.CLASS_HEADS
    "tracking": ("none", "tensorboard", "mlflow"),  # server.tracking.TRACKERS
    "hd95_definition": ("pooled", "max"),  # shared.evaluation.surface.HD95_DEFINITIONS
    "update_dtype": ("float32", "float16", "bfloat16"),  # shared.wire.UPDATE_DTYPES
}

#: Range of each numeric field: (test, what is expected). Add a line with a new numeric field.
RANGES: dict[str, tuple[Any, str]] = {
    "rounds": (lambda v: v >= 1, ">= 1"),
    "fraction_train": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "select_k": (lambda v: v >= 0, ">= 0 (0: half of the sites)"),
    "deadline_seconds": (lambda v: v >= 0, ">= 0"),
    "min_sites": (lambda v: v >= 1, ">= 1"),
    "eval_every": (lambda v: v >= 1, ">= 1"),
    "timeout": (lambda v: v > 0, "> 0 seconds"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "local_epochs": (lambda v: v >= 0, ">= 0"),
    "local_steps": (lambda v: v >= 0, ">= 0 (0: use local-epochs)"),
    "epoch_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr": (lambda v: v > 0, "> 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "proximal_mu": (lambda v: v >= 0, ">= 0"),
    "model_width": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8 (GroupNorm groups)"),
    "model_depth": (lambda v: v >= 2, ">= 2 (one downsampling at least)"),
    "model_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model_classes": (lambda v: v >= 2, ">= 2 (binary labels use 2 logits)"),
    "model_bifpn_layers": (lambda v: v >= 1, ">= 1"),
    "patch_size": (lambda v: v >= 1, ">= 1"),
    "foreground_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dp_epsilon": (lambda v: v > 0, "> 0 (the site's budget)"),
    "dp_delta": (lambda v: 0 <= v < 1, "in [0, 1) (0: derived from the number of cases)"),
    "dp_max_grad_norm": (lambda v: v > 0, "> 0"),
    "dp_noise_multiplier": (lambda v: v >= 0, ">= 0 (0: calibrated)"),
    "dp_target_epsilon": (lambda v: v >= 0, ">= 0 (0: the budget)"),
    "dp_max_physical_batch": (lambda v: v >= 0, ">= 0 (0: the batch size)"),
    "client_dp_noise_multiplier": (lambda v: v >= 0, ">= 0 (0: off)"),
    "client_dp_clipping_norm": (lambda v: v > 0, "> 0"),
    "client_dp_delta": (lambda v: 0 < v < 1, "in (0, 1)"),
    "client_dp_clipped_count_stddev": (lambda v: v >= 0, ">= 0"),
    "phantom_voxel_size": (lambda v: v > 0, "> 0 mm"),
    "dp_eval_min_cases": (lambda v: v >= 1, ">= 1"),
    "max_num_examples": (lambda v: v >= 0, ">= 0 (0: no cap beyond a site's first reply)"),
    "screen_norm_factor": (lambda v: v > 1, "> 1 (times the round's median update norm per local step)"),
    "screen_min_cosine": (lambda v: -1 <= v <= 1, "in [-1, 1]"),
    "attack_scale": (lambda v: v >= 0, ">= 0 (0: the attack's default)"),
    "class_input_size": (lambda v: v >= 8, ">= 8 voxels (edge of a classifier's cubic input)"),
    "multitask_weight": (lambda v: v >= 0, ">= 0 (weight of the classification loss)"),
    "sgd_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "control_average": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


@dataclass
class RunConfig:
    """Everything a federated run needs; defaults are full-size settings for GPU users."""

    # federation
    rounds: int = 20
    strategy: str = "fets_fedavgm"  # 3 seeds: federated / centralized 0.976 / 0.979 / 0.980 (RESULTS, "The ET gap")
    fraction_train: float = 1.0
    selection: str = "fraction"  # all | fraction | fastest | deadline (FeTS hooks, strategies.selection)
    select_k: int = 0  # sites per round for "fastest" (0: half of them)
    deadline_seconds: float = 0.0  # simulated seconds for "deadline"
    min_sites: int = 2
    eval_every: int = 1
    # after the last round, `fedbrats simulate` scores the global model as `fedbrats evaluate --split val`
    final_evaluation: bool = True
    # leave one institution out: train without this partition site, then score the model on all its cases
    holdout_site: str = ""
    # a train message also evaluates the incoming (previous round's) model: one message per site and round
    evaluate_in_train: bool = False
    timeout: float = 3600.0
    # precision of a site's update on the wire (shared.wire): float32 | float16 | bfloat16; weights stay float32
    update_dtype: str = "float32"
    seed: int = 0
    # local training
    local_epochs: int = 1
    local_steps: int = 0  # > 0 replaces epochs with a fixed number of steps
    epoch_decay: float = 1.0  # FeTS "train less each round": epochs x decay^min(round-1, 10)
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    # the sites' optimiser without DP-SGD and with it: adam | sgd (SCAFFOLD assumes SGD; give it its own lr)
    local_optimizer: str = "adam"
    sgd_momentum: float = 0.0  # local-optimizer = sgd only
    # SCAFFOLD sites: share of the previous round's control variate kept (0: the paper's, this round's gradients)
    control_average: float = 0.0
    # lr each round's config carries (FeTS "lr per round"): constant | exponential:decay=D |
    # step:milestone=M,decay=D | cosine[:min_lr=L], each with min_lr=L (strategies.selection.round_lr)
    lr_round_schedule: str = "constant"
    warmup_steps: int = 10
    batch_size: int = 2
    proximal_mu: float = 0.0
    # warm start: the initial global model from a fedbrats checkpoint of the same model ("": seeded random init)
    init_checkpoint: str = ""
    # what sites train: comma-separated fnmatch patterns over parameter names; the rest is frozen (docs/privacy.md)
    trainable: str = "*"
    # what is learnt (shared.tasks): region masks, one label per case from a labels CSV, or both
    task: str = "segmentation"  # segmentation | classification | multitask
    labels: str = ""  # labels CSV ("": found under the data folder, shared.data.case_labels.find_label_file)
    label_column: str = ""  # "": the labels file's default (Grade, MGMT_value)
    id_column: str = ""  # "": the labels file's default (Subject_ID, BraTS21ID)
    label_classes: str = ""  # class names in index order, comma-separated ("": sorted from the labels file)
    class_input_size: int = 64  # edge of a classifier's cubic input (brain cropped, resampled)
    multitask_weight: float = 0.5  # multitask loss = segmentation loss + weight x classification loss
    class_balance: bool = False  # classification loss weights a site's cases by inverse class frequency
    # model (every constructor argument, see MODEL_ARGUMENTS) and data
    model: str = "selfensemble"  # 3 seeds, benchmarks/RESULTS.md "The ET gap": federated ET 0.92 vs resunet 0.35
    model_width: int = 32
    model_depth: int = 5
    deep_supervision: bool = False
    model_dropout: float = 0.0
    model_act: str = "leakyrelu"
    model_se: bool = False
    model_classes: int = 2  # classifiers' output logits (2 for a binary label such as the grade)
    # multitask: class logits from the segmented tumour's profile (3 seeds: federated grade AUC 0.85 against
    # 0.63 for the classifier alone; RESULTS, "The profile head") or from the bottleneck (the encoder learns the class)
    model_class_head: str = "profile"
    model_slice_branch: bool = True  # unetpp, bifpn: slice-wise region classification (a BiLSTM along z)
    model_fp_removal: bool = True  # unetpp, bifpn: at inference, negative slices lose that region's voxels
    model_bifpn_layers: int = 3  # bifpn: BiFPN layers between encoder and decoder
    patch_size: int = 128
    # random patch size (bag of tricks, shared.data.patch_pool): "PATCHxBATCH,..." e.g. "64x4,96x2,128x1", each
    # step one of these batch shapes at random; "" = off (patch-size x batch-size; patch-size stays the inference window)
    patch_pool: str = ""
    foreground_prob: float = 0.5
    val_fraction: float = 0.2
    hd95_definition: str = "pooled"  # pooled (MedPy, BraTS evaluators) | max (MONAI): shared.evaluation.surface
    cache: str = "disk"
    # differential privacy at each site (DP-SGD, client/privacy.py); 0 means "work it out"
    dp: bool = False
    dp_epsilon: float = 8.0  # the site's budget over all rounds
    dp_delta: float = 0.0  # 0: min(1e-5, 0.1 / cases at the site)
    dp_max_grad_norm: float = 1.0
    dp_noise_multiplier: float = 0.0  # 0: calibrated once from dp_target_epsilon over all planned rounds
    dp_target_epsilon: float = 0.0  # 0: the budget
    dp_accountant: str = "rdp"
    dp_max_physical_batch: int = 0
    dp_grad_sample_mode: str = "auto"
    dp_eval_metrics: str = "suppress"  # what a DP site sends after evaluation: nothing, or means over enough cases
    dp_eval_min_cases: int = 10  # "aggregate" sends means only over at least this many validation cases
    # client-level DP at the server (DP-FedAvg, strategies/client_dp.py); noise 0 = off
    client_dp_noise_multiplier: float = 0.0
    client_dp_clipping_norm: float = 1.0
    client_dp_adaptive: bool = False
    client_dp_delta: float = 1e-5
    client_dp_clipped_count_stddev: float = 0.0
    # trust (docs/reliability.md): reply validation (server/replies.py), update screening
    # (server/screening.py), simulated attacks by named simulated sites (client/attack.py)
    max_num_examples: int = 100000  # cap on a reply's num-examples (0: only the site's first reply bounds it)
    screen_updates: bool = True
    screen_norm_factor: float = 10.0  # drop an update whose norm per local step exceeds this x the round's median
    # drop an update whose cosine to the round's median update is below this; -1 (default) = off: honest
    # sites with other labels (e.g. one holding only HGG) point away from the median (measured -0.3..-0.7)
    screen_min_cosine: float = -1.0
    attack: str = "none"  # none | scale | signflip | noise | inflate | labelflip
    attack_sites: str = ""  # comma-separated site IDs (partition IDs) that attack
    attack_scale: float = 0.0  # the attack's strength (0: its default; client.attack.DEFAULT_SCALES)
    # where data and results live
    data_dir: str = ""
    partition: str = ""
    out_dir: str = "runs/latest"
    resume_override: bool = False
    phantom_voxel_size: float = 1.0
    # experiment tracking of every round (server/tracking.py): none | tensorboard | mlflow; tracking-uri: an
    # MLflow tracking server (default "": a local store inside the run folder)
    tracking: str = "none"
    tracking_uri: str = ""
    # strategy parameters, flattened as "strategy-<name>" keys in Flower's run config
    strategy_params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the type, finiteness and range of every value; one error lists every problem."""
        problems = self._type_problems()
        if not problems:  # ranges need the right types
            problems = self._value_problems()
        if problems:
            raise ValueError("invalid run configuration: " + "; ".join(problems))

    def _type_problems(self) -> list[str]:
        problems = []
        for f in fields(self):
            value, kind, key = getattr(self, f.name), _kind(f), _key(f.name)
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)  # TOML's `lr = 1` is a float setting
            if kind == "dict":
                problems += _strategy_param_problems(value)
            elif not _is(value, kind):
                problems.append(f"{key} must be {_KIND_NAMES[kind]}, got {value!r}")
            elif kind == "float" and not math.isfinite(value):
                problems.append(f"{key} must be a finite number, got {value!r}")
        return problems

    def _value_problems(self) -> list[str]:
        problems = []
        for name, (ok, expected) in RANGES.items():
            value = getattr(self, name)
            if not ok(value):
                problems.append(f"{_key(name)} must be {expected}, got {value!r}")
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                problems.append(f"{_key(name)} must be one of {', '.join(choices)}, got {value!r}")
        if self.selection == "deadline" and self.deadline_seconds <= 0:
            problems.append("selection 'deadline' needs deadline-seconds > 0")
        if self.local_epochs < 1 and self.local_steps < 1:
            problems.append("one of local-epochs or local-steps must be >= 1")
        if not any(p.strip() for p in self.trainable.split(",")):
            problems.append(f"trainable must hold parameter-name patterns ('*': all), got {self.trainable!r}")
        if self.tracking_uri and self.tracking != "mlflow":
            problems.append(f"tracking-uri applies to tracking = mlflow only, got tracking = {self.tracking!r}")
        if self.attack != "none" and not self.attack_sites.strip(", "):
            problems.append(f"attack {self.attack!r} needs attack-sites (comma-separated site IDs)")
        multiple = 2 ** (self.model_depth - 1)
        if self.model_depth >= 2 and self.patch_size % multiple:
            problems.append(
                f"patch-size must be a multiple of 2^(model-depth - 1) = {multiple}, got {self.patch_size}"
            )
        if self.patch_pool:
            from fedbrats.shared.data.patch_pool import pool_problems

            problems += pool_problems(self.patch_pool, multiple=multiple, dp=self.dp, task=self.task)
        return problems

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size,) * 3

    @property
    def model_config(self) -> dict[str, Any]:
        """The constructor arguments of `self.model`, passed unchanged to `create_model(self.model, **...)`.

        Only the arguments that model takes; a key it does not take, set away from its default, is an
        error naming the key (it would otherwise be ignored without a word).
        """
        accepted = model_arguments(self.model)
        defaults = {f.name: f.default for f in fields(self)}
        ignored = [_key(name) for arg, name in MODEL_ARGUMENTS.items()
                   if arg not in accepted and getattr(self, name) != defaults[name]]  # fmt: skip
        if ignored:
            raise ValueError(
                f"run configuration key(s) {', '.join(ignored)} do not apply to model {self.model!r} "
                f"(it takes {', '.join(_key(MODEL_ARGUMENTS[a]) for a in accepted)})"
            )
        from fedbrats.shared.tasks import task_for  # the task decides the head (e.g. none for segmentation)

        arguments = {arg: getattr(self, MODEL_ARGUMENTS[arg]) for arg in accepted}
        return task_for(self).model_arguments(self, arguments)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed; unknown names are an error naming them."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown run configuration keys: {unknown}")
        return dataclasses.replace(self, **changes)

    # --- Flower's flat run config -------------------------------------------------
    def to_flower(self) -> dict[str, bool | int | float | str]:
        flat: dict[str, bool | int | float | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "strategy_params":
                flat.update({f"strategy-{k.replace('_', '-')}": float(v) for k, v in value.items()})
            else:
                flat[_key(f.name)] = value
        return flat

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        params: dict[str, float] = {}
        for key, value in run_config.items():
            if key.startswith("strategy-"):
                params[key.removeprefix("strategy-").replace("-", "_")] = _coerce("float", value, key)
                continue
            name = key.replace("-", "_")
            if name not in known or name == "strategy_params":
                raise ValueError(f"unknown run configuration key {key!r}")
            values[name] = _coerce(_kind(known[name]), value, key)
        return cls(**values, strategy_params=params)

    @classmethod
    def from_toml(cls, path: Path, base: RunConfig | None = None) -> RunConfig:
        """Read a TOML file of top-level keys (underscores or hyphens) over `base`."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot read run configuration {path}: {err}") from err
        base = base or cls()
        params = {**base.strategy_params, **data.pop("strategy_params", data.pop("strategy-params", {}))}
        changes = {k.replace("-", "_"): v for k, v in data.items()}
        try:
            return base.replace(**changes, strategy_params=params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def model_arguments(model: str) -> list[str]:
    """The constructor arguments of registered model `model` that the run configuration sets.

    Imports the model registry (and torch) only when asked, so reading a configuration stays cheap.
    """
    from fedbrats.shared.models import MODELS

    signature = inspect.signature(MODELS.get(model))
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in signature.parameters.values()
                if p.kind in plain and p.name not in ("self", *DATA_ARGUMENTS)]  # fmt: skip
    unreachable = [a for a in accepted if a not in MODEL_ARGUMENTS]
    if unreachable:
        raise ValueError(
            f"model {model!r} takes {unreachable}, which no run configuration key sets; "
            "add a field to RunConfig and a line to shared.config.MODEL_ARGUMENTS"
        )
    return accepted


_KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _key(name: str) -> str:
    """The run-configuration key of a field, as `--set` and Flower's run config spell it."""
    return name.replace("_", "-")


def _kind(f: dataclasses.Field) -> str:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return "dict" if kind.startswith("dict") else kind


def _is(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float)
    return isinstance(value, str)


def _strategy_param_problems(params: Any) -> list[str]:
    if not isinstance(params, dict):
        return [f"strategy parameters must be a table of numbers, got {params!r}"]
    problems = []
    for name, value in params.items():
        key = f"strategy-{str(name).replace('_', '-')}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key} must be a number, got {value!r}")
        elif not math.isfinite(value):
            problems.append(f"{key} must be a finite number, got {value!r}")
    return problems


def _coerce(kind: str, value: Any, key: str) -> Any:
    """A Flower run-config or `--set` value (often a string) as the field's type; errors name the key."""
    expected = {"bool": "bool (true or false)", "int": "int", "float": "float (a number)"}.get(kind, kind)
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            if value not in (True, False, 0, 1):
                raise ValueError
            return bool(value)
        if kind == "int":
            number = float(value)
            if isinstance(value, bool) or number != int(number):
                raise ValueError
            return int(number)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"run configuration key {key!r} expects {expected}, got {value!r}") from None
    return str(value)
