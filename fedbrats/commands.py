"""The handlers of the `fedbrats` subcommands: each resolves its inputs, delegates, and prints the result.

Imports happen inside the handlers so `fedbrats --help` stays instant and a broken optional part
cannot stop the others from working. Modules return data; the tables are printed here.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from fedbrats.run_options import run_config_from_args


def _console():
    from rich.console import Console

    return Console()


def data_check(args: argparse.Namespace) -> int:
    from fedbrats.check_output import run_check

    return run_check(args.root, workers=args.workers, progress=True, as_json=args.json)


def data_phantom(args: argparse.Namespace) -> int:
    from fedbrats.shared.data.phantom import generate_phantom

    out = generate_phantom(
        args.out, sites=args.sites, cases_per_site=args.cases_per_site, voxel_size=args.voxel_size,
        seed=args.seed, layout=args.layout, progress=True, institutions=args.institutions, scale=args.scale,
        min_cases=args.min_cases, val_cases=args.val_cases,
    )  # fmt: skip
    print(f"phantom written to {out}")
    if args.check:
        from fedbrats.check_output import run_check

        return run_check(Path(out))
    return 0


def data_montage(args: argparse.Namespace) -> int:
    from fedbrats.shared.data.phantom import save_montage

    print(save_montage(args.root, args.cases, args.out))
    return 0


def data_partition(args: argparse.Namespace) -> int:
    from fedbrats.simulations.partitioning import run_partition
    from fedbrats.tables import partition_table

    partition, sizes = run_partition(
        args.root, args.scheme, args.sites, args.alpha, args.seed, args.out, institution_csv=args.institution_csv
    )
    _console().print(partition_table(partition, sizes, title=f"{args.scheme} partition of {args.root} -> {args.out}"))
    return 0


def train(args: argparse.Namespace) -> int:
    from fedbrats.client.training_run import one_site_config, run_train
    from fedbrats.data_checks import checked_partition

    config = one_site_config(run_config_from_args(args, {"model": args.model, "seed": args.seed}), args.epochs)
    sites = None if args.site is None else [args.site]
    partition, discovered, narrowed = checked_partition(
        args.data, args.partition, allow_missing=args.allow_missing, sites=sites
    )
    run_train(
        config, args.data, partition=partition if narrowed else args.partition, site=args.site, out=args.out,
        device=args.device, discovered=discovered,
    )  # fmt: skip
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from fedbrats.data_checks import checked_partition
    from fedbrats.shared.evaluation.evaluate import evaluate_checkpoint
    from fedbrats.tables import evaluation_table

    config = run_config_from_args(args, {"seed": args.seed})
    partition, discovered, _ = checked_partition(args.data, args.partition, allow_missing=args.allow_missing)
    if _classifies(args.checkpoint):
        return _evaluate_classifier(args, config, partition, discovered)
    if _multitask(args.checkpoint):
        return _evaluate_multitask(args, config, partition, discovered)
    if args.class_only:
        raise ValueError(f"--class-only scores a class head; {args.checkpoint} segments only (task segmentation)")
    result = evaluate_checkpoint(
        args.checkpoint, args.data, partition, out_csv=args.out, tta=args.tta, device=args.device,
        split=args.split, seed=config.seed, val_fraction=config.val_fraction, discovered=discovered,
        hd95_definition=config.hd95_definition,
    )  # fmt: skip
    console = _console()
    console.print(evaluation_table(result.summary, result.title))
    _print_intervals(console, result)
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} case(s):[/] " + "; ".join(result.skipped))
    if result.written:
        console.print("\n".join(f"written: {path}" for path in result.written))
    return 0


def _print_intervals(console, result) -> None:
    """Case- and site-weighted means with their bootstrap 95% intervals, one line per metric and region."""
    from fedbrats.shared.evaluation.metrics import hd95_note

    if not result.intervals:
        return
    first = result.intervals[0]
    console.print(f"means over {first['cases']} case(s) and {first['sites']} site(s), bootstrap {first['level']:.0%} "
                  f"intervals ({first['resamples']} resamples of the cases, seed {first['seed']}); "
                  f"{hd95_note(result.hd95_definition)}")  # fmt: skip
    for r in result.intervals:
        fmt = "{:.1f}" if r["metric"].startswith("hd95") else "{:.3f}"
        case, site = (" ".join([fmt.format(r[f"{w}_weighted"]), "(" + fmt.format(r[f"{w}_low"]) + "-"
                                + fmt.format(r[f"{w}_high"]) + ")"]) for w in ("case", "site"))  # fmt: skip
        console.print(f"  {r['metric']}: case-weighted {case}, site-weighted {site}")


def _classifies(checkpoint: Path) -> bool:
    """Whether the checkpoint is a case classifier (its metadata names the task)."""
    from fedbrats.shared.checkpoint import read_metadata
    from fedbrats.shared.evaluation.predict_class import is_case_classifier

    return is_case_classifier(read_metadata(checkpoint))


def _multitask(checkpoint: Path) -> bool:
    """Whether the checkpoint segments and classifies (task multitask): evaluate scores its class head too."""
    from fedbrats.shared.checkpoint import read_metadata
    from fedbrats.shared.evaluation.evaluate_multitask import is_multitask

    return is_multitask(read_metadata(checkpoint))


def _evaluate_multitask(args: argparse.Namespace, config, partition, discovered) -> int:
    """`fedbrats evaluate` of a multitask U-Net: the segmentation tables and intervals (not with --class-only),
    then its class head's per-site table and AUC with its bootstrap interval, on the same cases."""
    from fedbrats.shared.evaluation.evaluate_multitask import evaluate_multitask_checkpoint
    from fedbrats.tables import auc_line, class_evaluation_table, evaluation_table

    result = evaluate_multitask_checkpoint(
        args.checkpoint, args.data, partition, config=config, out_csv=args.out, tta=args.tta, device=args.device,
        split=args.split, discovered=discovered, class_only=args.class_only,
    )  # fmt: skip
    console = _console()
    if result.segmentation is not None:
        console.print(evaluation_table(result.segmentation.summary, result.segmentation.title))
        _print_intervals(console, result.segmentation)
    console.print(class_evaluation_table(result.classes.summary, result.classes.title))
    print(auc_line(result.classes.interval))
    skipped = result.classes.skipped  # the cases neither head could score
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} case(s):[/] " + "; ".join(skipped))
    if result.written:
        console.print("\n".join(f"written: {path}" for path in result.written))
    return 0


