"""A picture of phantom (or real BraTS) cases: four modalities and the labels, one row per case.

For eyeballing what the generator makes and for the docs: the axial slice through the tumor
centre, each modality windowed on its own brain percentiles, and the labels over FLAIR.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrats.shared.constants import LAYOUTS, MODALITIES, Layout

#: BraTS-figure colours: necrosis red, edema green, enhancing yellow.
LABEL_COLOURS = {"NCR/NET": (0.9, 0.15, 0.15), "ED": (0.2, 0.8, 0.2), "ET": (1.0, 0.9, 0.1)}


def _find_layout(folder: Path, case_id: str) -> Layout:
    for layout in LAYOUTS.values():
        if (folder / layout.filename(case_id, "seg")).exists():
            return layout
    raise FileNotFoundError(
        f"{folder}: no segmentation found; expected {case_id}_seg.nii.gz (brats2021) or {case_id}-seg.nii.gz (brats2023)"
    )


def _site_notes(root: Path) -> tuple[dict[int, str], dict[str, str]]:
    """Short scanner description per site (from sites.json) and grade per case (from labels.csv)."""
    notes: dict[int, str] = {}
    grades: dict[str, str] = {}
    if (root / "sites.json").exists():
        for s in json.loads((root / "sites.json").read_text()).get("sites", []):
            gammas = "/".join(f"{s['scanner'][m]['gamma']:.2f}" for m in MODALITIES)
            notes[int(s["site"])] = (
                f"{s['field_strength_t']:g} T, gamma {gammas}, bias {s['bias_strength']:.2f}, noise {s['noise']:.3f}"
            )
    if (root / "labels.csv").exists():
        with open(root / "labels.csv", newline="") as f:
            grades = {r["Subject_ID"]: r.get("Grade", "") for r in csv.DictReader(f)}
    return notes, grades


def _window(img: np.ndarray, brain: np.ndarray) -> np.ndarray:
    if not brain.any():
        return img.astype(float)
    lo, hi = np.percentile(img[brain], [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * brain


def save_montage(root: Path, case_ids: list[str], out_png: Path) -> Path:
    """Write a PNG with one row per case: t1, t1ce, t2, flair and the labels over FLAIR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    root, out_png = Path(root), Path(out_png)
    notes, grades = _site_notes(root)
    n = len(case_ids)
    fig, axes = plt.subplots(n, 5, figsize=(15, 3.6 * n + 0.5), squeeze=False)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        top=1 - 0.55 / (3.6 * n + 0.5),
        bottom=0.45 / (3.6 * n + 0.5),
        wspace=0.03,
        hspace=0.32,
    )
    for row, cid in zip(axes, case_ids, strict=True):
        folder = root / cid
        layout = _find_layout(folder, cid)
        seg = np.asarray(nib.load(folder / layout.filename(cid, "seg")).dataobj)
        vols = {m: np.asarray(nib.load(folder / layout.filename(cid, m)).dataobj, float) for m in MODALITIES}
        brain = vols["t1"] > 0
        z = int(round(np.argwhere(seg > 0)[:, 2].mean())) if (seg > 0).any() else seg.shape[2] // 2
        xy = np.argwhere(brain.any(axis=2))
        lo, hi = (xy.min(0), xy.max(0) + 1) if len(xy) else ((0, 0), seg.shape[:2])
        crop = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), z)
        for ax, m in zip(row[:4], MODALITIES, strict=True):
            ax.imshow(_window(vols[m], brain)[crop].T, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.set_title(m, fontsize=10)
        flair = _window(vols["flair"], brain)[crop].T
        rgb = np.repeat(flair[..., None], 3, axis=2)
        et_value = 4 if layout.name == "brats2021" else 3
        for name, value in (("NCR/NET", 1), ("ED", 2), ("ET", et_value)):
            hit = seg[crop].T == value
            rgb[hit] = 0.35 * rgb[hit] + 0.65 * np.array(LABEL_COLOURS[name])
        row[4].imshow(rgb, origin="lower")
        row[4].set_title("labels over flair", fontsize=10)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        site = int(cid.split("_")[1]) if cid.count("_") >= 2 and cid.split("_")[1].isdigit() else None
        title = (
            f"{cid}  {grades.get(cid, '')}  site {site}: {notes.get(site, '') if site else ''}  (axial z={z})"
        )
        row[0].annotate(title, (0, 1.13), xycoords="axes fraction", fontsize=11, ha="left", fontweight="bold")
    handles = [Patch(color=c, label=n) for n, c in LABEL_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=11)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
