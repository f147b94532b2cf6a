"""Privacy-utility of federated tumour-grade classification: test AUC at epsilon 1, 3, 8 and without DP.

DP-SGD at every site with the patient as the unit (a site's cases are its Poisson-sampled units), on a
phantom whose sites hold `--cases-per-site` cases each (issue 12 asks for at least 100), through the real
commands: `fedbrats data phantom`, `fedbrats simulate`, `fedbrats privacy audit` (must pass for every DP
run). Every run starts from the same seeded model and sees the same cases; the global model of each run
is scored on every case of an independent test phantom, as `bench_classification.py` scores.

    python benchmarks/bench_classification_dp.py --work /tmp/k --sites 2 --cases-per-site 100 --rounds 6

`--recipe profile --init-checkpoint SEG.safetensors` runs docs/privacy.md's recipe for the grade instead:
the multi-task U-Net with the profile head (`model-class-head=profile`), its U-Net warm-started from a
segmentation model trained outside the federation (another phantom seed standing in for public data) and
frozen, DP-SGD training only the head's 26 weights (`trainable=class_head.*`). The head starts at zero
(AUC 0.5), so every gain in AUC is learned from the sites' data under the budget. Scored by `fedbrats
evaluate` on the same test phantom.

Writes WORK/dp_classification.json; existing run folders are reused (delete them to rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classification import THREADS, Scorer, _run  # noqa: E402  (a sibling benchmark, not a package)

#: the recipe of bench_classification.py's best equal-cost rows, with a larger batch for DP-SGD
RECIPE = ["--preset", "demo", "--set", "task=classification", "--set", "model=resclassifier",
          "--set", "class-input-size=32", "--set", "model-width=8", "--set", "model-depth=3",
          "--set", "lr=0.003"]  # fmt: skip
#: docs/privacy.md's recipe for the grade: a frozen public U-Net, DP-SGD on the profile head only (26 weights,
#: so lr 1e-2 rather than the U-Net's 1e-3: a few dozen noisy steps have to move them to order 1)
PROFILE = ["--preset", "demo", "--set", "task=multitask", "--set", "model=selfensemble",
           "--set", "model-class-head=profile", "--set", "trainable=class_head.*", "--set", "lr=0.01"]  # fmt: skip


def _evaluate_auc(checkpoint: Path, data: Path, seed: int, out: Path) -> tuple[float, float, float]:
    """Test AUC and its bootstrap interval as `fedbrats evaluate` prints them (any task's checkpoint)."""
    done = subprocess.run(["fedbrats", "evaluate", "--checkpoint", str(checkpoint), "--data", str(data),
                           "--seed", str(seed), "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, **THREADS}, check=True)  # fmt: skip
    found = re.search(r"AUC (\d\.\d+) \(95% CI (\d\.\d+)\s*-\s*(\d\.\d+)", " ".join(done.stdout.split()))
    if not found:
        raise RuntimeError(f"fedbrats evaluate printed no AUC for {checkpoint}: {done.stdout[-400:]}")
    return tuple(float(x) for x in found.groups())


def _phantom(root: Path, log: Path, *args: str) -> Path:
    if not (root / "partitioning_1.csv").exists():
        _run(["data", "phantom", "--out", str(root), "--voxel-size", "3", *args], log)
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder of the phantoms, runs and logs")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--cases-per-site", type=int, default=100)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="expected Poisson batch (cases) at a site")
    p.add_argument("--epsilons", default="none,8,3,1", help="comma-separated; 'none' = without DP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=("classifier", "profile"), default="classifier",
                   help="the classifier alone, cold start (default), or the profile head on a frozen public U-Net")
    p.add_argument("--init-checkpoint", type=Path, help="the public segmentation model (--recipe profile)")
    p.add_argument("--set", action="append", default=[], help="extra run configuration key=value")
    args = p.parse_args()
    if args.recipe == "profile" and not args.init_checkpoint:
        p.error("--recipe profile needs --init-checkpoint: a segmentation model trained outside the federation")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = _phantom(work / f"dp_ph_{args.sites}x{args.cases_per_site}", work / "dp_phantom.log",
                    "--sites", str(args.sites), "--cases-per-site", str(args.cases_per_site), "--seed", "11")  # fmt: skip
    test = _phantom(work / "test", work / "phantom_test.log", "--sites", "4", "--cases-per-site", "15", "--seed", "100")
    scorer = Scorer(work)
    recipe = RECIPE if args.recipe == "classifier" else [*PROFILE, "--set", f"init-checkpoint={args.init_checkpoint}"]
    settings = [*recipe, "--set", f"batch-size={args.batch_size}", *[a for s in args.set for a in ("--set", s)]]
    prefix = "dp" if args.recipe == "classifier" else f"dp_{args.recipe}"
    rows = []
    for eps in args.epsilons.split(","):
        out = work / f"{prefix}_eps_{eps}"
        dp = [] if eps == "none" else ["--set", "dp=true", "--set", f"dp-epsilon={eps}"]
        seconds = None
        if not (out / "global_model.safetensors").exists():
            seconds = _run(["simulate", "--data", str(data), *settings, *dp, "--seed", str(args.seed),
                            "--rounds", str(args.rounds), "--out", str(out)], work / f"{prefix}_eps_{eps}.log")  # fmt: skip
        audit = None
        if dp:
            done = subprocess.run(["fedbrats", "privacy", "audit", str(out)], capture_output=True, text=True,
                                  env={**os.environ, **THREADS}, check=False)  # fmt: skip
            audit = {"returncode": done.returncode, "tail": done.stdout[-600:]}
        model = out / "global_model.safetensors"
        auc = (scorer.auc(model, test, args.seed, "all") if args.recipe == "classifier"
               else _evaluate_auc(model, test, args.seed, work / f"{prefix}_eps_{eps}_test.csv"))  # fmt: skip
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
        spent = {t["site"]: t.get("epsilon") for t in history[-1]["train"]}
        rows.append({"epsilon": eps, "test_auc": auc, "seconds": seconds, "epsilon_spent": spent, "audit": audit})
        print(f"epsilon {eps}: test AUC {auc[0]:.3f} ({auc[1]:.3f}-{auc[2]:.3f}), spent {spent}, "
              f"audit {'-' if audit is None else ('clean' if audit['returncode'] == 0 else 'FAILED')}", flush=True)
    (work / f"{prefix}_classification.json").write_text(json.dumps(
        {"recipe": args.recipe, "sites": args.sites, "cases_per_site": args.cases_per_site, "rounds": args.rounds, "seed": args.seed,
         "batch_size": args.batch_size, "settings": settings, "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
