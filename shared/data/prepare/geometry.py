"""Arrays with a NIfTI affine (RAS, nibabel) to SimpleITK images (LPS, DICOM's frame) and back.

SimpleITK works in DICOM's patient frame (x to the left, y to the back: LPS); NIfTI affines and
nibabel use RAS. One conversion, used by the atlas, the tests and the writer, so a sign flip
cannot creep in at one place only.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: RAS <-> LPS: flip the first two world axes (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_from_array(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of `data` (indexed [i, j, k], as nibabel gives it) on the grid of a RAS `affine`."""
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine {affine.tolist()} has a zero-length voxel axis; expected a 3D voxel grid")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return image


def array_of(image: sitk.Image) -> np.ndarray:
    """The voxels of `image` indexed [i, j, k] (nibabel's order; SimpleITK's own arrays are [k, j, i])."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def affine_of(image: sitk.Image) -> np.ndarray:
    """The RAS voxel-to-world affine of `image` (what a NIfTI writer stores as sform)."""
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    return RAS_TO_LPS @ lps


def voxel_points(mask: sitk.Image) -> np.ndarray:
    """Physical (LPS, mm) centres of the non-zero voxels of `mask`, shape (N, 3)."""
    idx = np.argwhere(array_of(mask) > 0).astype(float)
    lps = RAS_TO_LPS @ affine_of(mask)
    return idx @ lps[:3, :3].T + lps[:3, 3]
