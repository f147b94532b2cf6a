"""Rigid registration with SimpleITK: every modality to the T1ce, the T1ce to the atlas.

Mattes mutual information (the modalities and the atlas differ in contrast), a coarse-to-fine
pyramid defined in millimetres (so a 1 mm and a 3 mm atlas are registered alike), and a fixed
random-sampling seed, so a site running the same version on the same input gets the same
transform. A returned transform maps points of the fixed image's space to the moving image's
space (ITK's convention): resampling the moving image with it puts that image on the fixed grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class RegistrationSettings:
    """What decides a registration's result; recorded in every case's provenance."""

    histogram_bins: int = 32
    samples: int = 30000  # fixed voxels (inside the dilated fixed mask) sampled per level, at most all
    pyramid_mm: tuple[float, ...] = (8.0, 4.0, 2.0)  # resolution of each level, coarse to fine
    iterations: int = 200  # per level
    learning_rate_mm: float = 2.0  # first step: how far a point may move (mm)
    min_step_mm: float = 0.01
    mask_margin_mm: float = 10.0  # the fixed brain mask is dilated by this before it limits sampling
    fit_margin_mm: float = 0.0  # the same, affine mask fit: with the skull in view the mask grows into it
    seed: int = 1  # of the sampling; SimpleITK would take 0 as "seed from the clock"

    def __post_init__(self) -> None:
        if self.seed == 0:
            raise ValueError("registration seed must not be 0 (SimpleITK reads 0 as 'seed from the clock')")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Registration:
    """A rigid transform (fixed -> moving points) and the final metric value (lower is better)."""

    transform: sitk.Euler3DTransform
    metric: float
    iterations: int
    stop: str

    def to_dict(self) -> dict:
        t = self.transform
        return {
            "rotation_deg": [float(np.degrees(a)) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ())],
            "translation_mm": [float(v) for v in t.GetTranslation()],
            "centre_mm": [float(v) for v in t.GetCenter()],
            "matrix": np.asarray(t.GetMatrix(), float).reshape(3, 3).round(8).tolist(),
            "metric": float(self.metric),
            "iterations": int(self.iterations),
        }


def _levels(image: sitk.Image, pyramid_mm: tuple[float, ...]) -> tuple[list[int], list[float]]:
    """Shrink factor and smoothing sigma (mm) per pyramid level; levels finer than the image collapse."""
    finest = float(min(image.GetSpacing()))
    shrink, sigma = [], []
    for target in pyramid_mm:
        factor = max(1, int(round(target / finest)))
        if shrink and factor >= shrink[-1]:
            continue  # not finer than the level before: it would only repeat it
        shrink.append(factor)
        sigma.append(0.5 * target if factor > 1 else 0.0)
    return shrink, sigma


def coarsened(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """`image` as float32, smoothed and resampled so that no axis is finer than `spacing_mm`.

    The finest pyramid level never looks closer than that, and gradients and smoothing on a 1 mm
    volume cost eight times those on 2 mm; the transform found is in millimetres, whatever the grid.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    spacing = np.asarray(image.GetSpacing(), float)
    if spacing.min() >= 0.75 * spacing_mm:
        return image
    target = np.maximum(spacing, spacing_mm)
    sigma = [float(np.sqrt(max(t**2 - s**2, 0.0)) / 2.355) for t, s in zip(target, spacing, strict=True)]
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma) if max(sigma) > 0 else image
    size = [max(2, int(np.ceil(n * s / t))) for n, s, t in zip(image.GetSize(), spacing, target, strict=True)]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ ((target - spacing) / 2)  # same field of view
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), tuple(target),
                         image.GetDirection(), 0.0, sitk.sitkFloat32)  # fmt: skip


