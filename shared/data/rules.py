"""The rules a case's volumes must follow: 3D, finite, not constant, one voxel grid, readable.

Pure functions of shapes, affines and arrays; `volumes` applies them while it reads each file once.
"""

from __future__ import annotations

import numpy as np

from fedbrats.shared.data.problems import AFFINE_TOLERANCE, CaseProblem


def image_problems(
    case_id: str, file: str, shape: tuple[int, ...], data: np.ndarray | None
) -> list[CaseProblem]:
    """Dimensionality, finiteness and contrast of one modality (`data=None`: shape only)."""
    dims = len(shape)
    if dims and min(shape) < 1:
        return [CaseProblem(case_id, file, f"image of shape {shape} holds no voxels; expected a 3D volume")]
    if dims < 3 or (dims == 3 and min(shape) == 1):
        return [
            CaseProblem(case_id, file, f"2D image of shape {shape}; expected a 3D volume (e.g. 240x240x155)")
        ]
    if dims > 3 and any(s != 1 for s in shape[3:]):
        return [
            CaseProblem(
                case_id, file, f"{dims}D image of shape {shape}; expected a 3D volume, one file per modality"
            )
        ]
    if data is None:
        return []
    lo, hi = float(data.min()), float(data.max())  # NaN/Inf propagate, so two passes cover finiteness too
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        return [CaseProblem(case_id, file, f"{bad} non-finite voxels (NaN/Inf); expected finite intensities")]
    if lo == hi == 0.0:
        return [
            CaseProblem(
                case_id, file, "every voxel is zero (empty image); expected a brain with non-zero intensities"
            )
        ]
    if lo == hi:
        return [
            CaseProblem(
                case_id, file, f"every voxel equals {lo:g} (constant image); expected varying intensities"
            )
        ]
    return []


def grid_problems(
    case_id: str,
    file: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    ref_file: str,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
) -> list[CaseProblem]:
    """Every modality and the seg must share one voxel grid (shape and affine) with the first modality."""
    if shape[:3] != ref_shape[:3]:
        return [
            CaseProblem(
                case_id,
                file,
                f"shape {shape[:3]} differs from {ref_file} {ref_shape[:3]}; "
                "expected all modalities and seg on one co-registered grid",
            )
        ]
    diff = float(np.abs(np.asarray(affine) - np.asarray(ref_affine)).max())
    if not diff <= AFFINE_TOLERANCE:
        return [
            CaseProblem(
                case_id,
                file,
                f"affine differs from {ref_file} by up to {diff:.4g} (tolerance "
                f"{AFFINE_TOLERANCE:g}); expected co-registered volumes with one affine",
            )
        ]
    return []


def unreadable_problem(case_id: str, file: str, error: BaseException) -> CaseProblem:
    """A file nibabel or gzip could not read (not a NIfTI, truncated download, bad gzip stream)."""
    detail = str(error).strip() or "no detail"
    return CaseProblem(
        case_id,
        file,
        f"cannot read ({type(error).__name__}: {detail}); expected a complete "
        "NIfTI file (.nii.gz): re-copy or re-download it",
    )
