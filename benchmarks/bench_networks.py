"""The seed papers' networks on the phantom: same size, same CPU-time budget, scored on an independent phantom.

Each registered segmentation model is built at one small size (width 8, depth 3, patch 32, batch 2,
Adam lr 1e-3, constant schedule) and trained centrally on the pooled sites of a partition with the
project's own pieces (`fedbrats train`'s `training_cases`, the task's dataset and loss, `client.trainer
.train_local`), in chunks of steps until `--budget-seconds` of *process CPU time* are spent (the
machine is shared, so wall time would measure the neighbours). Then a fixed subset of test cases is
scored with the evaluation pipeline (sliding window without TTA, scored on the original grid): Dice
and HD95 per region with and without post-processing (nesting + small-ET rule, `postprocess`), and,
for models with the slice branch (unetpp, bifpn), with and without its false-positive removal.
Prints a Markdown table; writes the figures as JSON (`--out`), rewritten after every model, with the load
average before and after each model and its range during training (the CPU budget is fair under load, the
wall time is not). One torch thread by default, so two runs on a small machine cannot starve each other.
`bench_networks_federated.py` scores federated global models with the same `score`.

    nice -n 5 python benchmarks/bench_networks.py --data /work/exp/ph4 --partition /work/exp/ph4/partitioning_1.csv \\
        --test /work/exp/test --budget-seconds 120 --chunk 2 --test-cases 10 --threads 1 --out benchmarks/bench_networks.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from rich.console import Console  # noqa: E402

from fedbrats.client.settings import model_for, train_config  # noqa: E402
from fedbrats.client.trainer import train_local  # noqa: E402
from fedbrats.client.training_run import training_cases  # noqa: E402
from fedbrats.shared.config import RunConfig  # noqa: E402
from fedbrats.shared.constants import REGIONS  # noqa: E402
from fedbrats.shared.data.site_cases import cases_of_sites  # noqa: E402
from fedbrats.shared.models import count_parameters  # noqa: E402
from fedbrats.shared.tasks import task_for  # noqa: E402

MODELS = ("resunet", "unetpp", "bifpn", "tunet", "selfensemble", "resfcn2d")
console = Console(stderr=True)


def run_config(model: str, args: argparse.Namespace) -> RunConfig:
    """The one-site run configuration of `model` at the benchmark's size (constant lr: the length is a budget)."""
    return RunConfig(model=model, model_width=args.width, model_depth=args.depth, patch_size=args.patch,
                     batch_size=args.batch, lr=args.lr, lr_schedule="constant", warmup_steps=0, seed=args.seed,
                     local_steps=args.chunk, rounds=1, val_fraction=0.0, cache="memory")  # fmt: skip


def train_for_budget(config: RunConfig, net: torch.nn.Module, train_ds: Any, budget: float) -> dict[str, Any]:
    """Train `net` in chunks of `config.local_steps` until `budget` CPU seconds are spent; what was done."""
    task = task_for(config)
    steps, losses, cpu, loads = 0, [], 0.0, []
    while cpu < budget:
        loads.append(os.getloadavg()[0])
        start = time.process_time()
        result = train_local(net, train_ds, train_config(config, len(train_ds)), loss_fn=task.loss,
                             start_step=steps, device="cpu")  # fmt: skip
        cpu += time.process_time() - start
        steps = result.end_step
        losses.append(result.mean_loss)
        console.print(
            f"  {config.model}: {steps} steps, loss {result.mean_loss:.4f}, {cpu:.0f}/{budget:.0f} CPU-s"
        )
    voxels = steps * config.batch_size * math.prod(config.patch)
    return {"steps": steps, "train_cpu_s": cpu, "train_voxels_per_cpu_s": voxels / cpu,
            "first_loss": losses[0], "last_loss": losses[-1],
            "train_wall_load_1min": [min(loads), max(loads)]}  # fmt: skip


def test_cases(test_dir: Path, n: int, seed: int) -> list[Any]:
    """A fixed subset of `n` test cases: evenly spaced over the sorted case ids (so every site is drawn)."""
    found = cases_of_sites(test_dir, None, seed=seed, val_fraction=0.0)
    cases = sorted((c for s in found.values() for c in s.train), key=lambda c: c.case_id)
    if len(cases) < n:
        raise ValueError(f"{test_dir}: {len(cases)} labelled case(s), --test-cases asks for {n}")
    return [cases[i] for i in np.linspace(0, len(cases) - 1, n).round().astype(int)]


def variants_of(net: torch.nn.Module) -> list[tuple[str, bool | None]]:
    """(label, fp_removal) of each inference variant: the slice branch on and off where the model has one."""
    if getattr(net, "slice_branch", None) is not None and hasattr(net, "fp_removal"):
        return [("fp-removal", True), ("no fp-removal", False)]
    return [("", None)]


