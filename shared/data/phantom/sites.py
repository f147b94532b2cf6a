"""Phantom institutions ("sites"): scanner profile, tumor mix, case count and simulated compute.

Each site is drawn from its own random stream derived from (seed, site), so adding a site never
changes the others. The scanner differences are deliberately strong (gamma, tissue contrast, bias
field, noise, blur): z-scoring removes scale and offset, these survive it and make a model trained
at one site lose accuracy at another, as real multi-institution data does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedbrats.shared.constants import MODALITIES
from fedbrats.shared.wallclock import REFERENCE_PAYLOAD_MB  # `bandwidth_mbps` moves it in `download_seconds`

#: Bumped whenever the same arguments would give different files.
GENERATOR_VERSION = "1.1"  # 1.1: grade features overlap (tumor.py)

#: Site case counts: 3 + lognormal, so the median is FeTS 2021's 9 and the tail is heavy (3 to ~130).
SIZE_MIN, SIZE_EXCESS_MEDIAN, SIZE_SIGMA, SIZE_MAX = 3, 6.0, 1.3, 400
#: FeTS-measured ranges (DESIGN section 8): per-site means for simulated wall-clock.
TRAIN_S = (1.8, 5.8, 20.7)  # min, median, max seconds per training case
VAL_S = (9.7, 15.3, 40.2)  # seconds per validation case
DOWNLOAD_S = (13.0, 217.0)
UPLOAD_S = (20.0, 431.0)

#: CSF level per sequence: FLAIR suppression varies most; T2 keeps CSF bright on every scanner.
CSF_RANGE = {"t1": (0.7, 1.4), "t1ce": (0.7, 1.4), "t2": (0.85, 1.4), "flair": (0.6, 1.8)}

_SITE_STREAM, _SIZE_STREAM = 0x517E, 0x512E


@dataclass(frozen=True)
class ModalityScanner:
    """How one site's scanner renders one modality: y = scale * (x^gamma + offset).

    x are tissue means changed per class (sequence timing and field strength change tissues
    differently); z-scoring undoes `scale` and `offset` but none of the others.
    """

    scale: float  # arbitrary scanner units per white-matter intensity
    offset: float  # additive, in white-matter units
    gamma: float  # non-linear intensity response
    contrast: float  # grey-white matter difference relative to textbook (1)
    csf: float  # CSF level relative to textbook (e.g. incomplete FLAIR suppression > 1)
    lesion: float  # tumor-to-white-matter differences relative to textbook


@dataclass(frozen=True)
class SiteProfile:
    """One phantom institution. Times follow FeTS's simulated wall-clock (DESIGN section 8)."""

    site: int  # Partition_ID, from 1
    name: str  # case-id prefix, e.g. "Phantom_001"
    n_cases: int
    hgg_share: float  # probability that a case is high grade (features by grade: tumor.py)
    field_strength_t: float  # 1.5 or 3.0: cosmetic, but 1.5 T sites are noisier
    scanner: dict[str, ModalityScanner]
    bias_strength: float  # log-amplitude of the multiplicative bias field
    bias_coefficients: tuple[float, ...]  # site coil pattern: quadratic polynomial in x, y, z
    noise: float  # Rician noise std in white-matter units
    enhancement: float  # gadolinium protocol: scales how much brighter than WM enhancing tumor is in T1ce
    blur_mm: float  # Gaussian blur sigma (mm): resolution of the sequence
    train_seconds_per_case: float
    val_seconds_per_case: float
    download_seconds: float
    upload_seconds: float
    bandwidth_mbps: float  # downlink that gives download_seconds for REFERENCE_PAYLOAD_MB
    upload_mbps: float
    compute_speed: float  # relative to the median FeTS site (> 1 is faster)
    timing_cv: float = 0.15  # coefficient of variation for per-round draws of the times above

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bias_coefficients"] = list(self.bias_coefficients)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SiteProfile:
        d = dict(d)
        d["scanner"] = {m: ModalityScanner(**s) for m, s in d["scanner"].items()}
        d["bias_coefficients"] = tuple(d["bias_coefficients"])
        return cls(**d)


def site_name(site: int) -> str:
    return f"Phantom_{site:03d}"


def case_id(site: int, case: int) -> str:
    """Case ids like BraTS/FeTS subject ids: Phantom_001_0001 is site 1, case 1."""
    return f"{site_name(site)}_{case:04d}"


