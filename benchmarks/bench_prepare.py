"""`data prepare` speed and accuracy: seconds per case, registration error and brain Dice on phantom DICOM.

Each case is a phantom case written as four DICOM series (`tests/dicom_fixtures.py`: a skull-like shell,
the head moved by a random rigid transform of up to 12 deg / 15 mm, a little motion between series,
oblique slices, T2 with thicker slices), then prepared by `prepare_case` (matching, reading, four
registrations, skull stripping, writing). Only `prepare_case` is timed; wall and CPU seconds are shown
because a shared machine inflates the wall clock.

- atlas "phantom": the untransformed phantom case, so the truth is known: registration error is the mean
  (and max) displacement of the brain voxels between the recovered and the true transform, per modality
  (worst modality shown); Dice compares the carried brain mask with the true brain in the scanner grid.
- atlas "mni": the default atlas (nilearn's MNI152). The phantom is MNI deformed (up to 6 % scale, 5 deg,
  elastic), so only the brain Dice in the scanner grid is meaningful: how well the atlas mask fits a brain
  that is not the atlas (rigid vs affine mask fit).

    python benchmarks/bench_prepare.py [--voxel-size 1] [--cases 2] [--atlas phantom mni] [--mask-fit rigid affine]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from fedbrats.shared.constants import MODALITIES  # noqa: E402
from fedbrats.shared.data.prepare import PrepareSettings, mni152_atlas, prepare_case  # noqa: E402
from fedbrats.shared.data.prepare.geometry import array_of  # noqa: E402
from fedbrats.shared.data.prepare.register import displacement_mm  # noqa: E402
from tests.dicom_fixtures import brain_of, dice, phantom_atlas, phantom_case, write_patient  # noqa: E402


def bench_case(case, atlas, atlas_name: str, mask_fit: str, seed: int, workdir: Path) -> dict:
    scan = write_patient(workdir / f"source_{seed}" / "P", case, seed=seed)
    out = workdir / f"out_{atlas_name}_{mask_fit}_{seed}"
    t0, c0 = time.perf_counter(), time.process_time()
    prepared = prepare_case(scan.folder, out, "P", atlas, settings=PrepareSettings(mask_fit=mask_fit))
    row = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    row["native_dice"] = dice(array_of(prepared.native_mask), array_of(scan.native_brain))
    if atlas_name == "phantom":
        errors = {
            m: displacement_mm(atlas.mask, prepared.to_atlas[m], scan.to_scanner[m]) for m in MODALITIES
        }
        row["error_mean"] = max(float(e.mean()) for e in errors.values())
        row["error_max"] = max(float(e.max()) for e in errors.values())
        landed = sitk.Resample(
            scan.native_brain, atlas.image, prepared.to_atlas["t1ce"], sitk.sitkNearestNeighbor, 0
        )
        row["output_dice"] = dice(array_of(landed), brain_of(case))
    shutil.rmtree(out)
    shutil.rmtree(scan.folder.parent)
    return row


def _mean(rows: list[dict], key: str, digits: int = 2) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--voxel-size", type=float, default=1.0, help="phantom and atlas voxel size (mm)")
    parser.add_argument("--cases", type=int, default=2, help="cases (random head poses) per row")
    parser.add_argument("--atlas", nargs="+", choices=["phantom", "mni"], default=["phantom", "mni"])
    parser.add_argument("--mask-fit", nargs="+", choices=["rigid", "affine"], default=["rigid"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    case = phantom_case(args.voxel_size)
    setup = time.perf_counter() - t0
    print(f"<!-- phantom case at {args.voxel_size:g} mm in {setup:.1f} s (template load included); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} -->")  # fmt: skip
    print(
        "| atlas | mask fit | grid | cases | s/case (wall) | CPU s/case | reg. error mean / max (mm) "
        "| brain Dice, scanner grid | brain Dice, output grid |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in args.atlas:
            atlas = phantom_atlas(case) if name == "phantom" else mni152_atlas(args.voxel_size)
            for fit in args.mask_fit:
                rows = [
                    bench_case(case, atlas, name, fit, seed, Path(tmp)) for seed in range(1, args.cases + 1)
                ]
                error = (
                    f"{_mean(rows, 'error_mean')} / {_mean(rows, 'error_max')}" if name == "phantom" else "-"
                )
                grid = "x".join(map(str, atlas.shape))
                print(f"| {name} | {fit} | {grid} | {len(rows)} | {_mean(rows, 'seconds')} | {_mean(rows, 'cpu')} "
                      f"| {error} | {_mean(rows, 'native_dice', 3)} | {_mean(rows, 'output_dice', 3)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