def score(net: torch.nn.Module, cases: list[Any], patch: tuple[int, ...], tta: bool) -> dict[str, Any]:
    """Mean Dice/HD95 per region of every (variant, post-processing) pair, and inference CPU/wall s per case.

    The one scoring path of the table: `bench_networks_federated.py` scores the federated checkpoints with it."""
    from fedbrats.shared.data.transforms import preprocess
    from fedbrats.shared.data.volumes import load_case
    from fedbrats.shared.evaluation.inference import predict_probabilities
    from fedbrats.shared.evaluation.metrics import mean_over_cases, region_metrics
    from fedbrats.shared.evaluation.postprocess import min_et_voxels, postprocess

    net.eval()
    rows: dict[str, list[dict[str, dict[str, float]]]] = {}
    cpu: list[float] = []
    wall: list[float] = []
    for case in cases:
        volume = load_case(case, with_labels=True)
        image, _, box = preprocess(volume)
        truth = volume.regions.astype(bool)
        for label, fp in variants_of(net):
            if fp is not None:
                net.fp_removal = fp
            c0, w0 = time.process_time(), time.perf_counter()
            probs = predict_probabilities(
                net, torch.as_tensor(image), patch_size=patch, tta=tta, device="cpu"
            )
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            raw = probs.numpy() >= 0.5
            post = postprocess(raw, min_et_voxels(volume.spacing), brain=(image != 0).any(0))
            for pp, regions in (("raw", raw), ("post", post)):
                key = f"{label}, {pp}" if label else pp
                rows.setdefault(key, []).append(region_metrics(box.uncrop(regions), truth, volume.spacing))
    if variants_of(net)[0][1] is not None:
        net.fp_removal = True
    means = {key: mean_over_cases(r) for key, r in rows.items()}
    variants = len(variants_of(net))
    return {"metrics": {k: {r: {"dice": m[r]["dice"], "hd95": m[r]["hd95"]} for r in REGIONS} for k, m in means.items()},
            "infer_cpu_s_per_case": float(np.mean(cpu)), "infer_wall_s_per_case": float(np.mean(wall)),
            "passes_per_case": variants}  # fmt: skip


def bench_model(model: str, args: argparse.Namespace, cases: list[Any]) -> dict[str, Any]:
    """Build, train for the budget and score one model; an error is recorded, not raised."""
    config = run_config(model, args)
    try:
        net = model_for(config)
    except Exception as err:  # a model still being written by someone else: skip it, say why
        return {"model": model, "error": f"build failed: {type(err).__name__}: {err}"}
    task = task_for(config)
    train, _ = training_cases(config, Path(args.data), Path(args.partition) if args.partition else None, None)
    train_ds = task.dataset(train, config, labels=None, augment=True, cache_dir=None)
    console.print(
        f"[bold]{model}[/] {net.config}: {count_parameters(net):,} parameters, {len(train_ds)} cases"
    )
    torch.manual_seed(args.seed)
    record = {
        "model": model,
        "config": net.config,
        "parameters": count_parameters(net),
        "train_cases": len(train_ds),
    }
    record.update(train_for_budget(config, net, train_ds, args.budget_seconds))
    record.update(score(net, cases, config.patch, args.tta))
    return record


def fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def table(records: list[dict[str, Any]]) -> str:
    """One row per (model, inference variant): Dice and HD95 per region, size, speed."""
    head = ("| model | inference | Dice ET | Dice TC | Dice WT | mean Dice | HD95 ET | HD95 TC | HD95 WT | params "
            "| steps | train vox/CPU-s | infer CPU-s/case |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rec in records:
        if "error" in rec:
            lines.append(f"| {rec['model']} | {rec['error']} |" + " |" * (head.count("|") - 3))
            continue
        per_pass = rec["infer_cpu_s_per_case"]
        for key, m in rec["metrics"].items():
            dice = [m[r]["dice"] for r in REGIONS]
            lines.append(
                f"| {rec['model']} | {key} | "
                + " | ".join(fmt(d) for d in dice)
                + f" | {fmt(float(np.mean(dice)))} | "
                + " | ".join(fmt(m[r]["hd95"], 1) for r in REGIONS)
                + f" | {rec['parameters']:,} | {rec['steps']} | {rec['train_voxels_per_cpu_s']:,.0f} | {fmt(per_pass, 2)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="/work/exp/ph4", help="training phantom (cases pooled over its sites)"
    )
    parser.add_argument("--partition", default="/work/exp/ph4/partitioning_1.csv")
    parser.add_argument("--test", default="/work/exp/test", help="independent phantom to score on")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated registered model names")
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="training CPU seconds per model")
    parser.add_argument("--chunk", type=int, default=10, help="optimiser steps between budget checks")
    parser.add_argument("--test-cases", type=int, default=15)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: two runs cannot starve each other)"
    )
    parser.add_argument(
        "--tta", action="store_true", help="flip test-time augmentation at inference (8x slower)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/bench_networks.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cases = test_cases(Path(args.test), args.test_cases, args.seed)
    console.print(f"scoring on {len(cases)} test cases: {', '.join(c.case_id for c in cases)}")
    records: list[dict[str, Any]] = []
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for model in models:
        load_before = os.getloadavg()
        records.append(bench_model(model, args, cases))
        records[-1]["load_average"] = {"before": load_before, "after": os.getloadavg()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "started_utc": started, "torch": torch.__version__,
                                        "test_cases": [c.case_id for c in cases], "models": records}, indent=1))  # fmt: skip
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
