"""Phantom generation speed: cases per second at 3 mm (tests, CPU demos) and 1 mm (real BraTS size).

Times `generate_phantom` end to end (anatomy, tumor, four modalities, gzip NIfTI writing), after a
warm-up that pays the one-off template load (nilearn import, 1 mm maps, per-size smoothing), which
is reported in its own column. CPU seconds are shown next to wall seconds because a shared machine
inflates the wall clock. Prints Markdown table rows.

    python benchmarks/bench_phantom.py [--cases 12 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.data.phantom.anatomy import load_template, make_grid


def _size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*.nii.gz")) / 1e6


def bench(voxel_size: float, cases: int, workdir: Path) -> str:
    t0 = time.perf_counter()
    load_template(voxel_size)
    setup = time.perf_counter() - t0
    out = workdir / f"phantom_{voxel_size:g}mm"
    t0, c0 = time.perf_counter(), time.process_time()
    generate_phantom(
        out, sites=2, cases_per_site=(cases + 1) // 2, voxel_size=voxel_size, seed=1, progress=False
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = 2 * ((cases + 1) // 2)
    shape = "x".join(map(str, make_grid(voxel_size).shape))
    row = (
        f"| phantom {voxel_size:g} mm | {shape} | {n} | {seconds / n:.2f} | {cpu / n:.2f} | {n / seconds:.2f} "
        f"| {_size_mb(out) / n:.1f} | {setup:.1f} |"
    )
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, nargs=2, default=(12, 4), metavar=("N_3MM", "N_1MM"))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    import nilearn.datasets  # noqa: F401  (import cost paid once per process)

    print(f"<!-- nilearn import {time.perf_counter() - t0:.1f} s, {os.cpu_count()} CPUs -->")
    print("| benchmark | grid | cases | s/case | CPU s/case | cases/s | MB/case | template setup s (once) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for voxel_size, n in ((3.0, args.cases[0]), (1.0, args.cases[1])):
            print(bench(voxel_size, n, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
