"""Write the phantom dataset: BraTS folders, the FeTS partition CSV, grades and site profiles.

Every case has its own random stream derived from (seed, site, case), so a case does not depend
on which other cases are generated or in what order. Files are byte-identical for the same
arguments: NIfTI bytes are gzipped here with mtime 0 (nibabel would stamp the current time).
`sites.json` is written last and marks a complete run: calling again with the same arguments
returns at once.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrats.shared.constants import LAYOUTS, MODALITIES, Layout
from fedbrats.shared.data.phantom.anatomy import (
    Grid,
    Template,
    draw_deformation,
    load_template,
    make_grid,
    sample_anatomy,
)
from fedbrats.shared.data.phantom.imaging import render
from fedbrats.shared.data.phantom.institutions import (
    DEFAULT_MIN_CASES,
    default_val_cases,
    institution_sizes,
    train_or_val,
)
from fedbrats.shared.data.phantom.sites import (
    GENERATOR_VERSION,
    SiteProfile,
    case_id,
    draw_site_profile,
    draw_site_profiles,
)
from fedbrats.shared.data.phantom.tumor import (
    CORE,
    EDEMA,
    ENHANCING,
    GradeFeatures,
    choose_seed,
    draw_grade_features,
    draw_tumor,
    grow_tumor,
)

_CASE_STREAM = 0xCA5E
_ATTEMPTS = 20
_CASE_DIR = re.compile(r"^Phantom_\d{3}_\d{4}$")
#: Run-key entries present only when used (`_run_key`).
_SIZING_KEYS = ("institutions", "scale", "min_cases", "val_cases")


@dataclasses.dataclass
class PhantomCase:
    """One generated case on the full grid: int16 images (MODALITIES order keys), uint8 seg."""

    case_id: str
    site: int
    grade: str
    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray  # uint8: 1 CSF, 2 GM, 3 WM where that class fills >= 60 % of the voxel, else 0
    features: GradeFeatures  # what the grade looks like in this case (necrosis/cyst, enhancement)

    @property
    def voxel_size(self) -> float:
        return float(self.affine[0, 0])


def _case_rng(seed: int, site: SiteProfile, case: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, site.site, case, _CASE_STREAM]))


def _draw_case_features(rng: np.random.Generator, site: SiteProfile) -> GradeFeatures:
    return draw_grade_features(rng, "HGG" if rng.random() < site.hgg_share else "LGG")


def case_grade_features(seed: int, site: SiteProfile, case: int) -> GradeFeatures:
    """Grade, fluid centre and enhancement pattern `make_case` will draw, without making any image."""
    return _draw_case_features(_case_rng(seed, site, case), site)


def make_case(
    seed: int, site: SiteProfile, case: int, grid: Grid, template: Template, et_label: int = 4
) -> PhantomCase:
    """Generate one case in memory (nothing written); deterministic in (seed, site, case, voxel size)."""
    rng = _case_rng(seed, site, case)
    features = _draw_case_features(rng, site)  # once: a retry redraws the shape, not the grade's look
    grade = features.grade
    deform = draw_deformation(rng, template)
    origin = grid.affine[:3, 3]
    box_start = np.array([s.start for s in grid.box])
    for _ in range(_ATTEMPTS):
        spec = draw_tumor(rng, features, grid.voxel_size)
        seed_point = choose_seed(rng, template, spec)
        pushed = dataclasses.replace(
            deform, push_at=seed_point, push_strength=spec.push_strength, push_radius=spec.radius_mm
        )
        anatomy = sample_anatomy(grid, template, pushed)
        centre = (deform.to_output(seed_point) - origin) / grid.voxel_size - box_start
        tumor = grow_tumor(rng, spec, anatomy, centre, grid.voxel_size)
        if tumor is not None:
            break
    else:  # pragma: no cover - sizes are drawn so that this does not happen at 1-4 mm
        raise RuntimeError(
            f"{case_id(site.site, case)}: no tumor with all required labels in {_ATTEMPTS} tries"
        )
    images_box, brain = render(rng, anatomy, tumor, site, grid.affine, grid.box)

    seg_box = np.zeros(brain.shape, np.uint8)
    lut = np.array([0, 1, 2, et_label], np.uint8)  # internal CORE, EDEMA, ENHANCING -> file labels
    assert (CORE, EDEMA, ENHANCING) == (1, 2, 3)
    seg_box[tumor.region] = lut[tumor.labels]
    seg_box[~brain] = 0
    images = {}
    for modality in MODALITIES:
        full = np.zeros(grid.shape, np.int16)
        full[grid.box] = images_box[modality]
        images[modality] = full
    seg = np.zeros(grid.shape, np.uint8)
    seg[grid.box] = seg_box
    tissue = np.zeros(grid.shape, np.uint8)
    tissue[grid.box] = _dominant_tissue(anatomy, brain)
    return PhantomCase(
        case_id(site.site, case), site.site, grade, images, seg, grid.affine, tissue, features
    )


def _dominant_tissue(anatomy: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Tissue filling >= 60 % of the voxel (fractions sum to <= 1, so at most one does)."""
    mask, gm, wm = anatomy
    tissue = np.where(wm >= 0.6, 3, np.where(gm >= 0.6, 2, 0)).astype(np.uint8)
    tissue[(mask - gm - wm >= 0.6) & brain] = 1
    tissue[~brain] = 0
    return tissue


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 with a fixed gzip header (mtime 0), so equal arrays give equal files."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_case(case: PhantomCase, out: Path, layout: Layout) -> Path:
    folder = out / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    for modality in MODALITIES:
        (folder / layout.filename(case.case_id, modality)).write_bytes(
            nifti_bytes(case.images[modality], case.affine)
        )
    (folder / layout.filename(case.case_id, "seg")).write_bytes(nifti_bytes(case.seg, case.affine))
    return folder


