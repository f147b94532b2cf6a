"""Tiny synthetic BraTS cases written with nibabel, for the data-layer tests (not a pytest conftest)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrats.shared.constants import LAYOUTS, MODALITIES

SHAPE = (24, 24, 16)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE[:3, 3] = (12.0, 12.0, -8.0)

#: label values per convention: (necrotic core, edema, enhancing, resection cavity or None)
CONVENTIONS = {"brats2021": (1, 2, 4, None), "brats2023": (1, 2, 3, None), "brats2024": (1, 2, 3, 4)}


def case_id_for(index: int, layout: str = "brats2021") -> str:
    return f"BraTS2021_{index:05d}" if layout == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def synthetic_arrays(shape=SHAPE, labels: str = "brats2021", seed: int = 0, tumor: bool = True):
    """(images {modality: int16 array}, seg uint8): an ellipsoid brain, a tumor with nested labels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    seg = np.zeros(shape, np.uint8)
    if tumor:
        ncr, ed, et, rc = CONVENTIONS[labels]
        centre = np.array([0.25, -0.2, 0.1])[:, None, None, None]
        r = np.sqrt(((grid - centre) ** 2).sum(0))
        seg[(r < 0.45) & brain] = ed
        seg[r < 0.3] = et
        seg[r < 0.15] = ncr
        if rc is not None:
            seg[(np.sqrt(((grid + centre) ** 2).sum(0)) < 0.2) & brain] = rc
    images = {}
    for k, m in enumerate(MODALITIES):
        vol = brain * (300 + 100 * k + rng.normal(0, 20, shape)) + (seg > 0) * 150 * (k + 1)
        images[m] = np.where(brain, np.maximum(vol, 1), 0).astype(np.int16)
    return images, seg


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_zooms((1.0,) * min(3, np.asarray(data).ndim) + (1.0,) * max(0, np.asarray(data).ndim - 3))
    nib.save(img, path)
    return path


def write_case(
    root: Path,
    case_id: str | None = None,
    layout: str = "brats2021",
    shape=SHAPE,
    labels: str | None = None,
    *,
    seed: int = 0,
    tumor: bool = True,
    arrays: dict[str, np.ndarray] | None = None,
    affines: dict[str, np.ndarray] | None = None,
    missing: tuple[str, ...] = (),
    extra_files: tuple[str, ...] = (),
    seg: bool = True,
) -> Path:
    """Write ROOT/<case>/ in `layout`; `arrays`/`affines` replace a file's data or affine by modality."""
    labels = labels or layout
    case_id = case_id or case_id_for(seed + 1, layout)
    lay = LAYOUTS[layout]
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    images, label_map = synthetic_arrays(shape, labels, seed, tumor)
    data = {**images, "seg": label_map, **(arrays or {})}
    for name in (*MODALITIES, "seg"):
        if name in missing or (name == "seg" and not seg):
            continue
        write_nifti(folder / lay.filename(case_id, name), data[name], (affines or {}).get(name, AFFINE))
    for extra in extra_files:
        (folder / extra).write_text("stray")
    return folder


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a .nii.gz short, as an interrupted download does (the header still reads)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path
