"""The `fedbrats` command: one entry point, a subcommand per user job, each delegating to its owner.

Imports happen inside the handlers so `fedbrats --help` stays instant and a broken optional
part cannot stop the others from working.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Hospitals must not phone home: Flower's telemetry and update checks are off in all we start.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _patch(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        return (parts[0],) * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"patch size must be N or X,Y,Z, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _data_check(args: argparse.Namespace) -> int:
    from fedbrats.check_output import run_check

    return run_check(args.root, workers=args.workers, progress=True)


def _data_phantom(args: argparse.Namespace) -> int:
    from fedbrats.shared.data.phantom import generate_phantom

    out = generate_phantom(
        args.out,
        sites=args.sites,
        cases_per_site=args.cases_per_site,
        voxel_size=args.voxel_size,
        seed=args.seed,
        layout=args.layout,
        progress=True,
    )
    print(f"phantom written to {out}")
    if args.check:
        from fedbrats.check_output import run_check

        return run_check(Path(out))
    return 0


def _data_montage(args: argparse.Namespace) -> int:
    from fedbrats.shared.data.phantom import save_montage

    print(save_montage(args.root, args.cases, args.out))
    return 0


def _data_partition(args: argparse.Namespace) -> int:
    from fedbrats.simulations.partitioning import run_partition

    return run_partition(
        args.root,
        args.scheme,
        args.sites,
        args.alpha,
        args.seed,
        args.out,
        institution_csv=args.institution_csv,
    )


def _train(args: argparse.Namespace) -> int:
    from fedbrats.client.training_run import run_train

    return run_train(
        args.data,
        partition=args.partition,
        site=args.site,
        model=args.model,
        model_config={"width": args.width, "depth": args.depth, "deep_supervision": args.deep_supervision},
        epochs=args.epochs,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        seed=args.seed,
        device=args.device,
        val_fraction=args.val_fraction,
        schedule=args.schedule,
    )


def _predict(args: argparse.Namespace) -> int:
    from fedbrats.shared.evaluation.inference import predict_case

    written = predict_case(args.checkpoint, args.case, args.out, tta=not args.no_tta, device=args.device)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fedbrats.shared.evaluation.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint, args.data, args.partition, out_csv=args.out, tta=args.tta, device=args.device,
        split=args.split, seed=args.seed, val_fraction=args.val_fraction,
    )  # fmt: skip
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedbrats.simulations.simulate import run_simulate

    return run_simulate(args)


def _compare(args: argparse.Namespace) -> int:
    from fedbrats.simulations.compare import run_compare

    return run_compare(args)


def _deploy_app(args: argparse.Namespace) -> int:
    from fedbrats.shared.config import RunConfig
    from fedbrats.simulations.simulate import app_pyproject

    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    if args.out_dir:
        config = config.replace(out_dir=str(Path(args.out_dir).resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pyproject.toml").write_text(app_pyproject(config))
    print(f"Flower app written to {args.out / 'pyproject.toml'}; run it with: flwr run {args.out} <connection> --stream")
    return 0


def _privacy_audit(args: argparse.Namespace) -> int:
    from fedbrats.client.audit import run_audit

    return run_audit(args.path, budget=args.budget, out_png=args.png)


def _privacy_plan(args: argparse.Namespace) -> int:
    from fedbrats.client.audit import run_plan

    return run_plan(
        args.cases, args.batch_size, args.rounds, args.local_epochs, args.epsilon, args.delta,
        local_steps=args.local_steps, accountant=args.accountant,
    )  # fmt: skip


def _add_federation_options(p: argparse.ArgumentParser, *, set_help: str) -> None:
    """The options `simulate` and `compare` share: data, configuration layers, resources."""
    p.add_argument("--data", type=Path, default=None, help="default: a phantom generated and cached by seed")
    p.add_argument("--partition", type=Path, default=None)
    p.add_argument("--config", type=Path, default=None, help="TOML run configuration")
    p.add_argument("--preset", choices=["auto", "demo", "full"], default="auto",
                   help="auto: full-size on a GPU, demo-size on a CPU")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--sites", type=int, default=None, help="phantom sites when no data is given")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--gpus-per-site", type=float, default=0.0, help="GPU share of each simulated site")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbrats", description="Federated brain tumor segmentation on BraTS-style MRI."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="check, generate and partition datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("check", help="check every case under ROOT; non-zero exit if any is unusable")
    p.add_argument("root", type=Path)
    p.add_argument("--workers", type=int, default=None, help="parallel readers (default: up to 8)")
    p.set_defaults(func=_data_check)

    p = data_sub.add_parser("phantom", help="generate the BraTS-like phantom dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--cases-per-site", type=int, default=None, help="default: heavy-tailed draw per site")
    p.add_argument("--voxel-size", type=float, default=3.0, help="mm; 1 = real BraTS size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["brats2021", "brats2023"], default="brats2021")
    p.add_argument("--check", action="store_true", help="run `data check` on the result")
    p.set_defaults(func=_data_phantom)

    p = data_sub.add_parser("montage", help="PNG of the four modalities and labels of some cases")
    p.add_argument("root", type=Path)
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_data_montage)

    p = data_sub.add_parser("partition", help="split cases into sites (FeTS partition CSV)")
    p.add_argument("root", type=Path)
    p.add_argument("--scheme", choices=["institution", "iid", "dirichlet", "quantity"], required=True)
    p.add_argument("--sites", type=int, default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--institution-csv", type=Path, default=None)
    p.set_defaults(func=_data_partition)

    p = sub.add_parser("train", help="centralized (or single-site) training: the baseline")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--partition", type=Path, default=None)
    p.add_argument("--site", default=None, help="train on one site of the partition only")
    p.add_argument("--model", default="resunet")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patch-size", type=_patch, default=(128, 128, 128))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--schedule", choices=["cosine", "poly"], default="cosine")
    p.add_argument("--deep-supervision", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="segment one case with a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--case", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate", help="per-case and per-site metrics of a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--partition", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="CSV of per-case metrics")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--split", choices=["all", "train", "val"], default="all",
                   help="val: only the held-out cases of each site (same split as training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("simulate", help="run a simulated federation on one machine")
    _add_federation_options(p, set_help="any run configuration key, e.g. --set local-epochs=2")
    p.add_argument("--strategy", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("compare", help="compare strategies (and seeds) on the same partition; one report")
    p.add_argument("--strategies", required=True, metavar="LIST",
                   help="comma-separated, with optional parameters: "
                        "fedavg,fedprox:proximal_mu=0.01,fedadam:eta=0.01 (fedprox without proximal_mu gets 0.01)")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="comma-separated seeds, e.g. 0,1,2 (default: the config's seed)")
    _add_federation_options(
        p, set_help="any run configuration key, for every run: --set local-steps=2, --set strategy-eta=0.01"
    )
    p.add_argument("--target-dice", type=float, default=0.7, help="report rounds and simulated time to reach it")
    p.add_argument("--target-region", choices=["mean", "ET", "TC", "WT"], default="mean",
                   help="the Dice the target applies to: mean of ET/TC/WT (default) or one region")
    p.add_argument("--out", type=Path, default=None,
                   help="default: runs/compare-<time>; the same command with the same --out resumes")
    p.set_defaults(func=_compare)

    privacy = sub.add_parser("privacy", help="privacy budgets: audit a run's ledgers, plan the noise")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    p = privacy_sub.add_parser("audit", help="per-site, per-round epsilon; non-zero exit if a budget is exceeded")
    p.add_argument("path", type=Path, help="a run folder (sites/*/privacy_ledger.sqlite) or one ledger file")
    p.add_argument("--budget", type=float, default=None, help="override the budget recorded in the ledger")
    p.add_argument("--png", type=Path, default=None, help="epsilon over rounds per site")
    p.set_defaults(func=_privacy_audit)
    p = privacy_sub.add_parser("plan", help="the noise multiplier a consortium needs for a budget")
    p.add_argument("--cases", type=int, required=True, help="cases at the (smallest) site")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=0)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None)
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    p.set_defaults(func=_privacy_plan)

    deploy = sub.add_parser("deploy", help="coordinator tools for a real deployment (docs/deploy.md)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    p = deploy_sub.add_parser("app", help="write a Flower app folder whose run config is your TOML file")
    p.add_argument("--config", type=Path, default=None, help="TOML run configuration")
    p.add_argument("--out-dir", type=Path, default=None, help="where the coordinator writes results (absolute)")
    p.add_argument("--out", type=Path, required=True, help="app folder to write")
    p.set_defaults(func=_deploy_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Our errors are written for users: name the file or value and what was expected.
        print(f"fedbrats {args.command}: error: {err}", file=sys.stderr)
        return 2