def _evaluate_classifier(args: argparse.Namespace, config, partition, discovered) -> int:
    """`fedbrats evaluate` of a classifier: per-site table, then the AUC with its bootstrap interval."""
    from fedbrats.shared.evaluation.predict_class import evaluate_class_checkpoint
    from fedbrats.tables import auc_line, class_evaluation_table

    result = evaluate_class_checkpoint(
        args.checkpoint, args.data, partition, config=config, out_csv=args.out, device=args.device,
        split=args.split, discovered=discovered,
    )  # fmt: skip
    console = _console()
    console.print(class_evaluation_table(result.summary, result.title))
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} case(s):[/] " + "; ".join(result.skipped))
    print(auc_line(result.interval))
    if result.written:
        console.print("\n".join(f"written: {path}" for path in result.written))
    return 0


def predict(args: argparse.Namespace) -> int:
    from fedbrats.shared.evaluation.ensemble import check_members, predict_ensemble

    checkpoints = check_members(args.checkpoint)  # one, or an ensemble of segmenters (no classifier among them)
    if len(checkpoints) == 1 and _classifies(checkpoints[0]):
        from fedbrats.shared.evaluation.predict_class import predict_class_case

        prediction = predict_class_case(checkpoints[0], args.case, args.out, device=args.device)
        for name, probability in prediction.probabilities.items():
            print(f"p_{name}: {probability:.4f}")
        print(f"predicted: {prediction.predicted}")
        print(f"written: {prediction.written}")
        return 0
    if len(checkpoints) > 1:
        print(f"ensemble of {len(checkpoints)} checkpoints: " + ", ".join(map(str, checkpoints)))
    written = predict_ensemble(checkpoints, args.case, args.out, tta=not args.no_tta, device=args.device)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _federation_data(args: argparse.Namespace, config, out: Path) -> tuple[Path, Path]:
    """The dataset and partition a federation runs on, checked against the disk before Flower starts.

    With --allow-missing and subjects dropped, the narrowed partition is written to OUT/partition.csv
    and that file is what the sites read, so sites left without cases are not started.
    """
    from fedbrats.data_checks import checked_partition
    from fedbrats.shared.data.partition import write_partition
    from fedbrats.simulations.simulate import prepare_data

    data, partition = prepare_data(config, args.data, args.partition, args.sites)
    used, _, narrowed = checked_partition(data, partition, allow_missing=args.allow_missing)
    if narrowed and used is not None:
        out.mkdir(parents=True, exist_ok=True)
        partition = write_partition(used, out / "partition.csv")
    return data, partition


def _federation_flags(args: argparse.Namespace) -> dict:
    return {"rounds": args.rounds, "seed": args.seed, "strategy": getattr(args, "strategy", None)}


