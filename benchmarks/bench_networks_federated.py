"""The federated rows of the networks table: score global models of `fedbrats simulate` runs on the test phantom.

The scoring is `bench_networks.score`, the centrally trained rows' own (same test cases, sliding window without
TTA, Dice/HD95 with and without post-processing, with and without the slice branch's FP removal), so the two
tables differ only in how the weights were trained. Each argument is a run folder (its `global_model.safetensors`)
or a checkpoint; the model is rebuilt from the checkpoint's metadata and scored with the patch it was trained on.

    for m in resunet unetpp bifpn tunet selfensemble resfcn2d; do
      fedbrats simulate --data /work/exp/ph4 --partition /work/exp/ph4/partitioning_1.csv --preset demo \\
        --set model=$m --strategy fets_fedavgm --rounds 3 --seed 0 --out runs/fed-$m
    done
    python benchmarks/bench_networks_federated.py runs/fed-* --test /work/exp/test --test-cases 10 \\
        --out benchmarks/bench_networks_federated.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_networks, the shared scoring

from bench_networks import fmt, score, test_cases  # noqa: E402
from rich.console import Console  # noqa: E402

from fedbrats.shared.checkpoint import load_checkpoint  # noqa: E402
from fedbrats.shared.constants import REGIONS  # noqa: E402
from fedbrats.shared.evaluation.inference import training_patch  # noqa: E402
from fedbrats.shared.models import count_parameters  # noqa: E402

console = Console(stderr=True)
CHECKPOINT = "global_model.safetensors"


def checkpoint_of(path: Path) -> Path:
    """The global model of a run folder, or the checkpoint itself; a clear error when there is none."""
    found = path / CHECKPOINT if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"{path}: no {CHECKPOINT} (is the run finished?)")
    return found


def run_facts(run_dir: Path) -> dict[str, Any]:
    """Rounds done and simulated/wall time of the run, from its history (empty when the file is missing)."""
    history = run_dir / "history.jsonl"
    if not history.is_file():
        return {}
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    ok = [r for r in records if r.get("status") == "ok"]
    last = ok[-1] if ok else {}
    return {"rounds_ok": len(ok), "site_mean_dice_last_round": last.get("mean_dice")}


def bench_checkpoint(path: Path, cases: list[Any], tta: bool) -> dict[str, Any]:
    """Rebuild the checkpoint's model and score it; what the metadata says about its training comes along."""
    checkpoint = checkpoint_of(path)
    net, meta = load_checkpoint(checkpoint)
    patch = training_patch(meta, checkpoint)
    console.print(f"[bold]{meta['model_name']}[/] {checkpoint}: round {meta.get('round')}, patch {patch}")
    record = {"model": meta["model_name"], "checkpoint": str(checkpoint), "config": meta["model_config"],
              "parameters": count_parameters(net), "rounds": meta.get("round"), "strategy": meta.get("strategy"),
              "patch": list(patch), "load_average_before": os.getloadavg()}  # fmt: skip
    record.update(run_facts(checkpoint.parent))
    record.update(score(net, cases, patch, tta))
    record["load_average_after"] = os.getloadavg()
    return record


def table(records: list[dict[str, Any]]) -> str:
    """One row per (model, inference variant): Dice and HD95 per region, size, inference cost."""
    head = ("| model | inference | Dice ET | Dice TC | Dice WT | mean Dice | HD95 ET | HD95 TC | HD95 WT | params "
            "| rounds | infer CPU-s/case |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rec in records:
        for key, m in rec["metrics"].items():
            dice = [m[r]["dice"] for r in REGIONS]
            lines.append(
                f"| {rec['model']} | {key} | " + " | ".join(fmt(d) for d in dice) + f" | {fmt(float(np.mean(dice)))} | "
                + " | ".join(fmt(m[r]["hd95"], 1) for r in REGIONS)
                + f" | {rec['parameters']:,} | {rec['rounds']} | {fmt(rec['infer_cpu_s_per_case'], 2)} |"
            )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders of `fedbrats simulate` or checkpoints"
    )
    parser.add_argument("--test", default="/work/exp/test", help="independent phantom to score on")
    parser.add_argument("--test-cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="as bench_networks.py: picks the same test cases")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tta", action="store_true", help="flip test-time augmentation at inference (8x slower)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/bench_networks_federated.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = test_cases(Path(args.test), args.test_cases, args.seed)
    console.print(f"scoring on {len(cases)} test cases: {', '.join(c.case_id for c in cases)}")
    previous = json.loads(args.out.read_text())["models"] if args.out.is_file() else []
    records = [r for r in previous if r["checkpoint"] not in {str(checkpoint_of(p)) for p in args.runs}]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for path in args.runs:
        records.append(bench_checkpoint(path, cases, args.tta))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"started_utc": started, "test_cases": [c.case_id for c in cases],
                                        "threads": args.threads, "torch": torch.__version__, "models": records},
                                       indent=1))  # fmt: skip
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