def _run_key(
    sites: int, cases_per_site: int | None, voxel_size: float, seed: int, layout: str, sizing: dict | None = None
) -> dict:
    """The run's arguments; `sizing` (institution set, scale, minimum, validation cases) only when used, so
    a phantom made without them keeps the key, and the files, it always had."""
    return {
        "generator": "fedbrats.phantom",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_sites": sites,
        "cases_per_site": cases_per_site,
        "voxel_size": voxel_size,
        "layout": layout,
        **(sizing or {}),
    }


def _prepare_out(out: Path, key: dict, case_ids: list[str], layout: Layout) -> bool:
    """True if `out` already holds this exact phantom. Stale phantom cases of an older run are removed."""
    manifest = out / "sites.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; expected a folder for the phantom dataset")
    if out.exists() and any(out.iterdir()):
        if not manifest.exists():
            raise ValueError(
                f"{out}: folder is not empty and holds no phantom sites.json; "
                "expected an empty or new folder, or one written by generate_phantom"
            )
        try:
            previous = json.loads(manifest.read_text())
        except ValueError:
            previous = {}
        same = all(previous.get(k) == v for k, v in key.items()) and not any(
            k in previous and k not in key for k in _SIZING_KEYS
        )
        if same and all(
            (out / c / layout.filename(c, m)).exists() for c in case_ids for m in (*MODALITIES, "seg")
        ):
            return True
        manifest.unlink()  # its presence means "complete"; rewritten at the end
        wanted = set(case_ids)
        for child in out.iterdir():
            if child.is_dir() and _CASE_DIR.match(child.name) and child.name not in wanted:
                shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    return False


