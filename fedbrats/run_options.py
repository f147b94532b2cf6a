"""What `simulate`, `compare`, `train` and `evaluate` share: the options of the run configuration.

One `RunConfig` for all four, built from the same layers: defaults < `--preset` < `--config run.toml` <
`--set key=value` < the command's own flags, and the strategy checked against the registry at once,
so a typo costs a second, not a Flower start-up. Light imports only: the parser is built from here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbrats.shared.config import DEMO, RunConfig

PRESETS = ("auto", "demo", "full")


def add_run_options(p: argparse.ArgumentParser, *, set_help: str) -> None:
    """--preset, --config and --set: the layers of the run configuration."""
    p.add_argument("--preset", choices=PRESETS, default="auto",
                   help="settings sized for the machine; auto (default): full-size on a GPU, demo-size on a CPU")
    p.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="TOML run configuration (keys of RunConfig), applied over the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def add_partition_options(p: argparse.ArgumentParser, *, partition_help: str) -> None:
    """--partition and --allow-missing: which subjects belong to which site, checked against the disk."""
    p.add_argument("--partition", type=Path, default=None, metavar="CSV", help=partition_help)
    p.add_argument("--allow-missing", action="store_true",
                   help="drop partition subjects that have no usable case folder (and sites left empty) "
                        "instead of stopping")


def resolve_preset(preset: str) -> str:
    """'demo' or 'full'; 'auto' is full-size on a GPU and demo-size on a CPU."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if preset != "auto":
        return preset
    import torch

    return "full" if torch.cuda.is_available() else "demo"


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """--set KEY=VALUE items as a dict (Flower's hyphenated keys; underscores are accepted too)."""
    changes: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, e.g. --set local-epochs=2; got {item!r}")
        changes[key.strip().replace("_", "-")] = value.strip()
    return changes


def build_run_config(
    preset: str, toml: Path | None = None, sets: Sequence[str] = (), flags: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults < preset ('demo' or 'full') < TOML file < --set < flags (None values are left out)."""
    config = RunConfig()
    if preset == "demo":
        config = config.replace(**DEMO)
    elif preset != "full":
        raise ValueError(f"preset {preset!r}; expected demo or full (resolve 'auto' first)")
    if toml is not None:
        config = RunConfig.from_toml(toml, base=config)
    changes = parse_sets(sets)
    if changes:
        config = RunConfig.from_flower({**config.to_flower(), **changes})
    chosen = {k: v for k, v in (flags or {}).items() if v is not None}
    return config.replace(**chosen) if chosen else config


def check_strategy(config: RunConfig) -> None:
    """Build the configured strategy once: an unknown name or parameter fails here, before Flower starts."""
    from fedbrats.strategies import build_strategy

    try:
        build_strategy(config.strategy, dict(config.strategy_params))
    except ValueError as err:
        raise ValueError(f"strategy {config.strategy!r}: {err}") from None


def run_config_from_args(
    args: argparse.Namespace, flags: dict[str, Any] | None = None, *, federated: bool = False
) -> RunConfig:
    """The run configuration of a command, from its --preset/--config/--set and its own `flags`.

    `federated` also checks the strategy; it does so before the 'auto' preset looks for a GPU (which
    imports torch), since the strategy does not depend on the preset.
    """
    toml, sets = getattr(args, "config", None), getattr(args, "set", [])
    if federated:
        early = "full" if args.preset == "auto" else args.preset
        check_strategy(build_run_config(early, toml, sets, flags))
    return build_run_config(resolve_preset(args.preset), toml, sets, flags)

