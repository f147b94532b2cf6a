"""What a deployed site pays per message before it does any work: importing the ClientApp module.

Flower 1.41/1.42 starts a fresh ClientApp process for every message, so `import fedbrats.client.app`
is paid on every train and evaluate message. The goal (issue 15) is at most 1.5x `import torch`: the
ClientApp cannot avoid torch and Flower, but Opacus, MONAI, SciPy, matplotlib and the data stack are
imported only where a message uses them. Each measurement is a fresh interpreter that times the
import alone (CPU and wall seconds, interpreter start-up excluded); the two imports alternate, and
the best of N of each is kept, so that other load on the machine inflates both alike. The ratio is
of CPU seconds (wall seconds are printed beside it). Heavy packages still present after the import
are listed.

    python benchmarks/bench_site_import.py [--runs 5] [--module fedbrats.client.app] [--tree DIR]

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


def run(module: str, runs: int, tree: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(overlay(tree, Path(tmp) / "tree")), env.get("PYTHONPATH", "")]
            )
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
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    result = run(args.module, args.runs, args.tree)
    print(json.dumps(result, indent=2))
    print(f"import {args.module} / import torch = {result['ratio_cpu']:.2f} (CPU, best of {args.runs}; "
          f"goal <= 1.5)")  # fmt: skip


if __name__ == "__main__":
    main()
