"""Federated vs centralized tumour-grade classification on the phantom, through the real commands.

Runs, one at a time, `fedbrats simulate` (Flower's simulation engine, default strategy) and
`fedbrats train --epochs ROUNDS` (the same local epochs over the pooled training cases) per seed,
then scores both final checkpoints with `fedbrats evaluate` on the same cases: each site's
validation split (`--split val`, drawn by the seed as training drew it) and every case of an
independent test phantom (another generator seed; the validation splits hold 8 cases, too few for
an AUC). The centralized model scored is `last.safetensors` (the last epoch, as the federation's
final model is the last round), not the checkpoint picked on validation AUC.

    python benchmarks/bench_classification.py --work /tmp/k --seeds 0,1,2

Prints one row per seed and the mean and spread, and writes WORK/classification.json.
Existing run folders are reused (delete them to rerun).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

AUC_LINE = re.compile(r"AUC (\d\.\d+) \(95% CI (\d\.\d+)-(\d\.\d+)\)")


def _run(args: list[str], log: Path) -> float:
    """Run one fedbrats command, its output into `log`; the wall seconds (a failure names the log)."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(["fedbrats", *args], stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"fedbrats {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def _auc(checkpoint: Path, data: Path, seed: int, split: str, log: Path) -> tuple[float, float, float]:
    _run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--partition",
          str(data / "partitioning_1.csv"), "--split", split, "--seed", str(seed), "--device", "cpu"], log)  # fmt: skip
    found = AUC_LINE.search(log.read_text())
    if not found:
        raise SystemExit(f"no 'AUC x (95% CI a-b)' line in {log}")
    return float(found[1]), float(found[2]), float(found[3])


def _timed(done: Path, args: list[str], log: Path) -> float | None:
    """Run unless `done` exists (a finished earlier run); its wall seconds, None when reused."""
    return None if done.exists() else _run(args, log)


def run_seed(work: Path, data: Path, test: Path, seed: int, rounds: int, settings: list[str], tag: str) -> dict:
    fed, cen = work / f"{tag}fed{seed}", work / f"{tag}cen{seed}"
    common = ["--data", str(data), *settings, "--seed", str(seed)]
    row: dict = {"seed": seed}
    row["fed_seconds"] = _timed(fed / "global_model.safetensors",
                                ["simulate", *common, "--rounds", str(rounds), "--out", str(fed)],
                                work / f"{tag}fed{seed}.log")  # fmt: skip
    row["cen_seconds"] = _timed(cen / "last.safetensors",
                                ["train", *common, "--partition", str(data / "partitioning_1.csv"),
                                 "--epochs", str(rounds), "--device", "cpu", "--out", str(cen)],
                                work / f"{tag}cen{seed}.log")  # fmt: skip
    for name, checkpoint in (("fed", fed / "global_model.safetensors"), ("cen", cen / "last.safetensors")):
        row[f"{name}_val"] = _auc(checkpoint, data, seed, "val", work / f"{tag}{name}{seed}_val.log")
        row[f"{name}_test"] = _auc(checkpoint, test, seed, "all", work / f"{tag}{name}{seed}_test.log")
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
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        row = run_seed(work, data, test, seed, args.rounds, settings, args.tag)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for split in ("val", "test"):
        print(f"{split}: federated AUC {_summary(rows, f'fed_{split}')}; centralized {_summary(rows, f'cen_{split}')}")
        ratios = [r[f"fed_{split}"][0] / r[f"cen_{split}"][0] for r in rows]
        print(f"{split}: federated / centralized {statistics.mean(ratios):.3f} (per seed {[round(x, 3) for x in ratios]})")
    (work / f"{args.tag}classification.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
