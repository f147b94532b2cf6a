"""Case loading throughput: `data check`, raw load, and PatientDataset items/s without cache, in RAM, on disk.

Synthetic cases at phantom size (80x80x52, ~3 mm) and BraTS size (240x240x155, 1 mm), written as int16
.nii.gz like BraTS. Prints a Markdown table.

    python benchmarks/bench_loading.py [--cases 4 3] [--items 24] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fedbrats.shared.constants import BRATS2021, MODALITIES
from fedbrats.shared.data.cases import discover_cases
from fedbrats.shared.data.check import check_root
from fedbrats.shared.data.dataset import PatientDataset
from fedbrats.shared.data.transforms import preprocess
from fedbrats.shared.data.volumes import load_case

SIZES = {"3mm": ((80, 80, 52), 3.0, (64, 64, 48)), "1mm": ((240, 240, 155), 1.0, (128, 128, 128))}


def write_synthetic(root: Path, n: int, shape: tuple[int, int, int], spacing: float, seed: int = 0) -> None:
    """n cases: ellipsoid brain inside a zero border, a tumor with labels 1/2/4, noisy int16 modalities."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 / 1.3 + axes[2][None, None, :] ** 2
    brain = r2 < 0.7
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    for i in range(n):
        case_id = f"BraTS2021_{i:05d}"
        folder = root / case_id
        folder.mkdir(parents=True, exist_ok=True)
        c = rng.uniform(-0.3, 0.3, 3).astype(np.float32)
        t2 = (
            (axes[0][:, None, None] - c[0]) ** 2
            + (axes[1][None, :, None] - c[1]) ** 2
            + (axes[2][None, None, :] - c[2]) ** 2
        )
        seg = np.zeros(shape, np.uint8)
        seg[(t2 < 0.06) & brain] = 2
        seg[t2 < 0.025] = 4
        seg[t2 < 0.01] = 1
        for k, m in enumerate(MODALITIES):
            vol = (200 + 80 * k + rng.normal(0, 25, shape).astype(np.float32)) + (seg > 0) * 120.0
            img = nib.Nifti1Image(np.where(brain, vol, 0).astype(np.int16), affine)
            img.header.set_zooms((spacing,) * 3)
            nib.save(img, folder / BRATS2021.filename(case_id, m))
        nib.save(nib.Nifti1Image(seg, affine), folder / BRATS2021.filename(case_id, "seg"))


class Timer:
    """Wall and CPU time of a block: on a shared machine CPU time per operation is the stable figure."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def row(label: str, what: str, n: int, timer: Timer, unit: str, init: str = "-") -> tuple[str, ...]:
    return (label, what, init, f"{n / timer.wall:.2f} {unit}", f"{timer.cpu / n * 1e3:.0f}")


def bench_size(label: str, n_cases: int, items: int, workdir: Path) -> list[tuple[str, ...]]:
    shape, spacing, patch = SIZES[label]
    root = workdir / label
    write_synthetic(root, n_cases, shape, spacing)
    cases, _ = discover_cases(root)
    rows = []

    with Timer() as t:
        report = check_root(root)
    assert not report.unusable_ids, report.problems
    rows.append(row(label, "data check (1 process)", n_cases, t, "cases/s"))

    with Timer() as t:
        for case in cases:
            preprocess(load_case(case))
    rows.append(row(label, "load_case + preprocess", n_cases, t, "cases/s"))

    cache_dir = workdir / f"{label}-cache"
    for name, cache in (
        ("no cache", None),
        ("memory cache", "memory"),
        ("disk cache (cold)", "disk"),
        ("disk cache (warm)", "disk"),
    ):
        with Timer() as init:
            ds = PatientDataset(cases, patch, cache=cache, cache_dir=cache_dir, progress=False)
        n = items if cache else max(n_cases, items // 4)  # uncached items are slow: fewer of them
        with Timer() as t:
            for i in range(n):
                ds[i % len(ds)]
        rows.append(row(label, f"PatientDataset[i], {name}", n, t, "items/s", f"{init.wall:.2f}"))
    with Timer() as t:
        for i in range(len(ds)):
            ds.volume(i)
    rows.append(row(label, "PatientDataset.volume(i), disk cache", len(ds), t, "cases/s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs=2, type=int, default=(4, 3), metavar=("N_3MM", "N_1MM"))
    parser.add_argument("--items", type=int, default=24, help="patches drawn per cached dataset")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loading-"))
    try:
        rows = []
        for label, n in zip(SIZES, args.cases, strict=True):
            rows += bench_size(label, n, args.items, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    patches = ", ".join(f"{k}: patch {'x'.join(map(str, v[2]))}" for k, v in SIZES.items())
    print(f"\nCase loading throughput ({patches}; augmentation on; 1 process, 1 torch thread)\n")
    print("| size | what | init s (wall) | rate (wall) | CPU ms per case/item |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
