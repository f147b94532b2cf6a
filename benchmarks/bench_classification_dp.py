"""Privacy-utility of federated tumour-grade classification: test AUC at epsilon 1, 3, 8 and without DP.

DP-SGD at every site with the patient as the unit (a site's cases are its Poisson-sampled units), on a
phantom whose sites hold `--cases-per-site` cases each (issue 12 asks for at least 100), through the real
commands: `fedbrats data phantom`, `fedbrats simulate`, `fedbrats privacy audit` (must pass for every DP
run). Every run starts from the same seeded model and sees the same cases; the global model of each run
is scored on every case of an independent test phantom, as `bench_classification.py` scores.

    python benchmarks/bench_classification_dp.py --work /tmp/k --sites 2 --cases-per-site 100 --rounds 6

Writes WORK/dp_classification.json; existing run folders are reused (delete them to rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classification import THREADS, Scorer, _run  # noqa: E402  (a sibling benchmark, not a package)

#: the recipe of bench_classification.py's best equal-cost rows, with a larger batch for DP-SGD
RECIPE = ["--preset", "demo", "--set", "task=classification", "--set", "model=resclassifier",
          "--set", "class-input-size=32", "--set", "model-width=8", "--set", "model-depth=3",
          "--set", "lr=0.003"]  # fmt: skip


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
    p.add_argument("--set", action="append", default=[], help="extra run configuration key=value")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = _phantom(work / f"dp_ph_{args.sites}x{args.cases_per_site}", work / "dp_phantom.log",
                    "--sites", str(args.sites), "--cases-per-site", str(args.cases_per_site), "--seed", "11")  # fmt: skip
    test = _phantom(work / "test", work / "phantom_test.log", "--sites", "4", "--cases-per-site", "15", "--seed", "100")
    scorer = Scorer(work)
    settings = [*RECIPE, "--set", f"batch-size={args.batch_size}", *[a for s in args.set for a in ("--set", s)]]
    rows = []
    for eps in args.epsilons.split(","):
        out = work / f"dp_eps_{eps}"
        dp = [] if eps == "none" else ["--set", "dp=true", "--set", f"dp-epsilon={eps}"]
        seconds = None
        if not (out / "global_model.safetensors").exists():
            seconds = _run(["simulate", "--data", str(data), *settings, *dp, "--seed", str(args.seed),
                            "--rounds", str(args.rounds), "--out", str(out)], work / f"dp_eps_{eps}.log")  # fmt: skip
        audit = None
        if dp:
            done = subprocess.run(["fedbrats", "privacy", "audit", str(out)], capture_output=True, text=True,
                                  env={**os.environ, **THREADS}, check=False)  # fmt: skip
            audit = {"returncode": done.returncode, "tail": done.stdout[-600:]}
        auc = scorer.auc(out / "global_model.safetensors", test, args.seed, "all")
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
        spent = {t["site"]: t.get("epsilon") for t in history[-1]["train"]}
        rows.append({"epsilon": eps, "test_auc": auc, "seconds": seconds, "epsilon_spent": spent, "audit": audit})
        print(f"epsilon {eps}: test AUC {auc[0]:.3f} ({auc[1]:.3f}-{auc[2]:.3f}), spent {spent}, "
              f"audit {'-' if audit is None else ('clean' if audit['returncode'] == 0 else 'FAILED')}", flush=True)
    (work / "dp_classification.json").write_text(json.dumps(
        {"sites": args.sites, "cases_per_site": args.cases_per_site, "rounds": args.rounds, "seed": args.seed,
         "batch_size": args.batch_size, "settings": settings, "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