def generate_phantom(
    out: Path,
    *,
    sites: int | None = None,
    cases_per_site: int | None = None,
    voxel_size: float = 3.0,
    seed: int = 0,
    layout: str = "brats2021",
    progress: bool = True,
    institutions: str | None = None,
    scale: float = 1.0,
    min_cases: int = DEFAULT_MIN_CASES,
    val_cases: int | None = None,
) -> Path:
    """Generate a BraTS-like multi-site dataset under `out` and return `out`.

    Writes out/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (or the brats2023 names, ET = 3),
    out/partitioning_1.csv (one partition per site), out/labels.csv (Subject_ID, Partition_ID,
    Grade) and out/sites.json (run arguments and the site profiles, simulated compute included).
    `cases_per_site=None` draws heavy-tailed site sizes like FeTS (median 9, at least 3); `sites` defaults to 4.
    `institutions` ("fets2022", "fets2021") instead sizes the sites like that challenge's institutions, times
    `scale`, at least `min_cases` (`shared.data.phantom.institutions`). With `institutions` or `val_cases`,
    partitioning_1.csv gets a TrainOrVal column holding out `val_cases` cases (default: 20 %, at least 40).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if cases_per_site is not None and cases_per_site < 1:
        raise ValueError(f"cases_per_site must be >= 1 or None, got {cases_per_site}")
    lay = LAYOUTS[layout]
    out = Path(out)
    voxel_size = float(voxel_size)
    grid = make_grid(voxel_size)
    sizing = None
    if institutions is not None:
        if sites is not None or cases_per_site is not None:
            raise ValueError(
                f"institutions={institutions!r} sets the sites and their sizes; leave sites and cases_per_site out"
            )
        sizes = institution_sizes(institutions, scale=scale, min_cases=min_cases)
        profiles = [draw_site_profile(seed, s, n) for s, n in enumerate(sizes, start=1)]
        sizing = {"institutions": institutions, "scale": float(scale), "min_cases": int(min_cases)}
    else:
        profiles = draw_site_profiles(4 if sites is None else sites, seed=seed, cases_per_site=cases_per_site)
    sites = len(profiles)
    split = None
    if institutions is not None or val_cases is not None:
        sizes = [p.n_cases for p in profiles]
        val_cases = default_val_cases(sum(sizes)) if val_cases is None else int(val_cases)
        split = {case_id(s, c): part for (s, c), part in train_or_val(seed, sizes, val_cases).items()}
        sizing = {**(sizing or {}), "val_cases": val_cases}
    jobs = [(p, c) for p in profiles for c in range(1, p.n_cases + 1)]
    ids = [case_id(p.site, c) for p, c in jobs]
    key = _run_key(sites, cases_per_site, voxel_size, seed, layout, sizing)
    if _prepare_out(out, key, ids, lay):
        return out
    template = load_template(voxel_size)
    et_label = 4 if layout == "brats2021" else 3

    grades: list[tuple[str, int, str]] = []
    with _progress(progress, len(jobs), f"phantom {voxel_size:g} mm") as advance:
        for profile, c in jobs:
            case = make_case(seed, profile, c, grid, template, et_label)
            write_case(case, out, lay)
            grades.append((case.case_id, profile.site, case.grade))
            advance(f"site {profile.site}/{sites}")

    with open(out / "partitioning_1.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Partition_ID", "Subject_ID", *(["TrainOrVal"] if split else [])])
        w.writerows([site, cid, *([split[cid]] if split else [])] for cid, site, _ in grades)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Subject_ID", "Partition_ID", "Grade"])
        w.writerows([cid, site, grade] for cid, site, grade in grades)
    manifest = {
        **key,
        "shape": list(grid.shape),
        "affine": grid.affine.tolist(),
        "labels": {"NCR": 1, "ED": 2, "ET": et_label},
        "n_cases": len(jobs),
        "sites": [p.to_dict() for p in profiles],
    }
    (out / "sites.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


class _progress:
    """rich progress bar when asked for, a no-op otherwise; yields an `advance(description)` callable."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled, self.total, self.title = enabled, total, title
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda _description: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        self._bar.start()
        task = self._bar.add_task(self.title, total=self.total)

        def advance(description: str) -> None:
            self._bar.update(task, advance=1, description=f"{self.title} {description}")

        return advance

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
