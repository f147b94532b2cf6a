"""The `fedbrats` command: one entry point, a subcommand per user job, each delegating to its owner.

This module builds the parser; the handlers live in `fedbrats.commands`. Every option has help text
(tests/test_cli.py walks the parser). An error is one line, `fedbrats <command>: error: ...` with
exit status 2; `fedbrats --debug <command>` shows the whole traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from fedbrats import commands, export_command, prepare_command
from fedbrats.run_options import add_partition_options, add_run_options

# Hospitals must not phone home: Flower's telemetry and update checks are off in all we start.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SET_HELP = "any run configuration key (a RunConfig field, hyphenated), repeatable: --set local-epochs=2"


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="check, generate and partition datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("check", help="check every case under ROOT; non-zero exit if any is unusable")
    p.add_argument("root", type=Path, help="data root: one folder per case (BraTS 2017-2021 or 2023+ layout)")
    p.add_argument("--workers", type=int, default=None, help="parallel readers (default: up to 8)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report instead")
    p.set_defaults(func=commands.data_check)

    p = data_sub.add_parser("phantom", help="generate the BraTS-like phantom dataset")
    p.add_argument("--out", type=Path, required=True, help="folder to write the cases and partitioning_1.csv to")
    p.add_argument("--sites", type=int, default=None, help="institutions, each with its own scanner (default 4)")
    p.add_argument("--cases-per-site", type=int, default=None, help="default: heavy-tailed draw per site")
    p.add_argument("--institutions", choices=["fets2022", "fets2021"], default=None,
                   help="size the sites like this challenge's partitioning_1 institutions (instead of --sites)")
    p.add_argument("--scale", type=float, default=1.0, help="--institutions: cases = real count x scale")
    p.add_argument("--min-cases", type=int, default=3, help="--institutions: smallest site after scaling")
    p.add_argument("--val-cases", type=int, default=None,
                   help="held-out cases fixed by a TrainOrVal column (default with --institutions: 20%%, >= 40)")
    p.add_argument("--voxel-size", type=float, default=3.0, help="mm; 1 = real BraTS size")
    p.add_argument("--seed", type=int, default=0, help="the dataset is a function of the seed")
    p.add_argument("--layout", choices=["brats2021", "brats2023"], default="brats2021",
                   help="file naming and label convention of the cases")
    p.add_argument("--check", action="store_true", help="run `data check` on the result")
    p.set_defaults(func=commands.data_phantom)

    p = data_sub.add_parser("montage", help="PNG of the four modalities and labels of some cases")
    p.add_argument("root", type=Path, help="data root holding the cases")
    p.add_argument("--cases", nargs="+", required=True, help="case ids to show, one row each")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.set_defaults(func=commands.data_montage)

    p = data_sub.add_parser("partition", help="split cases into sites (FeTS partition CSV)")
    p.add_argument("root", type=Path, help="data root: its case folders are partitioned")
    p.add_argument("--scheme", choices=["institution", "iid", "dirichlet", "quantity"], required=True,
                   help="institution: as a FeTS CSV says; iid; dirichlet: skewed tumour sizes; quantity: skewed sizes")
    p.add_argument("--sites", type=int, default=None, help="number of sites (institution: must match the CSV)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split")
    p.add_argument("--out", type=Path, required=True, help="partition CSV to write")
    p.add_argument("--institution-csv", type=Path, default=None,
                   help="institution scheme: the FeTS CSV to read (default: ROOT/partitioning_1.csv)")
    p.set_defaults(func=commands.data_partition)

    prepare_command.add_prepare_parser(data_sub)


def _add_model_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="centralized (or single-site) training: the baseline, a one-site federation")
    p.add_argument("--data", type=Path, required=True, help="data root: one folder per case")
    add_partition_options(p, partition_help="FeTS partition CSV; without it every case is one site")
    p.add_argument("--site", default=None, help="train on one site of the partition only")
    add_run_options(p, set_help=SET_HELP + " (model-width=8, patch-size=64, lr=0.0005, ...)")
    p.add_argument("--model", default=None, help="registered model name (run configuration key model)")
    p.add_argument("--epochs", type=int, default=None,
                   help="train E epochs, validating after each (default: rounds x local-epochs of the configuration)")
    p.add_argument("--seed", type=int, default=None, help="seed of the split, the initial weights and the patches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics.json, learning curve")
    p.set_defaults(func=commands.train)

    p = sub.add_parser("predict", help="segment one case with a checkpoint or an ensemble of them "
                                       "(a classifier's: class probabilities)")
    p.add_argument("--checkpoint", type=Path, required=True, action="append",
                   help="a .safetensors checkpoint of fedbrats; repeat it for an ensemble (mean of the region "
                        "probabilities, also of different networks; writes the members' spread too)")
    p.add_argument("--case", type=Path, required=True, help="case folder (its four modalities)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the segmentation, uncertainty and overlay (a classifier: <case>_class.json)")
    p.add_argument("--no-tta", action="store_true", help="no flip test-time augmentation (faster)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=commands.predict)

    p = sub.add_parser("evaluate", help="per-case and per-site metrics of a checkpoint (a classifier: AUC with a 95%% CI)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a .safetensors checkpoint of fedbrats")
    p.add_argument("--data", type=Path, required=True, help="data root of labelled cases")
    add_partition_options(p, partition_help="FeTS partition CSV: metrics per site; without it one site 'all'")
    add_run_options(p, set_help=SET_HELP + "; seed and val-fraction decide --split as in training")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV of per-case metrics, or a classifier's Subject_ID, true class, p_<class> (and <stem>_sites.csv)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--split", choices=["all", "train", "val"], default="all",
                   help="val: only the held-out cases of each site (same split as training)")
    p.add_argument("--class-only", action="store_true",
                   help="a multitask checkpoint: score only its class head (no sliding-window segmentation; far faster)")
    p.add_argument("--seed", type=int, default=None, help="seed of the train/val split (default: the configuration's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=commands.evaluate)


def _add_federation_options(p: argparse.ArgumentParser, *, set_help: str) -> None:
    """The options `simulate` and `compare` share: data, configuration layers, resources."""
    p.add_argument("--data", type=Path, default=None, help="data root (default: a phantom generated and cached by seed)")
    add_partition_options(p, partition_help="FeTS partition CSV, one site each (default: DATA/partitioning_1.csv)")
    add_run_options(p, set_help=set_help)
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (run configuration key rounds)")
    p.add_argument("--sites", type=int, default=None, help="phantom sites when no data is given")
    p.add_argument("--seed", type=int, default=None, help="seed of the run (run configuration key seed)")
    p.add_argument("--gpus-per-site", type=float, default=0.0, help="GPU share of each simulated site (e.g. 0.25)")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run the sites on an existing Ray cluster (ray start --head; docs/scale.md)")  # fmt: skip


def _add_federation_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a simulated federation on one machine")
    _add_federation_options(p, set_help=SET_HELP)
    p.add_argument("--strategy", default=None, help="aggregation strategy by name, e.g. fedavg, fedprox, fedpidavg")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default: runs/simulate-<time>); the same --out resumes")
    p.set_defaults(func=commands.simulate)

    p = sub.add_parser("compare", help="compare strategies (and seeds) on the same partition; one report")
    p.add_argument("--strategies", required=True, metavar="LIST",
                   help="comma-separated, with optional parameters: "
                        "fedavg,fedprox:proximal_mu=0.01,fedadam:eta=0.01 (fedprox without proximal_mu gets 0.01); "
                        "a run-configuration key makes a recipe variant: fedavg:update-dtype=float16, "
                        "fedavg:local-epochs=2")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="comma-separated seeds, e.g. 0,1,2 (default: the config's seed)")
    _add_federation_options(p, set_help=SET_HELP + ", for every run: --set local-steps=2, --set strategy-eta=0.01")
    p.add_argument("--target", type=float, default=None,
                   help="convergence target on the headline metric (mean Dice for segmentation, pooled AUC for "
                        "classification): report rounds and simulated time to reach it (default 0.7 Dice, 0.8 AUC)")
    p.add_argument("--target-dice", type=float, default=None,
                   help="segmentation's name for --target (the mean Dice to reach)")
    p.add_argument("--target-region", choices=["mean", "ET", "TC", "WT"], default="mean",
                   help="segmentation: the Dice the target applies to, mean of ET/TC/WT (default) or one region")
    p.add_argument("--out", type=Path, default=None,
                   help="default: runs/compare-<time>; the same command with the same --out resumes")
    p.set_defaults(func=commands.compare)


def _add_privacy_parsers(sub: argparse._SubParsersAction) -> None:
    privacy = sub.add_parser("privacy", help="privacy budgets: audit a run's ledgers, plan the noise, "
                                              "calibrate the clipping norm")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    p = privacy_sub.add_parser("audit", help="per-site, per-round epsilon; non-zero exit if a budget is exceeded")
    p.add_argument("path", type=Path, help="a run folder (sites/*/privacy_ledger.sqlite) or one ledger file")
    p.add_argument("--budget", type=float, default=None, help="override the budget recorded in the ledger")
    p.add_argument("--png", type=Path, default=None, help="epsilon over rounds per site")
    p.add_argument("--history", type=Path, default=None,
                   help="the server's history.jsonl to check the ledgers against (default: found beside the run)")
    p.set_defaults(func=commands.privacy_audit)
    p = privacy_sub.add_parser("plan", help="the noise multiplier a consortium needs for a budget")
    p.add_argument("--cases", type=int, default=None, help="DP-SGD at the sites: cases at the (smallest) site")
    p.add_argument("--sites", type=int, default=None,
                   help="client-level DP at the server instead: sites aggregated per round (the unit is a site)")
    p.add_argument("--clipping-norm", type=float, default=None,
                   help="with --sites: client-dp-clipping-norm S, to show the noise std z S / k")
    p.add_argument("--batch-size", type=int, default=2, help="cases per DP-SGD step")
    p.add_argument("--rounds", type=int, default=20, help="federated rounds the budget must last")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--local-steps", type=int, default=0, help="local steps per round (replaces epochs when > 0)")
    p.add_argument("--epsilon", type=float, default=8.0, help="the site's budget over all rounds")
    p.add_argument("--delta", type=float, default=None, help="default: min(1e-5, 0.1 / cases); with --sites 1e-5")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="privacy accountant")
    p.set_defaults(func=commands.privacy_plan)
    p = privacy_sub.add_parser("calibrate", help="per-patient gradient norms on public/phantom data: the "
                                                 "clipping norm dp-max-grad-norm to use (docs/privacy.md)")
    p.add_argument("--data", type=Path, required=True, help="data root of public or phantom cases (not a site's own)")
    add_partition_options(p, partition_help="FeTS partition CSV; without it every case is used")
    p.add_argument("--site", default=None, help="use one site of the partition only")
    add_run_options(p, set_help=SET_HELP + "; the run's model, loss, batch-size, init-checkpoint and trainable")
    p.add_argument("--steps", type=int, default=20, help="batches to measure (batch-size patients each)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=None, help="JSON file of the norms, quantiles and suggestion")
    p.set_defaults(func=commands.privacy_calibrate)


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="coordinator tools for a real deployment (docs/deploy.md)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    p = deploy_sub.add_parser("app", help="write a Flower app folder whose run config is your TOML file")
    p.add_argument("--config", type=Path, default=None, help="TOML run configuration")
    p.add_argument("--out-dir", type=Path, default=None, help="where the coordinator writes results (absolute)")
    p.add_argument("--out", type=Path, required=True, help="app folder to write")
    p.set_defaults(func=commands.deploy_app)

    p = deploy_sub.add_parser("coordinator", help="write the coordinator's systemd units, nginx.conf and flwr config")
    p.add_argument("--public-name", required=True, help="host name (or IP) the hospitals use to reach the coordinator")
    p.add_argument("--public-port", type=int, default=443, help="the port the hospitals reach (the proxy's)")
    p.add_argument("--listen", default="0.0.0.0", help="address the proxy listens on")
    p.add_argument("--superlink-port", type=int, default=8000, help="the SuperLink's port, bound to 127.0.0.1")
    p.add_argument("--root", type=Path, default=Path("/srv/fedbrats"),
                   help="absolute folder holding certs/, superlink/, proxy/, logs/, runs/; the files are written here")
    p.add_argument("--user", default="fedbrats", help="the unprivileged user the services run as")
    p.add_argument("--bin-dir", type=Path, default=None, help="folder of fedbrats and flower-* (default: this Python's)")
    p.set_defaults(func=commands.deploy_coordinator)

    p = deploy_sub.add_parser("site", help="write a hospital's systemd units (SuperNode and app gate)")
    p.add_argument("--site-name", required=True, help="the hospital's name in the coordinator's history and reports")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's proxy")
    p.add_argument("--data-dir", type=Path, required=True, help="absolute path of the hospital's cases (read only)")
    p.add_argument("--root", type=Path, default=Path("/etc/fedbrats"), help="folder holding ca.pem and supernode_key; the units are written to ROOT/systemd")
    p.add_argument("--work-dir", type=Path, default=Path("/var/lib/fedbrats"), help="what must outlive a process")
    p.add_argument("--log-dir", type=Path, default=Path("/var/log/fedbrats"), help="supernode.log and site.log")
    p.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's local API (127.0.0.1)")
    p.add_argument("--user", default="fedbrats", help="the unprivileged user the services run as")
    p.add_argument("--bin-dir", type=Path, default=None, help="folder of fedbrats and flower-* (default: this Python's)")
    p.set_defaults(func=commands.deploy_site)

    p = deploy_sub.add_parser("gate", help="run a SuperNode's ClientApps, refusing any app that is not FedBraTS")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's --port on 127.0.0.1")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="start every ClientApp in a fresh interpreter instead of forking it from a server that "
                   "imported torch, MONAI and the site code once (the default on Linux and macOS)")
    p.set_defaults(func=commands.deploy_gate)

    p = deploy_sub.add_parser("log", help="run a command, appending its output with timestamps to a log file")
    p.add_argument("log_file", type=Path, help="file to append to")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=commands.deploy_log)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report.md, figures and summary.json of any run folder, deployed or simulated")
    p.add_argument("run_dir", type=Path, help="a run folder (its history.jsonl)")
    p.set_defaults(func=commands.report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbrats", description="Federated brain tumor segmentation on BraTS-style MRI."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parsers(sub)
    _add_model_parsers(sub)
    export_command.add_export_parser(sub)
    _add_federation_parsers(sub)
    _add_privacy_parsers(sub)
    _add_deploy_parsers(sub)
    _add_report_parser(sub)
    for leaf in _leaves(parser):  # `fedbrats simulate --debug` works as well as `fedbrats --debug simulate`
        leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (those without subcommands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for action in subs for child in action.choices.values() for leaf in _leaves(child)]


def command_name(args: argparse.Namespace) -> str:
    """'data check', 'privacy audit', 'train', ...: how the user called it, for error lines."""
    nested = {"data": "data_command", "privacy": "privacy_command", "deploy": "deploy_command"}
    sub = getattr(args, nested.get(args.command, ""), None)
    return f"{args.command} {sub}" if sub else args.command


class Terminated(BaseException):
    """SIGTERM (`kill`, a job scheduler's stop) raised like Ctrl-C, so that cleanup in `finally` runs:
    a simulation stops its local SuperLink and federation instead of leaving them running."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM must not cut the cleanup short
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`fedbrats data check --json | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:
        if args.debug:
            raise
        # Our errors are written for users: name the file or value and what was expected.
        ours = isinstance(err, ValueError | OSError | RuntimeError)
        text = " ".join(str(err).split()) or type(err).__name__
        detail = text if ours else f"{type(err).__name__}: {text} (run with --debug for the traceback)"
        print(f"fedbrats {command_name(args)}: error: {detail}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
