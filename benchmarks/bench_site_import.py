"""What a deployed site pays per message before it does any work: importing the ClientApp module.

Flower 1.41/1.42 starts a fresh ClientApp process for every message, so `import fedbrats.client.app`
is paid on every train and evaluate message. The goal (issue 15) is at most 1.5x `import torch`: the
ClientApp cannot avoid torch and Flower, but Opacus, MONAI, SciPy, matplotlib and the data stack are
imported only where a message uses them. Each measurement is a fresh interpreter that times the
import alone (CPU and wall seconds, interpreter start-up excluded); the two imports alternate, and
the best of N of each is kept, so that other load on the machine inflates both alike. The ratio is
of CPU seconds (wall seconds are printed beside it). Heavy packages still present after the import
are listed.

    python benchmarks/bench_site_import.py [--runs 5] [--module fedbrats.client.app] [--tree DIR] [--stages]

``--stages`` times, in one fresh interpreter per run, what a train message then pays on first use, one
stage after the other: torch, the ClientApp, MONAI as a site imports it (`import_monai_light`), and
the first local training step (`train_local` on a tiny model: loss, backward, `SiteAdam`).

``--tree DIR`` measures another checkout of the repository (e.g. ``mkdir DIR && git archive REV |
tar -x -C DIR``) instead of the installed one: its folders are mapped onto the ``fedbrats.*`` names
in a temporary folder put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: Packages a site should not pay for on a message that does not use them (rich: Flower imports it).
HEAVY = ("opacus", "monai", "scipy", "matplotlib", "nibabel", "pandas", "sklearn", "sympy", "rich")
#: The repository folders behind the installed names (pyproject.toml's package-dir).
FOLDERS = {"client": "client", "server": "server", "shared": "shared", "strategies": "strategies",
           "simulations": "simulations"}  # fmt: skip

PROBE = """
import json, sys, time
cpu, wall = time.process_time(), time.perf_counter()
import {module}
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(json.dumps({{"cpu": cpu, "wall": wall, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


STAGES = """
import json, time
stages, cpu = {}, time.process_time()
def stage(name):
    global cpu
    now = time.process_time(); stages[name] = now - cpu; cpu = now
import torch; stage("import torch")
import fedbrats.client.app; stage("import fedbrats.client.app")
from fedbrats.client.site import import_monai_light  # the tree's own (a --tree may predate client.monai_import)
import_monai_light(); import monai.inferers; stage("MONAI (import_monai_light)")
from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.shared.models.registry import create_model
data = [(torch.randn(4, 16, 16, 16), (torch.rand(3, 16, 16, 16) > 0.5).float()) for _ in range(2)]
train_local(create_model("resunet", width=8, depth=2), data, TrainConfig(steps=1, batch_size=2))
stage("first local training step")
print(json.dumps(stages))
"""


def measure_stages(env: dict[str, str], cwd: Path) -> dict[str, float]:
    """CPU seconds of each first-use stage of a train message, in one fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", STAGES], capture_output=True, text=True, env=env, cwd=cwd,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the stages probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(module: str, env: dict[str, str], cwd: Path) -> dict:
    """Seconds to import `module` in a fresh interpreter, and which heavy packages it brought in.

    `cwd` is outside the repository: from its root, `fedbrats` would be the checkout's CLI folder."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)],
                          capture_output=True, text=True, env=env, cwd=cwd, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"importing {module} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overlay(tree: Path, into: Path) -> Path:
    """A folder in which `fedbrats` and its subpackages are the folders of checkout `tree`."""
    if not (tree / "fedbrats" / "__init__.py").is_file():
        raise SystemExit(f"{tree} is not a checkout of the repository (no fedbrats/__init__.py)")
    package = into / "fedbrats"
    package.mkdir(parents=True)
    for entry in (tree / "fedbrats").iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for name, folder in FOLDERS.items():
        (package / name).symlink_to((tree / folder).resolve())
    return into


def _environment(tree: Path | None, tmp: str) -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(overlay(tree, Path(tmp) / "tree")), env.get("PYTHONPATH", "")])
    return env


def run_stages(runs: int, tree: Path | None) -> dict[str, float]:
    """Per stage, the best of `runs` fresh interpreters (load inflates every run; the least is the cost)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = _environment(tree, tmp)
        seen = []
        for i in range(runs):
            print(f"run {i + 1}/{runs} ...", file=sys.stderr, flush=True)
            seen.append(measure_stages(env, Path(tmp)))
    return {name: round(min(s[name] for s in seen), 2) for name in seen[0]}


def run(module: str, runs: int, tree: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = _environment(tree, tmp)
        site, torch = [], []
        for i in range(runs):
            print(f"run {i + 1}/{runs} ...", file=sys.stderr, flush=True)
            torch.append(measure("torch", env, Path(tmp)))
            site.append(measure(module, env, Path(tmp)))
    best_site = min(site, key=lambda m: m["cpu"])
    best_torch = min(torch, key=lambda m: m["cpu"])
    return {
        "module": module, "runs": runs, "tree": str(tree) if tree else "installed",
        "site_cpu_s": round(best_site["cpu"], 2), "site_wall_s": round(min(m["wall"] for m in site), 2),
        "torch_cpu_s": round(best_torch["cpu"], 2), "torch_wall_s": round(min(m["wall"] for m in torch), 2),
        "ratio_cpu": round(best_site["cpu"] / best_torch["cpu"], 2),
        "ratio_wall": round(min(m["wall"] for m in site) / min(m["wall"] for m in torch), 2),
        "heavy_after_import": best_site["heavy"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per import (the best is kept)")
    parser.add_argument("--module", default="fedbrats.client.app", help="the module a site process imports")
    parser.add_argument(
        "--tree", type=Path, default=None, help="measure this checkout instead of the installed one"
    )
    parser.add_argument("--stages", action="store_true", help="time a train message's first-use stages instead")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.stages:
        stages = run_stages(args.runs, args.tree)
        for name, seconds in stages.items():
            print(f"{seconds:6.2f} CPU s  {name}")
        print(f"{sum(stages.values()):6.2f} CPU s  in all (best of {args.runs} per stage)")
        return
    result = run(args.module, args.runs, args.tree)
    print(json.dumps(result, indent=2))
    print(f"import {args.module} / import torch = {result['ratio_cpu']:.2f} (CPU, best of {args.runs}; "
          f"goal <= 1.5)")  # fmt: skip


if __name__ == "__main__":
    main()
