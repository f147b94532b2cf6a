"""Render the four MRI modalities of a phantom case from tissue fractions and a site's scanner.

Intensities are textbook tissue contrasts in white-matter units (T1: WM > GM > CSF, tumor dark;
T1ce: T1 plus a bright enhancing rim; T2: CSF and edema bright; FLAIR: CSF suppressed, edema
bright), mixed by partial-volume fractions. The site's scanner then changes them in ways that
z-scoring does not undo (contrast, blur, bias field, gamma, Rician noise) and in ways it does
(scale, offset). The background outside the brain is exactly 0 (skull-stripped).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.data.phantom.sites import ModalityScanner, SiteProfile
from fedbrats.shared.data.phantom.tumor import CORE, ENHANCING, Tumor

TISSUES = ("csf", "gm", "wm", "ncr", "net", "ed", "et")
#: Mean intensity per tissue (columns as TISSUES), white matter = 1 in T1/T1ce.
CONTRAST = {
    "t1": (0.30, 0.68, 1.00, 0.36, 0.55, 0.66, 0.70),
    "t1ce": (0.32, 0.72, 1.00, 0.38, 0.58, 0.68, 1.55),
    "t2": (1.60, 0.82, 0.56, 1.42, 1.30, 1.22, 0.95),
    "flair": (0.16, 0.85, 0.64, 0.80, 1.22, 1.38, 1.05),
}
#: Tumor intensity heterogeneity (fraction of the mean, smooth noise).
TUMOR_TEXTURE = 0.07


def tissue_means(
    modality: str, scanner: ModalityScanner, enhancement: float, rng: np.random.Generator
) -> np.ndarray:
    """Class means for one site's sequence, with a per-patient jitter of the tumor classes.

    Each class moves differently (a single linear stretch would be undone by z-scoring).
    """
    mu = np.array(CONTRAST[modality], dtype=np.float32)
    wm = mu[2]
    mu[1] = wm + scanner.contrast * (mu[1] - wm)
    mu[0] *= scanner.csf
    mu[3:] = wm + scanner.lesion * (mu[3:] - wm)
    if modality != "flair":  # necrosis is mostly fluid: it follows the CSF level (FLAIR: proteinaceous)
        mu[3] *= np.sqrt(scanner.csf)
    if modality == "t1ce":
        mu[6] = wm + enhancement * (mu[6] - wm)
    mu[3:] *= np.exp(rng.normal(0.0, 0.06, 4)).astype(np.float32)
    return np.maximum(mu, 0.03)


def bias_polynomial(shape: tuple[int, ...], affine: np.ndarray, box: tuple[slice, ...], coef: np.ndarray):
    """Quadratic polynomial (x, y, z, x2, y2, z2, xy, xz, yz) over the box, coordinates in units of 80 mm."""
    axes = [
        ((affine[d, 3] + affine[d, d] * np.arange(box[d].start, box[d].stop)) / 80.0).astype(np.float32)
        for d in range(3)
    ]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    c = coef.astype(np.float32)
    linear = (c[0] * x + c[3] * x * x) + (c[1] * y + c[4] * y * y) + (c[2] * z + c[5] * z * z)
    return linear + c[6] * x * y + c[7] * x * z + c[8] * y * z


def render(
    rng: np.random.Generator,
    anatomy: np.ndarray,
    tumor: Tumor,
    site: SiteProfile,
    affine: np.ndarray,
    box: tuple[slice, slice, slice],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Images (int16 over the work box, 0 outside the brain) and the brain mask.

    The non-enhancing core is rendered as fluid (necrosis or cyst: `tumor.fluid`) or as solid
    tumor, whatever the grade, so the core's look follows the drawn features, not the grade label.
    """
    spacing = float(affine[0, 0])
    mask, gm, wm = anatomy
    brain = mask > 0.5
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    sub = tumor.region
    lab = tumor.labels
    soft = 0.5  # partial volume of the tumor boundary, in voxels
    f_ncr = ndimage.gaussian_filter(((lab == CORE) & tumor.fluid).astype(np.float32), soft)
    f_net = ndimage.gaussian_filter(((lab == CORE) & ~tumor.fluid).astype(np.float32), soft)
    f_core = f_ncr + f_net
    f_et = ndimage.gaussian_filter((lab == ENHANCING).astype(np.float32), soft)
    f_ed = ndimage.gaussian_filter(tumor.edema_weight * (lab > 0), soft) - f_core - f_et
    f_ed = np.clip(f_ed, 0.0, 1.0)
    f_tumor = np.clip(f_core + f_et + f_ed, 0.0, 1.0)
    texture = 1.0 + TUMOR_TEXTURE * tumor.texture
    m_sub = mask[sub]

    coef = np.asarray(site.bias_coefficients) + rng.normal(0.0, 0.05, 9)
    poly = bias_polynomial(mask.shape, affine, box, coef)
    n_brain = int(brain.sum())
    images = {}
    for modality in MODALITIES:
        scanner = site.scanner[modality]
        mu = tissue_means(modality, scanner, site.enhancement, rng)
        img = csf * mu[0] + gm * mu[1] + wm * mu[2]
        tumor_mix = f_ncr * mu[3] + f_net * mu[4] + f_et * mu[6] + f_ed * mu[5]
        img[sub] = img[sub] * (1.0 - f_tumor) + m_sub * tumor_mix * texture
        sigma = site.blur_mm / spacing
        if sigma > 0.2:
            img = ndimage.gaussian_filter(img, sigma, mode="constant", truncate=3.0)
        strength = site.bias_strength * float(np.exp(rng.normal(0.0, 0.15)))
        img *= np.exp(strength * poly)
        values = np.power(np.maximum(img[brain], 0.0), scanner.gamma)
        noise = site.noise * rng.standard_normal((2, n_brain), dtype=np.float32)
        values = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
        values = scanner.scale * (values + scanner.offset)
        out = np.zeros(mask.shape, np.int16)
        out[brain] = np.clip(np.round(values), 1, np.iinfo(np.int16).max).astype(np.int16)
        images[modality] = out
    return images, brain
