"""Federated vs centralized tumour-grade classification on the phantom, through the real commands.

Runs, one at a time, niced and on one thread (so that a run is reproducible and leaves the other
core alone), `fedbrats train --epochs ROUNDS` (the same local epochs over the pooled training cases)
and `fedbrats simulate` (Flower's simulation engine, default strategy) per seed, then scores both
final checkpoints as `fedbrats evaluate` does (the same functions, the input cubes computed once)
on each site's validation split (`--split val`, drawn by the seed as training drew it) and on
every case of an independent test phantom (another generator seed; the validation splits hold 8
cases, too few for an AUC). The centralized model scored is `last.safetensors` (the last epoch, as
the federation's final model is the last round), not the checkpoint picked on validation AUC.

    python benchmarks/bench_classification.py --work /tmp/k --seeds 0,1,2 --rounds 16 --tag lr3 --set lr=0.003

Prints one row per seed and the mean and spread, and writes WORK/TAGclassification.json.
Existing run folders are reused (delete them to rerun); `--arms cen` runs the centralized arm only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: one core per run: a run is reproducible, and it leaves the other core to the rest of the machine
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(args: list[str], log: Path) -> float:
    """Run one fedbrats command (niced, one thread), its output into `log`; the wall seconds (a failure names the log)."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(["nice", "-n", "5", "fedbrats", *args], stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, **THREADS})  # fmt: skip
    if code:
        raise SystemExit(f"fedbrats {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


class Scorer:
    """`fedbrats evaluate`'s figures (the same functions: `case_cube`, `class_probabilities`, `site_summary`
    with the run seed's 1000-resample bootstrap), with each case's input cube computed once for all
    checkpoints (`evaluate` crops and resamples every case again: 80 s for the 60 test cases)."""

    def __init__(self, work: Path):
        self.work = work
        self.cubes: dict[tuple[str, int], np.ndarray] = {}

    def _cube(self, case, size: int) -> np.ndarray:
        from fedbrats.shared.data.class_dataset import case_cube

        key = (str(case.folder), size)
        if key not in self.cubes:
            self.cubes[key] = case_cube(case, size)
        return self.cubes[key]

    def auc(self, checkpoint: Path, data: Path, seed: int, split: str) -> tuple[float, float, float]:
        from fedbrats.shared.config import RunConfig
        from fedbrats.shared.data.site_cases import cases_of_sites
        from fedbrats.shared.evaluation.predict_class import (
            class_probabilities,
            load_classifier,
            site_summary,
        )
        from fedbrats.shared.tasks import load_labels

        torch.set_num_threads(1)
        classifier = load_classifier(checkpoint)
        config = RunConfig(task="classification", label_classes=",".join(classifier.classes), seed=seed)
        labels = load_labels(config, data)
        sites = cases_of_sites(data, data / "partitioning_1.csv", seed=seed, val_fraction=config.val_fraction)
        cases = [case for found in sites.values() for case in found.select(split)]  # evaluate's order
        probs = [class_probabilities(classifier.model, self._cube(c, classifier.input_size), torch.device("cpu"))
                 for c in cases]  # fmt: skip
        truth = np.array([labels.index(c.case_id) for c in cases])
        row = site_summary(np.stack(probs), truth, len(classifier.classes), n_boot=1000, seed=seed)
        return row["auc"], row["auc_low"], row["auc_high"]


def _timed(done: Path, args: list[str], log: Path) -> float | None:
    """Run unless `done` exists (a finished earlier run); its wall seconds, None when reused."""
    return None if done.exists() else _run(args, log)


def run_seed(work: Path, data: Path, test: Path, seed: int, rounds: int, settings: list[str], tag: str,
             scorer: Scorer, arms: tuple[str, ...]) -> dict:  # fmt: skip
    fed, cen = work / f"{tag}fed{seed}", work / f"{tag}cen{seed}"
    common = ["--data", str(data), *settings, "--seed", str(seed)]
    row: dict = {"seed": seed}
    if "cen" in arms:
        row["cen_seconds"] = _timed(cen / "last.safetensors",
                                    ["train", *common, "--partition", str(data / "partitioning_1.csv"),
                                     "--epochs", str(rounds), "--device", "cpu", "--out", str(cen)],
                                    work / f"{tag}cen{seed}.log")  # fmt: skip
    if "fed" in arms:
        row["fed_seconds"] = _timed(fed / "global_model.safetensors",
                                    ["simulate", *common, "--rounds", str(rounds), "--out", str(fed)],
                                    work / f"{tag}fed{seed}.log")  # fmt: skip
    for name, checkpoint in (("fed", fed / "global_model.safetensors"), ("cen", cen / "last.safetensors")):
        if name in arms:
            row[f"{name}_val"] = scorer.auc(checkpoint, data, seed, "val")
            row[f"{name}_test"] = scorer.auc(checkpoint, test, seed, "all")
    return row


def _summary(rows: list[dict], key: str) -> str:
    values = [r[key][0] for r in rows]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder of the phantoms, runs and logs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    p.add_argument("--rounds", type=int, default=8, help="federated rounds = centralized epochs")
    p.add_argument("--tag", default="", help="prefix of the run folders (a recipe variant)")
    p.add_argument("--set", action="append", default=[], help="extra run configuration key=value")
    p.add_argument("--arms", default="fed,cen", help="fed, cen or fed,cen (centralized first)")
    args = p.parse_args()
    work = args.work.resolve()
    data, test = work / "ph4", work / "test"
    for root, extra in ((data, []), (test, ["--cases-per-site", "15"])):
        if not (root / "labels.csv").exists():
            seed = "0" if root == data else "100"
            _run(["data", "phantom", "--out", str(root), "--sites", "4", "--voxel-size", "3", "--seed", seed, *extra],
                 work / f"phantom_{root.name}.log")  # fmt: skip
    settings = ["--preset", "demo", "--set", "task=classification", "--set", "model=resclassifier",
                "--set", "class-input-size=32", "--set", "model-width=8", "--set", "model-depth=3"]  # fmt: skip
    for item in args.set:
        settings += ["--set", item]
    arms = tuple(a for a in args.arms.split(",") if a)
    if not arms or set(arms) - {"fed", "cen"}:
        raise SystemExit(f"--arms expects fed, cen or fed,cen; got {args.arms!r}")
    rows, scorer = [], Scorer(work)
    for seed in (int(s) for s in args.seeds.split(",")):
        row = run_seed(work, data, test, seed, args.rounds, settings, args.tag, scorer, arms)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for split in ("val", "test"):
        print(f"{split}: " + "; ".join(f"{a} AUC {_summary(rows, f'{a}_{split}')}" for a in arms))
        if len(arms) == 2:
            ratios = [r[f"fed_{split}"][0] / r[f"cen_{split}"][0] for r in rows]
            print(f"{split}: federated / centralized {statistics.mean(ratios):.3f} "
                  f"(per seed {[round(x, 3) for x in ratios]})")  # fmt: skip
    (work / f"{args.tag}classification.json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