def draw_case_count(seed: int, site: int) -> int:
    """Heavy-tailed site size (FeTS 2021: 3 to 129 cases, median 9), own stream per site."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, site, _SIZE_STREAM]))
    n = SIZE_MIN + SIZE_EXCESS_MEDIAN * np.exp(SIZE_SIGMA * rng.standard_normal())
    return int(min(round(n), SIZE_MAX))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _clipped_lognormal(rng: np.random.Generator, lo: float, median: float, hi: float) -> float:
    sigma = np.log(hi / lo) / 4.0  # the FeTS range spans about +-2 sigma
    return float(np.clip(median * np.exp(sigma * rng.standard_normal()), lo, hi))


def draw_site_profile(seed: int, site: int, cases_per_site: int | None = None) -> SiteProfile:
    """Draw one site's profile; deterministic in (seed, site), independent of other sites."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, site, _SITE_STREAM]))
    field_t = 3.0 if rng.random() < 0.6 else 1.5
    scanner = {}
    for modality in MODALITIES:
        scanner[modality] = ModalityScanner(
            scale=round(_log_uniform(rng, 150.0, 2000.0), 3),
            offset=round(float(rng.uniform(0.0, 0.2)), 4),
            gamma=round(_log_uniform(rng, 0.55, 1.8), 4),
            contrast=round(float(rng.uniform(0.6, 1.4)), 4),
            csf=round(_log_uniform(rng, *CSF_RANGE[modality]), 4),
            lesion=round(float(rng.uniform(0.75, 1.4)), 4),
        )
    bias_strength = float(rng.uniform(0.05, 0.5))
    coefficients = rng.standard_normal(9)  # x, y, z, x2, y2, z2, xy, xz, yz
    coefficients /= np.abs(coefficients).sum()
    noise = _log_uniform(rng, 0.01, 0.065) * (1.25 if field_t == 1.5 else 1.0)
    enhancement = float(rng.uniform(0.6, 1.4))
    blur_mm = float(rng.uniform(0.0, 1.6))
    hgg_share = float(np.clip(rng.beta(4.0, 1.3), 0.3, 1.0))

    train_s = _clipped_lognormal(rng, *TRAIN_S)
    val_s = _clipped_lognormal(rng, *VAL_S)
    network = rng.uniform()  # slow download and slow upload go together
    download_s = float(np.exp(np.log(DOWNLOAD_S[0]) + network * np.log(DOWNLOAD_S[1] / DOWNLOAD_S[0])))
    up_q = float(np.clip(network + 0.15 * rng.standard_normal(), 0.0, 1.0))
    upload_s = float(np.exp(np.log(UPLOAD_S[0]) + up_q * np.log(UPLOAD_S[1] / UPLOAD_S[0])))
    n_cases = cases_per_site if cases_per_site is not None else draw_case_count(seed, site)
    if n_cases < 1:
        raise ValueError(f"cases_per_site must be >= 1, got {n_cases}")
    return SiteProfile(
        site=site,
        name=site_name(site),
        n_cases=int(n_cases),
        hgg_share=round(hgg_share, 4),
        field_strength_t=field_t,
        scanner=scanner,
        bias_strength=round(bias_strength, 4),
        bias_coefficients=tuple(round(float(c), 4) for c in coefficients),
        noise=round(noise, 4),
        enhancement=round(enhancement, 4),
        blur_mm=round(blur_mm, 3),
        train_seconds_per_case=round(train_s, 2),
        val_seconds_per_case=round(val_s, 2),
        download_seconds=round(download_s, 1),
        upload_seconds=round(upload_s, 1),
        bandwidth_mbps=round(8 * REFERENCE_PAYLOAD_MB / download_s, 3),
        upload_mbps=round(8 * REFERENCE_PAYLOAD_MB / upload_s, 3),
        compute_speed=round(TRAIN_S[1] / train_s, 3),
        timing_cv=round(float(rng.uniform(0.05, 0.25)), 3),
    )


def draw_site_profiles(sites: int, *, seed: int = 0, cases_per_site: int | None = None) -> list[SiteProfile]:
    """Profiles of sites 1..sites, without generating any image (cheap; used by tests and planners)."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    return [draw_site_profile(seed, s, cases_per_site) for s in range(1, sites + 1)]


def load_site_profiles(path: Path) -> list[SiteProfile]:
    """Read the `sites.json` a phantom run wrote (the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "sites.json"
    try:
        data = json.loads(path.read_text())
        return [SiteProfile.from_dict(d) for d in data["sites"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected a phantom sites.json with a 'sites' list ({err})") from err
