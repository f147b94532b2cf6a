"""What one patient folder holds: its DICOM series (headers only) or its NIfTI files, and which is which.

DICOM files are found anywhere below the folder, whatever their names (scanners export `IM0001`,
`1.3.12.2...dcm`, nested per study and series), and grouped by SeriesInstanceUID. Only header
fields are read here (pydicom, no pixels), and only the few the matching and the geometry need:
never the patient's name or identifiers, so they cannot leak into a log or the provenance.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.data.prepare.rules import SeriesRules, modalities_of

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: The header fields read from each DICOM file (the patient module is deliberately absent).
TAGS = (
    "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "ProtocolName", "SequenceName", "ImageType", "Rows", "Columns", "NumberOfFrames",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
)  # fmt: skip
#: Cosines of two slices of one volume may differ by this much (rounding in the header).
ORIENTATION_TOLERANCE = 1e-3
#: Slice gaps may differ from the median by this fraction before the series counts as gapped.
GAP_TOLERANCE = 0.1


class PrepareError(ValueError):
    """A case cannot be prepared; the message names the file or series and what was expected."""


@dataclass(frozen=True)
class Series:
    """One candidate input: a DICOM series (files sorted along the slice normal) or one NIfTI file."""

    uid: str  # SeriesInstanceUID, or "sha256:<hex>" of a NIfTI file
    kind: str  # "dicom" or "nifti"
    fields: dict[str, str]  # header text the rules look at (a NIfTI file's name as its SeriesDescription)
    files: tuple[Path, ...]
    n_slices: int
    voxels: int
    problem: str = ""  # why this series is not one 3D volume ("" when it is)
    study_uid: str = ""

    @property
    def label(self) -> str:
        """How messages name it: number and description, never a patient field."""
        if self.kind == "nifti":
            return f"NIfTI file {self.files[0].name}"
        number = self.fields.get("SeriesNumber", "?")
        return f"series {number} '{self.fields.get('SeriesDescription', '')}' ({len(self.files)} files)"


def _files_below(folder: Path) -> list[Path]:
    """Every file below `folder`, hidden files and folders (.DS_Store, .git) left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(q.startswith(".") for q in p.relative_to(folder).parts)
    )


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _text(ds, name: str) -> str:
    value = ds.get(name)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _slice_order(headers: list) -> tuple[list[int], str]:
    """Indices of the slices sorted along their normal, and why they are not one volume ("" if they are)."""
    try:
        cosines = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        return list(range(len(headers))), "slices without ImageOrientationPatient/ImagePositionPatient"
    if np.abs(cosines - cosines[0]).max() > ORIENTATION_TOLERANCE:
        return list(
            range(len(headers))
        ), "slices of several orientations (a localizer or a multi-plane series)"
    if len({(int(h.Rows), int(h.Columns)) for h in headers}) > 1:
        return list(range(len(headers))), "slices of several sizes"
    normal = np.cross(cosines[0, :3], cosines[0, 3:])
    depth = positions @ normal
    order = list(np.argsort(depth, kind="stable"))
    if len(order) > 1:
        step = positions[order[-1]] - positions[order[0]]
        sideways = float(np.linalg.norm(step - normal * (step @ normal)))
        if sideways > 0.1 + 0.01 * abs(float(step @ normal)):
            return order, f"slices shifted {sideways:.1f} mm sideways along the stack (gantry tilt?)"
        gaps = np.diff(depth[order])
        if gaps.min() < 1e-3:
            repeated = int((gaps < 1e-3).sum())
            return (
                order,
                f"{repeated} slice position(s) repeated (several echoes, phases or repeats in one series)",
            )
        median = float(np.median(gaps))
        if np.abs(gaps - median).max() > GAP_TOLERANCE * median:
            return order, (
                f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm, median {median:.2f}): "
                "missing slices or a gapped acquisition"
            )
    return order, ""


