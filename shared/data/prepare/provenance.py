"""The provenance of a prepared case: pipeline version, settings, atlas, input series UIDs, transforms.

Written beside the case folder as `<case>.provenance.json` (the data check ignores JSON files at the
data root, and a case folder then holds only its BraTS files). It names series by UID, number and
description, never the patient: no name, identifier, birth date or source path is ever read.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from fedbrats.shared.atomic import atomic_write_text
from fedbrats.shared.constants import LAYOUTS, MODALITIES
from fedbrats.shared.data.prepare.atlas import Atlas
from fedbrats.shared.data.prepare.geometry import array_of
from fedbrats.shared.data.prepare.pipeline import PIPELINE_VERSION, REFERENCE, PreparedCase, PrepareSettings
from fedbrats.shared.data.prepare.rules import SeriesRules

SUFFIX = ".provenance.json"


def provenance_path(out: Path, case_id: str) -> Path:
    return Path(out) / f"{case_id}{SUFFIX}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def run_key(atlas: Atlas, rules: SeriesRules, settings: PrepareSettings) -> dict:
    """What decides the output besides the input: equal keys and equal inputs give equal cases."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "atlas": {
            "name": atlas.name,
            "sha256": atlas.digest,
            "shape": list(atlas.shape),
            "voxel_size_mm": list(atlas.voxel_size),
        },  # fmt: skip
        "settings": settings.to_dict(),
        "rules": rules.to_dict(),
    }


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _input(series, geometry: dict) -> dict:
    entry = {"kind": series.kind, "series_uid": series.uid}
    if series.kind == "dicom":
        entry |= {
            "study_uid": series.study_uid,
            "series_number": series.fields.get("SeriesNumber", ""),
            "series_description": series.fields.get("SeriesDescription", ""),
            "files": len(series.files),
        }
    return entry | geometry


def provenance(case: PreparedCase, atlas: Atlas, rules: SeriesRules, settings: PrepareSettings) -> dict:
    key = run_key(atlas, rules, settings)
    transforms = {
        f"{REFERENCE}_to_atlas" if m == REFERENCE else f"{m}_to_{REFERENCE}": case.registrations[m].to_dict()
        for m in MODALITIES
    }
    return {
        "pipeline": "fedbrats data prepare",
        **key,
        "key_sha256": _key_digest(key),
        "case_id": case.case_id,
        "layout": settings.layout,
        "inputs": {m: _input(case.inputs[m], case.input_geometry[m]) for m in MODALITIES},
        "transforms": transforms,
        "transform_convention": "each maps points of the fixed space (the atlas, or the T1ce) to the moving "
        "series' scanner space, in DICOM LPS millimetres",
        "outputs": case.files,
        "brain_voxels": int(_count(case.output_mask)),
        "seconds": round(case.seconds, 2),
        "software": {
            "fedbrats": _version("fedbrats"),
            "SimpleITK": _version("SimpleITK"),
            "pydicom": _version("pydicom"),
            "nibabel": _version("nibabel"),
            "nilearn": _version("nilearn"),
            "python": platform.python_version(),
        },  # fmt: skip
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _count(mask) -> int:
    return int(array_of(mask).astype(bool).sum())


def write_provenance(out: Path, record: dict) -> Path:
    return atomic_write_text(provenance_path(out, record["case_id"]), json.dumps(record, indent=2) + "\n")


def already_prepared(out: Path, case_id: str, key: dict, layout: str) -> bool:
    """True when `out` holds this case made by the same pipeline version, settings, rules and atlas."""
    path = provenance_path(out, case_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if record.get("key_sha256") != _key_digest(key):
        return False
    names = [LAYOUTS[layout].filename(case_id, m) for m in MODALITIES]
    return all((Path(out) / case_id / n).is_file() for n in names)