def dilated(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """`mask` grown by `margin_mm` (rounded to whole voxels per axis)."""
    radius = [max(0, int(round(margin_mm / s))) for s in mask.GetSpacing()]
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    return sitk.BinaryDilate(binary, radius) if any(radius) else binary


def rigid_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    settings: RegistrationSettings,
    *,
    fixed_mask: sitk.Image | None = None,
    initial: str = "geometry",
) -> Registration:
    """Rigid transform taking `fixed` points to `moving` points that best aligns the two images.

    `initial`: "geometry" starts from the scanner's own coordinates (series of one session share them),
    "moments" from the centres of mass (a case against an atlas: scanner and atlas frames are unrelated).
    """
    if initial == "moments":
        start = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
    elif initial == "geometry":
        start = sitk.Euler3DTransform()
        size = np.asarray(fixed.GetSize(), float)
        start.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))
    else:
        raise ValueError(f"initial must be 'geometry' or 'moments', got {initial!r}")
    method, result = _run(fixed, moving, settings, fixed_mask, start)
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))
    return Registration(
        transform,
        method.GetMetricValue(),
        method.GetOptimizerIteration(),
        method.GetOptimizerStopConditionDescription(),
    )


def affine_fit(
    fixed: sitk.Image,
    moving: sitk.Image,
    settings: RegistrationSettings,
    rigid: sitk.Euler3DTransform,
    *,
    fixed_mask: sitk.Image | None = None,
) -> sitk.AffineTransform:
    """An affine refinement of `rigid` (fixed -> moving) that also fits size and shear: for the brain mask."""
    start = sitk.AffineTransform(3)
    start.SetCenter(rigid.GetCenter())
    start.SetMatrix(rigid.GetMatrix())
    start.SetTranslation(rigid.GetTranslation())
    _, result = _run(
        fixed, moving, replace(settings, mask_margin_mm=settings.fit_margin_mm), fixed_mask, start
    )
    return sitk.AffineTransform(sitk.CompositeTransform(result).GetNthTransform(0))


def _run(fixed, moving, settings: RegistrationSettings, fixed_mask, start: sitk.Transform):
    """One multi-resolution Mattes-MI registration from `start`; returns the method and the transform found."""
    finest = settings.pyramid_mm[-1]
    fixed, moving = coarsened(fixed, finest), coarsened(moving, finest)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    shrink, sigma = _levels(fixed, settings.pyramid_mm)
    if fixed_mask is not None:
        region = sitk.Resample(
            fixed_mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
        )
        region = dilated(region, settings.mask_margin_mm)
        method.SetMetricFixedMask(region)
        voxels = float(sitk.GetArrayViewFromImage(region).sum())
    else:
        voxels = float(np.prod(fixed.GetSize()))
    # a count, not a share: the metric's noise depends on how many points it sees, whatever the grid
    shares = [min(1.0, settings.samples * f**3 / max(voxels, 1.0)) for f in shrink]
    method.SetMetricSamplingPercentagePerLevel(shares, settings.seed)
    # gradients at the sampled points only, not filtered over whole volumes the samples barely touch
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate_mm,
        minStep=settings.min_step_mm,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigma)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(start, inPlace=False)
    return method, method.Execute(fixed, moving)


def compose(first: sitk.Transform, then: sitk.Transform) -> sitk.Transform:
    """The transform applying `first`, then `then` (SimpleITK applies a composite's last-added first)."""
    return sitk.CompositeTransform([then, first])


def displacement_mm(mask: sitk.Image, a: sitk.Transform, b: sitk.Transform) -> np.ndarray:
    """Distance (mm) between where `a` and where `b` send each non-zero voxel centre of `mask`.

    With `a` the recovered and `b` the true transform, its mean over the brain is the registration error.
    """
    fields = []
    for transform in (a, b):
        field = sitk.TransformToDisplacementField(
            transform,
            sitk.sitkVectorFloat64,
            mask.GetSize(),
            mask.GetOrigin(),
            mask.GetSpacing(),
            mask.GetDirection(),
        )
        fields.append(sitk.GetArrayFromImage(field))  # [k, j, i, 3]: where each voxel centre moves
    inside = sitk.GetArrayViewFromImage(mask) > 0
    return np.linalg.norm(fields[0][inside] - fields[1][inside], axis=1)
