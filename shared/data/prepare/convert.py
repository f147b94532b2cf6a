"""From a matched series to a 3D SimpleITK image in scanner coordinates (DICOM's LPS frame).

SimpleITK (GDCM) decodes the pixels, compressed transfer syntaxes included, and applies each file's
rescale slope and intercept; the slice order is ours (`series._slice_order`), so files need no
particular names. A volume is refused from its header when it is larger than the cap every other
reader uses (`nifti.MAX_VOXELS`), before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fedbrats.shared.data.nifti import MAX_VOXELS
from fedbrats.shared.data.prepare.series import PrepareError, Series


@dataclass(frozen=True)
class Volume:
    """One modality read from its series: a float32 image and whether its values were whole numbers."""

    image: sitk.Image
    integer: bool  # every voxel a whole number (as DICOM stores them): written back as int16


def _cap(series: Series, voxels: int, max_voxels: int) -> None:
    if voxels > max_voxels:
        raise PrepareError(
            f"{series.label}: {voxels:,} voxels, over the cap of {max_voxels:,} per volume; "
            "expected a brain MRI volume (a larger one needs a higher max_voxels)"
        )


def _read(series: Series, max_voxels: int) -> sitk.Image:
    paths = [str(p) for p in series.files]
    if series.kind == "nifti":
        info = sitk.ImageFileReader()
        info.SetFileName(paths[0])
        info.ReadImageInformation()
        size = info.GetSize()
        if len(size) == 4 and size[3] == 1:
            size = size[:3]
        if len(size) != 3:
            raise PrepareError(f"{series.label}: a {len(size)}D image of size {size}; expected one 3D volume")
        _cap(series, int(np.prod(size)), max_voxels)
        image = sitk.ReadImage(paths[0])
        return image[:, :, :, 0] if image.GetDimension() == 4 else image
    if series.problem:
        raise PrepareError(f"{series.label}: {series.problem}; expected one 3D volume")
    _cap(series, series.voxels, max_voxels)
    if len(paths) == 1:
        return sitk.ReadImage(paths[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(paths)
    return reader.Execute()


def read_volume(series: Series, *, max_voxels: int = MAX_VOXELS) -> Volume:
    """The series as a float32 3D image; PrepareError naming the series when it cannot be one."""
    try:
        image = _read(series, max_voxels)
    except PrepareError:
        raise
    except RuntimeError as error:  # SimpleITK/GDCM: undecodable pixels, truncated file, unknown syntax
        detail = " ".join(str(error).split())[-300:]
        raise PrepareError(
            f"{series.label}: cannot read the pixels ({detail}); expected readable images"
        ) from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise PrepareError(f"{series.label}: image of size {image.GetSize()}; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PrepareError(f"{series.label}: {image.GetNumberOfComponentsPerPixel()} values per voxel (colour?); "
                           "expected a greyscale MR volume")  # fmt: skip
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise PrepareError(f"{series.label}: non-finite voxels (NaN/Inf); expected finite intensities")
    if float(values.min()) == float(values.max()):
        raise PrepareError(
            f"{series.label}: every voxel equals {float(values.min()):g}; expected an MR image"
        )
    integer = bool(np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)))
    image = sitk.Cast(image, sitk.sitkFloat32)
    image.SetDirection(_orthonormal(image.GetDirection(), series))
    return Volume(image, integer)


def _orthonormal(direction: tuple[float, ...], series: Series) -> tuple[float, ...]:
    """The direction matrix, re-orthonormalised (headers store rounded cosines); refused if not a rotation."""
    matrix = np.asarray(direction, float).reshape(3, 3)
    u, s, vt = np.linalg.svd(matrix)
    if np.abs(s - 1).max() > 1e-2:
        raise PrepareError(
            f"{series.label}: slice axes are not orthogonal (singular values {np.round(s, 3).tolist()}); "
            "expected a rectilinear volume (no gantry tilt)"
        )
    return tuple(float(v) for v in (u @ vt).ravel())