def simulate(args: argparse.Namespace) -> int:
    from fedbrats.simulations.simulate import run_simulate

    config = run_config_from_args(args, _federation_flags(args), federated=True)
    out = (args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")).resolve()
    data, partition = _federation_data(args, config, out)
    return run_simulate(config, data, partition, out, engine=_engine(args))


def _engine(args: argparse.Namespace):
    from fedbrats.simulations.simulate import Engine

    return Engine(gpus_per_site=args.gpus_per_site, ray_address=args.ray_address)


def _check_target(config, args: argparse.Namespace) -> None:
    """The convergence target fits the task's headline (e.g. no --target-dice for a classifier), before data."""
    from fedbrats.shared.tasks import task_for
    from fedbrats.simulations.run_summary import resolve_target

    resolve_target(task_for(config).headline_name, args.target, args.target_dice)


def compare(args: argparse.Namespace) -> int:
    from fedbrats.simulations.compare import compare as run_comparison
    from fedbrats.simulations.compare import parse_seeds, parse_strategies, plan_runs
    from fedbrats.simulations.compare_report import summarise_runs
    from fedbrats.tables import comparison_tables

    config = run_config_from_args(args, _federation_flags(args))
    specs = parse_strategies(args.strategies)
    seeds = parse_seeds(args.seeds) if args.seeds else [config.seed]
    plan_runs(config, specs, seeds)  # every strategy and its parameters, checked before data or Flower
    _check_target(config, args)
    out = (args.out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")).resolve()
    data, partition = _federation_data(args, config, out)
    ok = run_comparison(
        config, specs, seeds, data, partition, out, target=args.target, target_dice=args.target_dice,
        target_region=args.target_region, engine=_engine(args),
        command=shlex.join(["fedbrats", *sys.argv[1:]]),
    )  # fmt: skip
    console = _console()
    for table in comparison_tables(summarise_runs(out), args.target_region):
        console.print(table)
    return 0 if ok else 1


def deploy_app(args: argparse.Namespace) -> int:
    from fedbrats.shared.atomic import atomic_write_text
    from fedbrats.shared.config import RunConfig
    from fedbrats.simulations.simulate import app_pyproject

    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    if args.out_dir:
        config = config.replace(out_dir=str(Path(args.out_dir).resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "pyproject.toml", app_pyproject(config))
    print(f"Flower app written to {args.out / 'pyproject.toml'}; run it with: flwr run {args.out} <connection> --stream")
    return 0


def deploy_coordinator(args: argparse.Namespace) -> int:
    from fedbrats.deploy import Coordinator, default_bin_dir, write_files

    coordinator = Coordinator(
        args.public_name, root=args.root, public_port=args.public_port, listen=args.listen,
        superlink_port=args.superlink_port, user=args.user, bin_dir=args.bin_dir or default_bin_dir(),
    )  # fmt: skip
    for path in write_files(coordinator.files(), coordinator.root):
        print(path)
    return 0


def deploy_site(args: argparse.Namespace) -> int:
    from fedbrats.deploy import Site, default_bin_dir, write_files

    site = Site(
        args.site_name, args.superlink, args.data_dir, root=args.root, work_dir=args.work_dir, log_dir=args.log_dir,
        runtime_port=args.runtime_port, user=args.user, bin_dir=args.bin_dir or default_bin_dir(),
    )  # fmt: skip
    for path in write_files(site.files(), site.root):
        print(path)
    return 0


def deploy_gate(args: argparse.Namespace) -> int:
    from fedbrats.app_gate import serve, site_logging

    site_logging()
    serve(args.runtime_api_address, preload=args.preload)
    return 0


def deploy_log(args: argparse.Namespace) -> int:
    from fedbrats.deploy import run_logged

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_logged(args.log_file, command)


def report(args: argparse.Namespace) -> int:
    from fedbrats.simulations.report import write_report

    print(write_report(args.run_dir))
    return 0


def privacy_audit(args: argparse.Namespace) -> int:
    from fedbrats.privacy_commands import run_audit

    return run_audit(args.path, budget=args.budget, out_png=args.png, history=args.history)


def privacy_calibrate(args: argparse.Namespace) -> int:
    from fedbrats.client.clip_calibration import calibrate
    from fedbrats.data_checks import checked_partition
    from fedbrats.shared.atomic import atomic_write_json

    config = run_config_from_args(args)
    sites = None if args.site is None else [args.site]
    partition, discovered, narrowed = checked_partition(
        args.data, args.partition, allow_missing=args.allow_missing, sites=sites
    )
    console = _console()
    result = calibrate(
        config, args.data, partition=partition if narrowed else args.partition, site=args.site, steps=args.steps,
        device=args.device, discovered=discovered, console=console,
    )  # fmt: skip
    quantiles = ", ".join(f"{q} {v:.4g}" for q, v in result.quantiles.items())
    console.print(f"{result.model}: {len(result.norms)} per-patient gradient norms over {result.trained_parameters:,} "
                  f"trained parameters ({result.initial_model}); quantiles {quantiles}, max {max(result.norms):.4g}")  # fmt: skip
    console.print(f"suggested dp-max-grad-norm = {result.suggested_max_grad_norm:.4g} (the median: the usual "
                  "heuristic; measured without privacy, so on public or phantom data only)")  # fmt: skip
    if args.out is not None:
        console.print(f"written: {atomic_write_json(args.out, result.as_dict())}")
    return 0


def privacy_plan(args: argparse.Namespace) -> int:
    from fedbrats.privacy_commands import run_plan

    if (args.cases is None) == (args.sites is None):
        raise ValueError("privacy plan needs exactly one of --cases (DP-SGD at each site) and --sites "
                         "(client-level DP at the server)")  # fmt: skip
    if args.sites is not None:
        from fedbrats.privacy_commands import run_client_plan

        return run_client_plan(args.sites, args.rounds, args.epsilon, args.delta, args.clipping_norm)
    return run_plan(
        args.cases, args.batch_size, args.rounds, args.local_epochs, args.epsilon, args.delta,
        local_steps=args.local_steps, accountant=args.accountant,
    )  # fmt: skip