def _dicom_series(files: list[Path]) -> tuple[list[Series], int]:
    """DICOM image series among `files` (headers only), and how many files were not DICOM images."""
    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    skipped = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAGS))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
            skipped += 1
            continue
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:  # DICOMDIR, reports, presentation states
            skipped += 1
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    found = []
    for uid, members in groups.items():
        headers = [ds for _, ds in members]
        first = headers[0]
        fields = {name: _text(first, name) for name in ("SeriesDescription", "ProtocolName", "SequenceName",
                                                        "SeriesNumber", "ImageType")}  # fmt: skip
        frames = int(first.get("NumberOfFrames", 1) or 1)
        if len(members) == 1 and frames > 1:  # one enhanced multi-frame file holds the whole volume
            order, problem, n_slices = [0], "", frames
        else:
            order, problem = _slice_order(headers)
            n_slices = len(members)
        voxels = int(first.Rows) * int(first.Columns) * n_slices
        found.append(
            Series(
                uid,
                "dicom",
                fields,
                tuple(members[i][0] for i in order),
                n_slices,
                voxels,
                problem,
                _text(first, "StudyInstanceUID"),
            )  # fmt: skip
        )
    found.sort(key=lambda s: (_number(s.fields.get("SeriesNumber", "")), s.uid))
    return found, skipped


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _nifti_series(files: list[Path]) -> list[Series]:
    found = []
    for path in files:
        stem = path.name[: -len(next(s for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)))]
        found.append(Series(f"sha256:{_sha256(path)}", "nifti", {"SeriesDescription": stem, "ProtocolName": ""},
                            (path,), 0, 0))  # fmt: skip
    return found


def find_series(folder: Path) -> list[Series]:
    """Every candidate input in a patient folder: its NIfTI files if it has any, else its DICOM series."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepareError(f"{folder} is not a folder; expected one folder per patient")
    files = _files_below(folder)
    niftis = [p for p in files if is_nifti(p)]
    if niftis:
        return _nifti_series(niftis)
    series, skipped = _dicom_series(files)
    if not series:
        raise PrepareError(
            f"{folder.name}: no DICOM image series and no NIfTI file among {len(files)} file(s) "
            f"({skipped} not DICOM images); expected four series (T1, T1ce, T2, FLAIR) or four .nii.gz files"
        )
    return series


def match_series(series: list[Series], rules: SeriesRules, case: str = "") -> dict[str, Series]:
    """The one series of each modality, in MODALITIES order; PrepareError naming every candidate otherwise."""
    where = f"{case}: " if case else ""
    candidates: dict[str, list[Series]] = {m: [] for m in MODALITIES}
    for s in series:
        if s.kind == "dicom" and (s.problem or s.n_slices < rules.min_slices):
            continue
        for m in modalities_of(s.fields, rules):
            candidates[m].append(s)
    for s in series:
        shared = [m for m in MODALITIES if s in candidates[m]]
        if len(shared) > 1:
            raise PrepareError(
                f"{where}{s.label} matches several modalities {shared}; {_hint(series, rules)}"
            )
    chosen: dict[str, Series] = {}
    for m in MODALITIES:
        found = candidates[m]
        if len(found) > 1 and rules.choose == "most-voxels":
            found = [max(found, key=lambda s: (s.voxels, -_number(s.fields.get("SeriesNumber", ""))))]
        if len(found) > 1:
            names = ", ".join(s.label for s in found)
            raise PrepareError(
                f"{where}{len(found)} series match {m}: {names}; expected exactly one "
                f'(exclude the others in a rules file, or set choose = "most-voxels"); {_hint(series, rules)}'
            )
        if not found:
            raise PrepareError(f"{where}no series matches {m}; {_hint(series, rules)}")
        chosen[m] = found[0]
    return chosen


def fate(series: Series, rules: SeriesRules) -> str:
    """What the rules make of one input: the modality it matches, or why it is not used."""
    if series.kind == "dicom" and series.problem:
        return f"not a volume: {series.problem}"
    if series.kind == "dicom" and series.n_slices < rules.min_slices:
        return f"{series.n_slices} slices < min_slices {rules.min_slices}"
    return ",".join(modalities_of(series.fields, rules)) or "no rule matches"


def _hint(series: list[Series], rules: SeriesRules) -> str:
    """The inputs seen and their fate, so the user can write the rule that fixes the match."""
    seen = "; ".join(f"{s.label} -> {fate(s, rules)}" for s in series)
    return f"inputs found: {seen} (rules compare {'/'.join(rules.fields)})"
