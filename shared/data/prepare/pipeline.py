"""One patient from scanner series to a BraTS case: match, read, register, skull-strip, write.

Every site runs the same steps with the same settings, and `PIPELINE_VERSION` changes whenever the
same input would give different files, so two sites' cases are comparable when their provenance
shows the same version and settings. The case folder appears complete or not at all: it is written
under a hidden name and renamed when every file is in place.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedbrats.shared.constants import LAYOUTS, MODALITIES
from fedbrats.shared.data.phantom.generate import nifti_bytes
from fedbrats.shared.data.prepare.atlas import Atlas
from fedbrats.shared.data.prepare.brain import MASK_FITS, native_brain_mask, output_brain_mask, strip
from fedbrats.shared.data.prepare.convert import Volume, read_volume
from fedbrats.shared.data.prepare.geometry import affine_of, array_of
from fedbrats.shared.data.prepare.register import (
    Registration,
    RegistrationSettings,
    affine_fit,
    compose,
    rigid_register,
)
from fedbrats.shared.data.prepare.rules import SeriesRules
from fedbrats.shared.data.prepare.series import PrepareError, Series, find_series, match_series

#: Bumped whenever the same input and settings would give different files.
PIPELINE_VERSION = "1.0"
#: The modality every other one is registered to, and that is registered to the atlas.
REFERENCE = "t1ce"
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class PrepareSettings:
    """Everything besides the atlas and the rules that decides the output; part of the provenance."""

    layout: str = "brats2021"
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    mask_fit: str = "affine"  # the atlas mask also fitted in size (images stay rigid); "rigid": not

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if self.mask_fit not in MASK_FITS:
            raise ValueError(f"mask_fit must be one of {list(MASK_FITS)}, got {self.mask_fit!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "registration": self.registration.to_dict(), "interpolation": "linear"}


@dataclass
class PreparedCase:
    """What `prepare_case` made: the folder, the inputs used, the transforms, the masks (for checks)."""

    case_id: str
    folder: Path
    inputs: dict[str, Series]
    registrations: dict[str, Registration]  # "t1ce": T1ce -> atlas; others: modality -> T1ce
    to_atlas: dict[str, sitk.Transform]  # per modality: output (atlas) point -> that series' scanner point
    native_mask: sitk.Image  # brain in the T1ce's own grid
    output_mask: sitk.Image  # brain in the output grid
    input_geometry: dict[str, dict]
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def _geometry(volume: Volume) -> dict:
    image = volume.image
    return {"size": list(image.GetSize()), "spacing_mm": [round(float(s), 6) for s in image.GetSpacing()]}


def _register_all(
    volumes: dict[str, Volume], atlas: Atlas, settings: PrepareSettings, stage: Callable[[str], None]
) -> tuple[dict[str, Registration], dict[str, sitk.Transform], sitk.Image, sitk.Image]:
    reg = settings.registration
    reference = volumes[REFERENCE].image
    stage(f"registering {REFERENCE} to the atlas")
    to_reference = rigid_register(atlas.image, reference, reg, fixed_mask=atlas.mask, initial="moments")
    fit = None
    if settings.mask_fit == "affine":
        stage("fitting the brain mask")
        fit = affine_fit(atlas.image, reference, reg, to_reference.transform, fixed_mask=atlas.mask)
    native = native_brain_mask(atlas, reference, fit if fit is not None else to_reference.transform)
    output = output_brain_mask(atlas, to_reference.transform, fit)
    registrations = {REFERENCE: to_reference}
    to_atlas: dict[str, sitk.Transform] = {REFERENCE: to_reference.transform}
    for modality in MODALITIES:
        if modality == REFERENCE:
            continue
        stage(f"registering {modality} to {REFERENCE}")
        found = rigid_register(reference, volumes[modality].image, reg, fixed_mask=native, initial="geometry")
        registrations[modality] = found
        to_atlas[modality] = compose(to_reference.transform, found.transform)
    return registrations, to_atlas, native, output


def _output_array(image: sitk.Image, integer: bool) -> np.ndarray:
    data = array_of(image)
    if integer and data.min() >= _INT16.min and data.max() <= _INT16.max:
        return np.round(data).astype(np.int16)
    return data.astype(np.float32)


def prepare_case(
    source: Path,
    out: Path,
    case_id: str,
    atlas: Atlas,
    rules: SeriesRules | None = None,
    settings: PrepareSettings | None = None,
    *,
    stage: Callable[[str], None] | None = None,
) -> PreparedCase:
    """Prepare the patient folder `source` as `out/<case_id>`; PrepareError (naming what is wrong) if it cannot."""
    rules = rules or SeriesRules()
    settings = settings or PrepareSettings()
    stage = stage or (lambda _text: None)
    start = time.perf_counter()
    layout = LAYOUTS[settings.layout]
    stage("reading headers")
    chosen = match_series(find_series(Path(source)), rules)  # errors name the series; callers name the case
    volumes = {}
    for modality in MODALITIES:
        stage(f"reading {modality}")
        volumes[modality] = read_volume(chosen[modality])
    registrations, to_atlas, native, output = _register_all(volumes, atlas, settings, stage)
    stage("writing")
    folder = Path(out) / case_id
    staging = Path(out) / f".prepare-{case_id}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    affine = affine_of(atlas.image)
    files = {}
    try:
        for modality in MODALITIES:
            volume = volumes[modality]
            moved = sitk.Resample(
                volume.image, atlas.image, to_atlas[modality], sitk.sitkLinear, 0.0, sitk.sitkFloat32
            )
            data = _output_array(strip(moved, output), volume.integer)
            if not data.any():
                raise PrepareError(
                    f"{chosen[modality].label} lands outside the atlas brain after registration "
                    "(all zero); expected a head image that overlaps the atlas (check the series and the atlas)"
                )
            name = layout.filename(case_id, modality)
            (staging / name).write_bytes(nifti_bytes(data, affine))
            files[modality] = name
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PreparedCase(
        case_id, folder, chosen, registrations, to_atlas, native, output,
        {m: _geometry(v) for m, v in volumes.items()}, time.perf_counter() - start, files,
    )  # fmt: skip
