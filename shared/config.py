"""The run configuration: one schema, read from defaults, a TOML file, the CLI or Flower's run config.

Flower's run config is flat with hyphenated keys (``local-epochs``); our dataclass uses
underscores. `RunConfig.to_flower` / `RunConfig.from_flower` are the only translation.
"""

from __future__ import annotations

import dataclasses
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


@dataclass
class RunConfig:
    """Everything a federated run needs; defaults are full-size settings for GPU users."""

    # federation
    rounds: int = 20
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    selection: str = "fraction"  # all | fraction | fastest | deadline (FeTS hooks, strategies.selection)
    select_k: int = 0  # sites per round for "fastest" (0: half of them)
    deadline_seconds: float = 0.0  # simulated seconds for "deadline"
    min_sites: int = 2
    eval_every: int = 1
    timeout: float = 3600.0
    seed: int = 0
    # local training
    local_epochs: int = 1
    local_steps: int = 0  # > 0 replaces epochs with a fixed number of steps
    epoch_decay: float = 1.0  # FeTS "train less each round": epochs x decay^min(round-1, 10)
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    batch_size: int = 2
    proximal_mu: float = 0.0
    # model and data
    model: str = "resunet"
    model_width: int = 32
    model_depth: int = 5
    deep_supervision: bool = False
    patch_size: int = 128
    foreground_prob: float = 0.5
    val_fraction: float = 0.2
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
    # client-level DP at the server (DP-FedAvg, strategies/client_dp.py); noise 0 = off
    client_dp_noise_multiplier: float = 0.0
    client_dp_clipping_norm: float = 1.0
    client_dp_adaptive: bool = False
    client_dp_delta: float = 1e-5
    client_dp_clipped_count_stddev: float = 0.0
    # where data and results live
    data_dir: str = ""
    partition: str = ""
    out_dir: str = "runs/latest"
    phantom_voxel_size: float = 1.0
    # strategy parameters, flattened as "strategy-<name>" keys in Flower's run config
    strategy_params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.selection not in ("all", "fraction", "fastest", "deadline"):
            problems.append(f"selection must be all, fraction, fastest or deadline, got {self.selection!r}")
        if self.selection == "deadline" and self.deadline_seconds <= 0:
            problems.append("selection 'deadline' needs deadline_seconds > 0")
        if not 0.0 < self.epoch_decay <= 1.0:
            problems.append(f"epoch_decay must be in (0, 1], got {self.epoch_decay}")
        if self.min_sites < 1:
            problems.append(f"min_sites must be >= 1, got {self.min_sites}")
        if self.local_epochs < 1 and self.local_steps < 1:
            problems.append("one of local_epochs or local_steps must be >= 1")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "poly", "constant"):
            problems.append(f"lr_schedule must be cosine, poly or constant, got {self.lr_schedule!r}")
        if self.model_width % 8:
            problems.append(f"model_width must be a multiple of 8 (GroupNorm), got {self.model_width}")
        if self.patch_size % (2 ** (self.model_depth - 1)):
            problems.append(
                f"patch_size {self.patch_size} must be a multiple of 2^(model_depth-1) = {2 ** (self.model_depth - 1)}"
            )
        if self.cache not in ("memory", "disk", "none"):
            problems.append(f"cache must be memory, disk or none, got {self.cache!r}")
        if not 0.0 <= self.foreground_prob <= 1.0:
            problems.append(f"foreground_prob must be in [0, 1], got {self.foreground_prob}")
        if self.dp and self.dp_epsilon <= 0:
            problems.append(f"dp_epsilon (the site's budget) must be > 0, got {self.dp_epsilon}")
        if self.dp_accountant not in ("rdp", "prv"):
            problems.append(f"dp_accountant must be rdp or prv, got {self.dp_accountant!r}")
        if problems:
            raise ValueError("invalid run configuration: " + "; ".join(problems))

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size,) * 3

    @property
    def model_config(self) -> dict[str, Any]:
        return {"width": self.model_width, "depth": self.model_depth, "deep_supervision": self.deep_supervision}

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
                flat[f.name.replace("_", "-")] = value
        return flat

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        params: dict[str, float] = {}
        for key, value in run_config.items():
            if key.startswith("strategy-"):
                params[key.removeprefix("strategy-").replace("-", "_")] = float(value)
                continue
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown run configuration key {key!r}")
            values[name] = _coerce(known[name], value, key)
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


def _coerce(f: dataclasses.Field, value: Any, key: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if kind == "int":
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"run configuration key {key!r} expects {kind}, got {value!r}") from None
    return str(value)
