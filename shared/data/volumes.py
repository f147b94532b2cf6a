"""Read a case from NIfTI into arrays, checking it on the way, and map BraTS labels to regions.

Geometry is kept as it is on disk (no reorientation to a canonical RAS frame): BraTS volumes are
already co-registered to one atlas grid, and keeping the affine and header unchanged lets a
prediction be written back voxel-for-voxel onto the input files' grid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrats.shared.constants import MODALITIES, LabelSet, Layout, label_sets_for
from fedbrats.shared.data.cases import Case
from fedbrats.shared.data.nifti import MAX_VOXELS, NiftiLimitError, open_nifti
from fedbrats.shared.data.problems import CaseError, CaseProblem
from fedbrats.shared.data.rules import grid_problems, image_problems, unreadable_problem
from fedbrats.shared.labels import describe, label_values, region_masks

log = logging.getLogger(__name__)


@dataclass
class CaseVolume:
    """A loaded case: image float32 [4,X,Y,Z] (MODALITIES order), regions uint8 [3,X,Y,Z] (REGIONS order).

    `label_set` is the one detected from the seg values; without a seg it is the layout's convention
    (the one predictions are written in).
    """

    case_id: str
    image: np.ndarray
    regions: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    label_set: LabelSet

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])


def detect_label_set(values: Iterable[int], layout: Layout, case_id: str, file: str) -> LabelSet:
    """The narrowest label set of `layout` containing every value found; CaseError naming them otherwise."""
    found = {int(v) for v in values}
    candidates = label_sets_for(layout)
    for label_set in candidates:
        if found <= label_set.labels:
            return label_set
    allowed = " or ".join(f"{s.name} {describe(s.labels)}" for s in candidates)
    outside = found - set().union(*(s.labels for s in candidates))
    raise CaseError(
        [
            CaseProblem(
                case_id,
                file,
                f"label values {describe(found)} include {describe(outside)} "
                f"outside the {layout.name} layout's sets; expected {allowed}",
            )
        ]
    )


def _seg_problems(case: Case, file: str, seg: np.ndarray) -> tuple[np.ndarray | None, LabelSet | None, list]:
    """Integer label map + detected set, or the problems that prevent them."""
    if seg.dtype.kind == "f":
        if not np.isfinite(seg).all():
            return (
                None,
                None,
                [
                    CaseProblem(
                        case.case_id, file, "non-finite label values (NaN/Inf); expected integer BraTS labels"
                    )
                ],
            )
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):
            odd = np.unique(seg[rounded != seg])[:5].tolist()
            return (
                None,
                None,
                [
                    CaseProblem(
                        case.case_id, file, f"non-integer label values {odd}; expected integer BraTS labels"
                    )
                ],
            )
        seg = rounded
    elif seg.dtype.kind not in "iub":
        return (
            None,
            None,
            [CaseProblem(case.case_id, file, f"label map of dtype {seg.dtype}; expected integers")],
        )
    try:
        label_set = detect_label_set(label_values(seg).tolist(), case.layout, case.case_id, file)
    except CaseError as error:
        return None, None, error.problems
    return seg.astype(np.uint8), label_set, []


def inspect_case(
    case: Case, *, with_labels: bool = True, keep: bool = True, max_voxels: int = MAX_VOXELS
) -> tuple[CaseVolume | None, list]:
    """Read and check every file of a case once; the volume is None if `keep` is False or a problem is fatal.

    Later files are still read after a fatal problem, so one pass reports everything wrong with a case.
    Files whose header already disqualifies them (2D/4D, other grid, over `max_voxels`) are not
    decompressed, and no file is decompressed past what its header accounts for (`nifti.open_nifti`).
    """
    problems: list[CaseProblem] = []
    names = [m for m in (*MODALITIES, "seg") if m in case.files and (m != "seg" or with_labels)]
    if with_labels and "seg" not in case.files:
        seg_name = case.layout.filename(case.case_id, "seg")
        problems.append(
            CaseProblem(
                case.case_id,
                seg_name,
                f"no segmentation: usable for prediction only; training and validation need {seg_name}",
                fatal=False,
            )
        )
    ref: tuple[str, tuple[int, ...], np.ndarray] | None = None
    header, spacing, image, seg, label_set = None, None, None, None, None
    for m in names:
        path = case.files[m]
        file = path.name
        try:
            with open_nifti(path, max_voxels=max_voxels) as nifti:
                shape, img = nifti.shape, nifti.image
                found = image_problems(case.case_id, file, shape, None)
                if not found and ref is not None:
                    found = grid_problems(case.case_id, file, shape, img.affine, *ref)
                if found:
                    problems.extend(found)
                    continue
                if ref is None:
                    ref = (file, shape, img.affine.copy())
                    header = img.header.copy()
                    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
                data = (nifti.read_labels() if m == "seg" else nifti.read_image()).reshape(shape[:3])
        except NiftiLimitError as error:
            problems.append(CaseProblem(case.case_id, file, str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - truncated gzip raises EOFError, zlib.error, OSError, ...
            problems.append(unreadable_problem(case.case_id, file, error))
            continue
        if m == "seg":
            seg, label_set, found = _seg_problems(case, file, data)
        else:
            found = image_problems(case.case_id, file, shape, data)
            if keep and not found:
                if image is None:
                    image = np.empty((len(MODALITIES), *shape[:3]), dtype=np.float32)
                image[MODALITIES.index(m)] = data
        problems.extend(found)
        del data
    if not keep or any(p.fatal for p in problems) or ref is None:
        return None, problems
    if label_set is None:
        label_set = label_sets_for(case.layout)[0]
    regions = region_masks(seg, label_set) if seg is not None else None  # values checked above
    volume = CaseVolume(case.case_id, image, regions, ref[2], header, spacing, label_set)
    return volume, problems


def load_case(case: Case, *, with_labels: bool = True, max_voxels: int = MAX_VOXELS) -> CaseVolume:
    """Load a case into arrays (input geometry kept, no reorientation); raises CaseError on any fatal problem.

    `with_labels=True` requires a seg file; pass False at prediction time. A volume over `max_voxels`
    voxels is refused from its header alone.
    """
    if with_labels and "seg" not in case.files:
        seg_name = case.layout.filename(case.case_id, "seg")
        raise CaseError(
            [
                CaseProblem(
                    case.case_id,
                    seg_name,
                    f"no segmentation; expected {seg_name} (pass with_labels=False to load images only)",
                )
            ]
        )
    volume, problems = inspect_case(case, with_labels=with_labels, keep=True, max_voxels=max_voxels)
    if volume is None:
        raise CaseError(problems)
    for p in problems:
        log.warning("%s", p)
    return volume


def read_grid(
    case_id: str, path: Path, *, max_voxels: int = MAX_VOXELS
) -> tuple[tuple[tuple[int, ...], np.ndarray] | None, list[CaseProblem]]:
    """(shape, affine) from one file's header without reading its voxels, or None and the problem why."""
    try:
        with open_nifti(path, max_voxels=max_voxels) as nifti:
            return (nifti.shape, nifti.image.affine.copy()), []
    except NiftiLimitError as error:
        return None, [CaseProblem(case_id, Path(path).name, str(error))]
    except Exception as error:  # noqa: BLE001 - any reader failure is a finding, never a crash
        return None, [unreadable_problem(case_id, Path(path).name, error)]
