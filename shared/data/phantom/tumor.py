"""Tumor of one phantom case: drawn sizes, a seed in deep white matter, an irregular core, edema.

Built on a small box around the seed (not the whole volume), so a 1 mm case stays cheap. Shapes
are thresholded smooth noise around a rotated ellipsoid. Edema spreads from the core into white
matter and spares cortex and CSF, as vasogenic edema does. Internal label codes: 1 NCR/NET, 2 ED,
3 ET (the writer maps ET to 4 or 3 by layout).

Grade features overlap, as they do in real gliomas (grade is histological; imaging only suggests
it): most high-grade (HGG) tumours have a necrotic centre inside an enhancing rim, but
`1 - HGG_NECROSIS` (20 %) are solid, and only half of those enhance (patchily); `LGG_ENHANCING`
(20 %) of low-grade (LGG) tumours enhance patchily and `LGG_CYST` (15 %) have a fluid (cystic)
centre without a rim. Size and edema differ on average only (HGG edema is thicker, sizes alike).
So "ET present" alone separates the grades with an AUC of about 0.85 (0.5 + (0.9 - 0.2) / 2),
not 1. The best AUC the generator allows from its own ground-truth features (a logistic score on
ET present, fluid centre, their product, log radius and log edema: the log-likelihood ratio's
form, since the features are independent given the grade; fitted on 2000 drawn tumours and scored
on 2000 others) is about 0.95 (0.946 for seeds 0/100; 0.95-0.952 for others); a model that sees
images at 2-3 mm can only do worse. Checked by
tests/test_phantom.py::test_grade_features_overlap_as_in_real_gliomas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedbrats.shared.data.phantom.anatomy import Template, random_rotation

CORE, EDEMA, ENHANCING = 1, 2, 3

#: Share of high-grade tumours with a necrotic centre (inside an enhancing rim); the rest are solid.
HGG_NECROSIS = 0.8
#: Share of solid (non-necrotic) high-grade tumours with patchy enhancement; the rest do not enhance.
HGG_SOLID_ENHANCING = 0.5
#: Share of low-grade tumours with patchy enhancement.
LGG_ENHANCING = 0.2
#: Share of low-grade tumours with a cystic (fluid) centre and no enhancing rim.
LGG_CYST = 0.15
#: How a core enhances: an enhancing rim around necrosis, patches of the solid core, or not at all.
ENHANCEMENT_PATTERNS = ("rim", "patchy", "none")


@dataclass(frozen=True)
class GradeFeatures:
    """The imaging features a grade makes likely, drawn once per case (retries keep them)."""

    grade: str  # "HGG" or "LGG"
    fluid_centre: bool  # HGG: necrosis; LGG: a cyst. Rendered as fluid (dark T1, bright T2)
    enhancement: str  # one of ENHANCEMENT_PATTERNS; "rim" exactly when an HGG has necrosis

    @property
    def enhancing(self) -> bool:
        return self.enhancement != "none"


def draw_grade_features(rng: np.random.Generator, grade: str) -> GradeFeatures:
    """Necrosis/cyst and enhancement pattern of one tumour; the rates are the module constants."""
    if grade not in ("HGG", "LGG"):
        raise ValueError(f"grade must be 'HGG' or 'LGG', got {grade!r}")
    u_fluid, u_enh = rng.random(2)
    if grade == "HGG":
        necrotic = bool(u_fluid < HGG_NECROSIS)
        pattern = "rim" if necrotic else ("patchy" if u_enh < HGG_SOLID_ENHANCING else "none")
        return GradeFeatures(grade, necrotic, pattern)
    return GradeFeatures(grade, bool(u_fluid < LGG_CYST), "patchy" if u_enh < LGG_ENHANCING else "none")


@dataclass(frozen=True)
class TumorSpec:
    """Sizes and shape parameters of one tumor, in millimetres."""

    features: GradeFeatures
    axes_mm: tuple[float, float, float]  # core ellipsoid semi-axes
    rotation: np.ndarray  # 3x3
    edema_mm: float  # mean edema thickness beyond the core
    necrosis_fraction: float  # fluid-centre radius / core radius (necrosis or cyst); 0 without one
    irregularity: float  # amplitude of the noise added to the ellipsoid radius
    patch_fraction: float  # "patchy" enhancement: share of the solid core that enhances; else 0
    push_strength: float  # mass effect (fraction of radius the centre is expanded by)

    @property
    def grade(self) -> str:
        return self.features.grade

    @property
    def radius_mm(self) -> float:
        return float(np.prod(self.axes_mm) ** (1 / 3))


@dataclass(frozen=True)
class Tumor:
    """Labels on a sub-box of the work box, plus how strongly edema replaces normal tissue there."""

    region: tuple[slice, slice, slice]  # inside the work box
    labels: np.ndarray  # uint8: 0, CORE, EDEMA, ENHANCING
    edema_weight: np.ndarray  # float32 0..1
    texture: np.ndarray  # float32 smooth noise, unit std: intensity heterogeneity inside the tumor
    fluid: np.ndarray  # bool: CORE voxels that are necrosis or cyst (the rest of CORE is solid tumor)


def draw_tumor(
    rng: np.random.Generator, grade: str | GradeFeatures, spacing: float = 1.0
) -> TumorSpec:
    """Sizes like BraTS (medians: tumor core about 30 ml, whole tumor about 100 ml).

    `grade` is a drawn `GradeFeatures` (kept across retries) or a grade name (features drawn here).
    The enhancing rim is kept at least about one voxel thick so that coarse grids keep it.
    """
    features = grade if isinstance(grade, GradeFeatures) else draw_grade_features(rng, grade)
    hgg = features.grade == "HGG"
    radius = float(np.clip((18.5 if hgg else 19.0) * np.exp(0.3 * rng.standard_normal()), 9.0, 34.0))
    shape = np.exp(rng.normal(0.0, 0.18, 3))
    axes = radius * shape / np.prod(shape) ** (1 / 3)
    edema = float(np.clip((11.0 if hgg else 8.0) * np.exp(0.4 * rng.standard_normal()), 3.5, 28.0))
    fluid = float(rng.uniform(0.55, 0.85) if hgg else rng.uniform(0.35, 0.6))
    rim = max(2.5, 1.2 * spacing) / radius  # thinnest rim (or solid shell around a cyst) kept
    return TumorSpec(
        features=features,
        axes_mm=tuple(float(a) for a in axes),  # type: ignore[arg-type]
        rotation=random_rotation(rng, 180.0),
        edema_mm=edema,
        necrosis_fraction=min(fluid, 1.0 - rim) if features.fluid_centre else 0.0,
        irregularity=float(rng.uniform(0.15, 0.35)),
        patch_fraction=float(rng.uniform(0.08, 0.3)) if features.enhancement == "patchy" else 0.0,
        push_strength=float(rng.uniform(0.15, 0.45) if hgg else rng.uniform(0.05, 0.25)),
    )


def choose_seed(rng: np.random.Generator, template: Template, spec: TumorSpec) -> np.ndarray:
    """A deep white-matter point (template world mm) with room for the core."""
    need = min(0.7 * spec.radius_mm + 4.0, float(np.percentile(template.seeds_depth, 90)))
    candidates = np.flatnonzero(template.seeds_depth >= need)
    return template.seeds_world[candidates[rng.integers(len(candidates))]]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _keep_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Connected components of `mask` that overlap `seed`: no floating islands of tumor."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    keep = np.unique(lab[seed & mask])
    return np.isin(lab, keep[keep > 0])


def grow_tumor(
    rng: np.random.Generator, spec: TumorSpec, anatomy: np.ndarray, centre: np.ndarray, spacing: float
) -> Tumor | None:
    """Grow the tumor around `centre` (work-box voxel coordinates); None if a required label is empty."""
    half = (max(spec.axes_mm) * (1 + spec.irregularity) + 1.8 * spec.edema_mm) / spacing + 2
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, anatomy.shape[1:])
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    mask, gm, wm = (anatomy[(i, *region)] for i in range(3))
    shape = mask.shape
    brain = mask > 0.5
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    rel = [(g - (centre[d] - lo[d])).astype(np.float32) * spacing for d, g in enumerate(grids)]
    rot = spec.rotation.T  # coordinates in the ellipsoid's own frame
    radius2 = np.zeros(shape, np.float32)
    for k in range(3):
        q = rot[k, 0] * rel[0] + rot[k, 1] * rel[1] + rot[k, 2] * rel[2]
        radius2 += (q / spec.axes_mm[k]) ** 2
    radius = np.sqrt(radius2)

    sigma = max(0.3 * spec.radius_mm / spacing, 0.8)
    n_core, n_nec, n_edema, n_patch = (_smooth_noise(rng, shape, sigma) for _ in range(4))
    texture = _smooth_noise(rng, shape, max(2.5 / spacing, 0.5))
    centre_mask = np.zeros(shape, bool)
    centre_mask[tuple(np.clip(np.round(centre - lo).astype(int), 0, np.array(shape) - 1))] = True

    core = (radius + spec.irregularity * n_core < 1.0) & brain & (csf < 0.7)
    core = _keep_touching(core, centre_mask | (radius < 0.5))
    fluid = core & (radius + 0.7 * spec.irregularity * n_nec < spec.necrosis_fraction)
    solid = core & ~fluid
    pattern = spec.features.enhancement
    if pattern == "rim":
        enhancing = solid
    elif pattern == "patchy" and solid.any():
        # the top `patch_fraction` of smooth noise over the solid core: never empty, blob-shaped
        enhancing = solid & (n_patch >= np.quantile(n_patch[solid], 1.0 - spec.patch_fraction))
    else:
        enhancing = np.zeros(shape, bool)
    non_enhancing = core & ~enhancing

    distance = ndimage.distance_transform_edt(~core, sampling=spacing).astype(np.float32)
    reach = spec.edema_mm * (1.0 + 0.5 * n_edema)
    white = (wm + 0.3 * gm > 0.35) & (csf < 0.5)
    edema = (distance < reach) & ~core & brain & white
    edema = _keep_touching(edema | core, core) & ~core

    labels = np.zeros(shape, np.uint8)
    labels[edema] = EDEMA
    labels[non_enhancing] = CORE
    labels[enhancing] = ENHANCING
    required = (CORE, EDEMA, ENHANCING) if spec.features.enhancing else (CORE, EDEMA)
    if not all((labels == code).any() for code in required):
        return None
    # Edema is strongest next to the core and fades into the surrounding white matter.
    weight = np.where(edema, 0.55 + 0.45 * np.exp(-distance / spec.edema_mm), 0.0).astype(np.float32)
    weight[core] = 1.0
    return Tumor(region, labels, weight, texture, fluid & non_enhancing)  # type: ignore[arg-type]
