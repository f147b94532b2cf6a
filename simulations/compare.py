"""`fedbrats compare`: several strategies and seeds on the same partition, then one report.

Each (strategy, seed) is a plain `simulate` into ``OUT/runs/<strategy>-seed<k>/``, one after the
other, so the whole comparison resumes: a finished run is skipped, a partial one continues from its
checkpoint. The dataset is prepared once, so every run sees the same sites; the server seeds the
initial model from the run's seed, so two strategies on one seed start from identical weights.
The report (`simulations.compare_report`) reads only the run folders.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedbrats.server.state import config_changes, read_run_config
from fedbrats.server.tracking import local_store_uri
from fedbrats.shared.atomic import atomic_write_json
from fedbrats.shared.config import RunConfig
from fedbrats.simulations.compare_report import TARGET_REGIONS, write_comparison
from fedbrats.simulations.headline import MEAN_DICE
from fedbrats.simulations.run_summary import resolve_target
from fedbrats.simulations.simulate import LOCAL, Engine, console, package_versions, simulate

#: FedProx with mu = 0 is FedAvg; this is the value compared when none is given (Li et al. try 0.001 to 1).
FEDPROX_DEFAULT_MU = 0.01
#: Keys that may differ between a run folder and a resumed comparison (paths are resolved per machine).
@dataclass(frozen=True)
class StrategySpec:
    label: str  # the run folder's name and the report's row: name, plus the parameters given
    name: str
    params: dict[str, float]  # given in --strategies (name:key=value:key=value)
    # run-configuration keys given the same way (fedavg:update-dtype=float16): a variant of the recipe
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    label: str
    seed: int
    config: RunConfig

    @property
    def folder(self) -> str:
        return f"{self.label}-seed{self.seed}"


#: Run-configuration keys an entry of --strategies may not set: the entry's name and --seeds say them.
_FIXED_BY_COMPARE = ("strategy", "seed", "out-dir")
#: Run-configuration keys that are also strategy parameters: given in --strategies they stay the latter.
_STRATEGY_PARAMETERS = ("proximal-mu",)


def parse_strategies(text: str) -> list[StrategySpec]:
    """'fedavg,fedprox:proximal_mu=0.1,fedadam:eta=0.001:tau=0.001' -> specs, checked against the registry.

    A key that names a run-configuration field ('fedavg:update-dtype=float16', 'fedavg:local-epochs=2')
    sets that field for the entry's runs, so one comparison holds recipe variants (ablations) beside
    strategies; any other key is a numeric strategy parameter."""
    from fedbrats.strategies import available_strategies

    run_keys = set(RunConfig().to_flower())
    specs = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, *assignments = (part.strip() for part in item.split(":"))
        name = name.lower()
        if name not in available_strategies():
            raise ValueError(
                f"unknown strategy {name!r} in --strategies; available: {', '.join(available_strategies())}"
            )
        params: dict[str, float] = {}
        settings: dict[str, str] = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            hyphenated = key.strip().replace("_", "-")
            if sep and hyphenated in run_keys and hyphenated not in _STRATEGY_PARAMETERS:
                if hyphenated in _FIXED_BY_COMPARE:
                    raise ValueError(f"{assignment!r} in {item!r}: {hyphenated} is set by compare itself")
                settings[hyphenated] = value.strip()
                continue
            try:
                if not sep or not key.strip():
                    raise ValueError
                params[key.strip().replace("-", "_")] = float(value)
            except ValueError:
                raise ValueError(
                    f"strategy parameter {assignment!r} in {item!r}: expected KEY=NUMBER, e.g. fedprox:proximal_mu=0.01, "
                    "or a run-configuration key, e.g. fedavg:local-epochs=2"
                ) from None
        label = name + "".join(f"-{k}{v:g}" for k, v in params.items()) + "".join(f"-{k}-{v}" for k, v in settings.items())
        specs.append(StrategySpec(label, name, params, settings))
    if not specs:
        raise ValueError("--strategies is empty; give a comma-separated list, e.g. fedavg,fedprox")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--strategies names a strategy twice with the same parameters: {', '.join(labels)}")
    return specs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--seeds expects whole numbers separated by commas, e.g. 0,1,2; got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds expects distinct whole numbers >= 0, e.g. 0,1,2; got {text!r}")
    return seeds


def plan_runs(
    config: RunConfig, specs: list[StrategySpec], seeds: list[int]
) -> tuple[list[PlannedRun], list[str]]:
    """Every (strategy, seed) run with its exact configuration, seed-major, and notes on defaults we chose."""
    from fedbrats.server.app import make_strategy

    notes, configs = [], []
    if config.holdout_site or any("holdout-site" in spec.settings for spec in specs):
        raise ValueError("holdout-site applies to `fedbrats simulate` (one run, then its external site); "
                         "compare scores every run on the sites it trained with")
    if config.proximal_mu > 0:
        notes.append(
            f"proximal-mu = {config.proximal_mu:g} is set for the whole run, so the sites of every strategy "
            "add the proximal term (not only FedProx)."
        )
    for spec in specs:
        params = {**config.strategy_params, **spec.params}
        if spec.name == "fedprox" and "proximal_mu" not in params:
            params["proximal_mu"] = config.proximal_mu or FEDPROX_DEFAULT_MU
            notes.append(
                f"{spec.label}: proximal_mu = {params['proximal_mu']:g} (not given; with 0 FedProx is FedAvg). "
                "Choose it with fedprox:proximal_mu=VALUE in --strategies."
            )
        if spec.name == "fedprox" and config.local_steps == 1:
            notes.append(
                f"{spec.label}: with one local step FedProx equals FedAvg (the proximal gradient is 0 there)."
            )
        strategy_config = config.replace(strategy=spec.name, strategy_params=params)
        try:
            if spec.settings:  # coerced and checked as --set values are
                strategy_config = RunConfig.from_flower({**strategy_config.to_flower(), **spec.settings})
            make_strategy(strategy_config)
        except ValueError as err:
            raise ValueError(
                f"{spec.label}: {err}. Parameters given with --set strategy-KEY apply to every strategy; "
                "give one strategy's parameters as NAME:KEY=VALUE in --strategies."
            ) from err
        configs.append((spec.label, strategy_config))
    # Seed by seed: an interrupted comparison already compares every strategy on the first seeds.
    return [PlannedRun(label, seed, c.replace(seed=seed)) for seed in seeds for label, c in configs], notes


def rounds_done(run_dir: Path) -> int:
    """The last completed round of a run folder (its server checkpoint), 0 when it has none."""
    meta = Path(run_dir) / "server" / "server_state.json"
    if not meta.is_file():
        return 0
    try:
        return int(json.loads(meta.read_text())["round"])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{meta} is unreadable ({err}); remove {run_dir} to run it again") from err


def check_resumable(run_dir: Path, config: RunConfig) -> None:
    """A run folder may only be continued with the configuration it was started with (the server's rule)."""
    stored = read_run_config(run_dir)
    changes = config_changes(stored, config) if stored is not None else {}
    if changes and not config.resume_override:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ValueError(
            f"{run_dir} was run with another configuration ({detail}); use a new --out, remove it, "
            "or --set resume-override=true"
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
    )


def compare(
    config: RunConfig,
    specs: list[StrategySpec],
    seeds: list[int],
    data: Path,
    partition: Path,
    out: Path,
    *,
    target: float | None = None,
    target_dice: float | None = None,
    target_region: str = "mean",
    engine: Engine = LOCAL,
    command: str = "",
) -> bool:
    """Run (or resume) every (strategy, seed) in turn, then write the report; True when all runs completed.

    `target` is the convergence target on the run's headline (mean Dice or AUC, `shared.tasks`; its
    default: `simulations.headline.DEFAULT_TARGETS`); `target_dice` is its segmentation alias. The
    tables of the comparison are the command line's to print (`simulations.compare_report.summarise_runs`).
    """
    from fedbrats.shared.tasks import task_for

    headline = task_for(config).headline_name
    target = resolve_target(headline, target, target_dice)
    if target_region not in TARGET_REGIONS:
        raise ValueError(f"--target-region must be one of {', '.join(TARGET_REGIONS)}, got {target_region!r}")
    if target_region != "mean" and headline != MEAN_DICE:
        raise ValueError(f"--target-region {target_region} applies to Dice; task {config.task!r} is ranked by {headline}")
    out = Path(out).resolve()
    config = config.replace(data_dir=str(Path(data).resolve()), partition=str(Path(partition).resolve()))
    if config.tracking == "mlflow" and not config.tracking_uri:  # one store, one MLflow run per strategy and seed
        config = config.replace(tracking_uri=local_store_uri(out))
    runs, notes = plan_runs(config, specs, seeds)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    for run in runs:
        check_resumable(out / "runs" / run.folder, run.config.replace(out_dir=str(out / "runs" / run.folder)))
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "command": command or shlex.join(sys.argv),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": config.to_flower(),
        "strategies": [
            {"label": s.label, "name": s.name, "given": s.params,
             "params": next(r.config.strategy_params for r in runs if r.label == s.label)}
            for s in specs
        ],
        "seeds": seeds,
        "rounds": config.rounds,
        "headline": headline,
        "target": target,
        "target_region": target_region,
        "notes": notes,
        "versions": package_versions(),
        "runs": {r.folder: r.config.replace(out_dir=str(out / "runs" / r.folder)).to_flower() for r in runs},
    }  # fmt: skip
    atomic_write_json(out / "comparison_config.json", settings)
    pending = [r for r in runs if rounds_done(out / "runs" / r.folder) < config.rounds]
    console.print(
        f"comparing {len(specs)} strategies x {len(seeds)} seed(s) = {len(runs)} runs of {config.rounds} rounds "
        f"({len(runs) - len(pending)} already complete) -> {out}"
    )
    # Time left = seconds per round so far in this session (start-up included) x rounds still to run.
    to_run = {r.folder: config.rounds - rounds_done(out / "runs" / r.folder) for r in pending}
    started_all = time.monotonic()
    finished = 0  # rounds run in this session by the runs already over

    def time_left(rounds_now: int) -> str:
        ran, left = finished + rounds_now, sum(to_run.values()) - rounds_now
        if ran <= 0 or left <= 0:
            return "comparison: last round" if left <= 0 else "comparison: estimating time left"
        return f"comparison: about {_duration((time.monotonic() - started_all) / ran * left)} left"

    failed: list[str] = []
    for i, run in enumerate(runs, 1):
        folder = out / "runs" / run.folder
        done = rounds_done(folder)
        if done >= config.rounds:
            console.print(f"run {i}/{len(runs)} {run.label} seed {run.seed}: complete, skipped ({folder})")
            continue
        resuming = f", resuming after round {done}" if done else ""
        console.rule(f"run {i}/{len(runs)}: {run.label} seed {run.seed}{resuming}")
        started = time.monotonic()

        def note(round_: int, i: int = i, run: PlannedRun = run, done: int = done) -> str:
            return f"run {i}/{len(runs)} {run.label} seed {run.seed} | {time_left(round_ - done)}"

        if not simulate(run.config, data, partition, folder, engine=engine, round_note=note):
            failed.append(run.folder)
        to_run.pop(run.folder)
        finished += rounds_done(folder) - done
        console.print(
            f"[bold]run {i}/{len(runs)} {run.label} seed {run.seed} {'FAILED' if run.folder in failed else 'done'} "
            f"in {_duration(time.monotonic() - started)}; {len(to_run)} run(s) to go"
            + (f", {time_left(0)}" if to_run else "")
        )
    report = write_comparison(out)
    console.print(
        f"report: {report}\ntable: {out / 'comparison.csv'}\nsettings: {out / 'comparison_config.json'}"
    )
    if failed:
        console.print(
            f"[red]{len(failed)} run(s) did not complete: {', '.join(failed)}; run the same command to resume them."
        )
    return not failed
