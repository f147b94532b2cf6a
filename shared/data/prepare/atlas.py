"""The atlas every case is registered to: a T1 image, its brain mask and the output grid.

The default is the MNI152 2009 template nilearn ships inside its package (nothing is downloaded),
placed on the BraTS field of view (240x240x155 at 1 mm, the phantom's grid) with nilearn's own
brain-mask rule. Any other atlas (a site's own template, or the untransformed phantom in the tests)
is an image plus a mask on one grid; its grid is then the output grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedbrats.shared.data.prepare.geometry import array_of, image_from_array

#: nilearn's brain-mask rule for its MNI152 template (`load_mni152_brain_mask`): T1 above this.
MNI_MASK_THRESHOLD = 0.2


@dataclass(frozen=True)
class Atlas:
    """T1 image (float32) and brain mask (uint8) on one grid, which is also the grid cases are written on."""

    name: str
    image: sitk.Image
    mask: sitk.Image
    digest: str  # sha256 of the image and mask voxels and grid: the provenance says which atlas exactly

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.image.GetSpacing())

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.GetSize())


def _digest(image: sitk.Image, mask: sitk.Image) -> str:
    h = hashlib.sha256()
    for img in (image, mask):
        h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(img)).tobytes())
        h.update(repr((img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())).encode())
    return h.hexdigest()


def atlas_from_images(name: str, image: sitk.Image, mask: sitk.Image) -> Atlas:
    """An atlas from two SimpleITK images; the mask must lie on the image's grid and hold a brain."""
    same = (
        image.GetSize() == mask.GetSize()
        and np.allclose(image.GetSpacing(), mask.GetSpacing(), atol=1e-4)
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-3)
        and np.allclose(image.GetDirection(), mask.GetDirection(), atol=1e-4)
    )
    if not same:
        raise ValueError(
            f"atlas {name}: the brain mask's grid (size {mask.GetSize()}, spacing {mask.GetSpacing()}) differs "
            f"from the image's (size {image.GetSize()}, spacing {image.GetSpacing()}); expected one grid"
        )
    if image.GetDimension() != 3:
        raise ValueError(f"atlas {name}: a {image.GetDimension()}D image; expected a 3D T1 volume")
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    if not array_of(binary).any():
        raise ValueError(f"atlas {name}: the brain mask is empty; expected non-zero voxels inside the brain")
    image = sitk.Cast(image, sitk.sitkFloat32)
    return Atlas(name, image, binary, _digest(image, binary))


def atlas_from_arrays(name: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> Atlas:
    """An atlas from nibabel-ordered arrays and their RAS affine (how the tests pass the phantom)."""
    return atlas_from_images(
        name,
        image_from_array(np.asarray(image, np.float32), affine),
        image_from_array(mask.astype(np.uint8), affine),
    )


def atlas_from_files(image_path: Path, mask_path: Path) -> Atlas:
    """A site's own atlas: a T1 NIfTI and its brain mask NIfTI on the same grid."""
    images = []
    for path in (Path(image_path), Path(mask_path)):
        if not path.is_file():
            raise FileNotFoundError(
                f"atlas file {path} does not exist; expected a NIfTI file (.nii or .nii.gz)"
            )
        try:
            images.append(sitk.ReadImage(str(path)))
        except RuntimeError as error:
            raise ValueError(
                f"atlas file {path}: cannot read ({' '.join(str(error).split())[:200]})"
            ) from None
    return atlas_from_images(Path(image_path).name, *images)


@lru_cache(maxsize=2)
def mni152_atlas(voxel_size: float = 1.0) -> Atlas:
    """nilearn's MNI152 2009 T1 and brain mask on the BraTS field of view at `voxel_size` mm (1 mm: 240x240x155)."""
    import nilearn
    from nilearn import datasets

    from fedbrats.shared.data.phantom.anatomy import make_grid

    template = datasets.load_mni152_template(resolution=1)
    t1 = image_from_array(np.asarray(template.dataobj, dtype=np.float32), np.asarray(template.affine, float))
    grid = make_grid(float(voxel_size))
    reference = image_from_array(np.zeros(grid.shape, np.uint8), grid.affine)
    source_mask = sitk.Cast(t1 > MNI_MASK_THRESHOLD, sitk.sitkFloat32)
    if voxel_size > 1.0:  # partial volume of the larger voxel, as the phantom does
        sigma = 0.5 * float(voxel_size)
        t1 = sitk.SmoothingRecursiveGaussian(t1, sigma)
        source_mask = sitk.SmoothingRecursiveGaussian(source_mask, sigma)
    image = sitk.Resample(t1, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = (
        sitk.Resample(source_mask, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) >= 0.5
    )
    return atlas_from_images(f"MNI152 2009 (nilearn {nilearn.__version__}) at {voxel_size:g} mm", image, mask)
