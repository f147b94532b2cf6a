"""Brain extraction that works offline: the atlas's brain mask, carried through the registration.

No model and no download: the mask drawn on the atlas is moved onto the patient by the transform the
registration found (rigid by default; "affine" also fits the brain's size, for the mask only, the
images stay rigidly aligned). In the output grid, which is the atlas grid, the rigid mask is the atlas
mask itself; in the patient's own T1ce grid it tells where the brain is for the other registrations.
"""

from __future__ import annotations

import SimpleITK as sitk

from fedbrats.shared.data.prepare.atlas import Atlas
from fedbrats.shared.data.prepare.register import compose

MASK_FITS = ("rigid", "affine")


def carry_mask(mask: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """`mask` on `reference`'s grid; `transform` maps reference points to mask points (linear, then >= 0.5)."""
    soft = sitk.Resample(
        sitk.Cast(mask, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    return sitk.Cast(soft >= 0.5, sitk.sitkUInt8)


def native_brain_mask(atlas: Atlas, t1ce: sitk.Image, atlas_to_t1ce: sitk.Transform) -> sitk.Image:
    """The brain in the patient's T1ce grid (`atlas_to_t1ce` maps atlas points to T1ce points)."""
    return carry_mask(atlas.mask, t1ce, atlas_to_t1ce.GetInverse())


def output_brain_mask(atlas: Atlas, rigid: sitk.Transform, fit: sitk.Transform | None) -> sitk.Image:
    """The brain in the output (atlas) grid: the atlas mask, or with an affine `fit` that mask resized.

    Output point x shows patient point rigid(x); it is brain where fit^-1(rigid(x)) is atlas brain.
    """
    if fit is None:
        return atlas.mask
    return carry_mask(atlas.mask, atlas.image, compose(rigid, fit.GetInverse()))


def strip(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """`image` with every voxel outside `mask` set to 0 (BraTS volumes are skull-stripped)."""
    return sitk.Mask(image, sitk.Cast(mask, sitk.sitkUInt8), outsideValue=0)
