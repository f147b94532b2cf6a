"""Cost of DP-SGD at a site: step time and peak memory against the ordinary step, same model and batch, CPU.

A "step" is forward + backward + Adam, as in `bench_models.py`; the DP step adds per-patient
gradients (Opacus `GradSampleModule`, functorch or hooks), clipping and noise (`DPOptimizer`), the
set-up `client.privacy.train_private` uses. Each variant runs in its own process, so its memory is
its own: "peak memory" is the growth of the resident set (`resource.getrusage` ru_maxrss, the
process' peak RSS, minus the RSS just before the first step). tracemalloc would miss it: torch
allocates tensors outside Python's allocator. Prints a Markdown table.

    python benchmarks/bench_dp.py                       # demo size: width 8, depth 3, 32^3, batch 2
    python benchmarks/bench_dp.py --preset cpu --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from fedbrats.shared.constants import MODALITIES, REGIONS  # noqa: E402
from fedbrats.shared.models import count_parameters, create_model  # noqa: E402
from fedbrats.shared.models.losses import region_loss  # noqa: E402

VARIANTS = ("plain", "dp-functorch", "dp-hooks")
#: name -> model config, patch edge, batch. "demo" is the CPU demo's model (shared.config.DEMO).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": {"width": 8, "depth": 2}, "patch": 16, "batch": 2},
    "demo": {"model": {"width": 8, "depth": 3}, "patch": 32, "batch": 2},
    "cpu": {"model": {"width": 16, "depth": 4}, "patch": 64, "batch": 2},
}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(variant: str, preset: str, steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    """Time `steps` steps of one variant in this process; memory is this process' RSS growth."""
    if threads:
        torch.set_num_threads(threads)
    config = PRESETS[preset]
    torch.manual_seed(0)
    model = create_model("resunet", **config["model"]).train()
    patch, batch = config["patch"], config["batch"]
    x = torch.randn(batch, len(MODALITIES), patch, patch, patch)
    y = (torch.rand(batch, len(REGIONS), patch, patch, patch) < 0.1).float()
    params = count_parameters(model)
    if variant == "plain":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(model, loss_reduction="mean", force_functorch=variant == "dp-functorch")
        optimizer = DPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4), noise_multiplier=1.0,
                                max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean")  # fmt: skip
    before = _rss_kib()
    times = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for i in range(warmup + steps):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            region_loss(model(x), y).backward()
            optimizer.step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"variant": variant, "params": params, "s_per_step": statistics.median(times),
            "peak_mib": max(0, peak - before) / 1024, "threads": torch.get_num_threads()}  # fmt: skip


def run_benchmark(preset: str = "demo", *, steps: int = 3, warmup: int = 1, threads: int | None = None,
                  variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:  # fmt: skip
    """One row per variant, each measured in a fresh process."""
    rows = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--preset", preset, "--steps", str(steps),
               "--warmup", str(warmup)] + (["--threads", str(threads)] if threads else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"variant": variant, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def format_table(rows: list[dict[str, Any]], preset: str) -> str:
    config = PRESETS[preset]
    plain = next((r for r in rows if r["variant"] == "plain" and "error" not in r), None)
    lines = [
        f"DP-SGD step vs plain step: resunet {config['model']}, patch {config['patch']}^3, batch {config['batch']}, "
        f"CPU, torch {torch.__version__}; peak memory = growth of the process' peak RSS over the steps",
        "",
        "| variant | params | s / step (median) | x plain | peak memory (MiB) | x plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | failed: {r['error']} | | | |")
            continue
        t_ratio = f"{r['s_per_step'] / plain['s_per_step']:.1f}" if plain else "-"
        m_ratio = f"{r['peak_mib'] / plain['peak_mib']:.1f}" if plain and plain["peak_mib"] > 0 else "-"
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['s_per_step']:.3f} | {t_ratio} | "
                     f"{r['peak_mib']:.0f} | {m_ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives stable numbers on a shared machine)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.preset, args.steps, args.warmup, args.threads)))
        return
    rows = run_benchmark(args.preset, steps=args.steps, warmup=args.warmup, threads=args.threads,
                         variants=tuple(args.variants))  # fmt: skip
    print(format_table(rows, args.preset))


if __name__ == "__main__":
    main()
