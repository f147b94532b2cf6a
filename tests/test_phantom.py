"""The phantom dataset: files, labels, contrasts, determinism, layouts, site sizes and site shift."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from fedbrats.shared.constants import BRATS2021, BRATS2023, MODALITIES
from fedbrats.shared.data.phantom import (
    draw_site_profiles,
    generate_phantom,
    load_site_profiles,
    make_case,
    save_montage,
)
from fedbrats.shared.data.phantom.anatomy import load_template, make_grid
from fedbrats.shared.data.phantom.sites import draw_case_count

VOXEL = 3.0
SEED = 0  # with 2 sites x 3 cases this gives both grades (asserted in test_files_and_csvs)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, cid: str, modality: str, layout=BRATS2021) -> np.ndarray:
    return np.asarray(nib.load(root / cid / layout.filename(cid, modality)).dataobj)


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(
        tmp_path_factory.mktemp("phantom"),
        sites=2,
        cases_per_site=3,
        voxel_size=VOXEL,
        seed=SEED,
        progress=False,
    )


@pytest.fixture(scope="module")
def cases():
    """The same cases as `phantom`, in memory, with their tissue map (not written to disk)."""
    grid, template = make_grid(VOXEL), load_template(VOXEL)
    profiles = draw_site_profiles(2, seed=SEED, cases_per_site=3)
    return [make_case(SEED, p, c, grid, template) for p in profiles for c in (1, 2, 3)]


def test_files_and_csvs(phantom: Path) -> None:
    columns, rows = _rows(phantom / "partitioning_1.csv")
    assert columns == ["Partition_ID", "Subject_ID"]
    assert [r["Partition_ID"] for r in rows] == ["1", "1", "1", "2", "2", "2"]
    ids = [r["Subject_ID"] for r in rows]
    assert ids[:2] == ["Phantom_001_0001", "Phantom_001_0002"] and ids[-1] == "Phantom_002_0003"
    columns, labels = _rows(phantom / "labels.csv")
    assert columns == ["Subject_ID", "Partition_ID", "Grade"]
    assert [r["Subject_ID"] for r in labels] == ids
    assert {r["Grade"] for r in labels} == {"HGG", "LGG"}
    for cid in ids:
        names = sorted(p.name for p in (phantom / cid).iterdir())
        assert names == sorted(BRATS2021.filename(cid, m) for m in (*MODALITIES, "seg"))
    manifest = json.loads((phantom / "sites.json").read_text())
    assert manifest["seed"] == SEED and manifest["voxel_size"] == VOXEL and manifest["layout"] == "brats2021"
    assert manifest["version"] and len(manifest["sites"]) == 2
    site = manifest["sites"][0]
    for key in ("train_seconds_per_case", "val_seconds_per_case", "download_seconds", "upload_seconds"):
        assert site[key] > 0
    assert 1.8 <= site["train_seconds_per_case"] <= 20.7 and 13 <= site["download_seconds"] <= 217
    assert load_site_profiles(phantom) == draw_site_profiles(2, seed=SEED, cases_per_site=3)


def test_images_geometry_and_background(phantom: Path) -> None:
    cid = "Phantom_002_0001"
    img = nib.load(phantom / cid / BRATS2021.filename(cid, "t1"))
    assert img.shape == (80, 80, 52)
    assert np.allclose(np.diag(img.affine)[:3], VOXEL) and img.header.get_zooms() == (VOXEL,) * 3
    brain = _load(phantom, cid, "t1") > 0
    assert 0.15 < brain.mean() < 0.5
    for m in MODALITIES:
        data = _load(phantom, cid, m)
        assert data.dtype == np.int16
        assert np.array_equal(data > 0, brain), f"{m}: brain must be non-zero, background exactly 0"
    assert _load(phantom, cid, "seg").dtype == np.uint8


def test_labels_by_grade(phantom: Path) -> None:
    _, labels = _rows(phantom / "labels.csv")
    for row in labels:
        cid = row["Subject_ID"]
        seg = _load(phantom, cid, "seg")
        values = set(np.unique(seg).tolist())
        if row["Grade"] == "HGG":
            assert values == {0, 1, 2, 4}, cid
        else:
            assert {1, 2} <= values <= {0, 1, 2, 4}, cid
            assert (seg == 4).sum() < 0.05 * (seg > 0).sum(), f"{cid}: LGG with much enhancement"
        assert (_load(phantom, cid, "t1")[seg > 0] > 0).all(), f"{cid}: tumor outside the brain"
        whole_ml = (seg > 0).sum() * VOXEL**3 / 1000
        assert 5 < whole_ml < 500, f"{cid}: whole tumor {whole_ml:.0f} ml"


def _mean(case, modality: str, where: np.ndarray) -> float:
    assert where.sum() > 5
    return float(case.images[modality][where].mean())


def test_contrasts(cases) -> None:
    for case in cases:
        normal = case.seg == 0
        csf, gm, wm = ((case.tissue == t) & normal for t in (1, 2, 3))
        edema = case.seg == 2
        assert _mean(case, "t1", wm) > _mean(case, "t1", gm) > _mean(case, "t1", csf), case.case_id
        assert _mean(case, "t1", case.seg == 1) < _mean(case, "t1", wm), case.case_id
        assert _mean(case, "t2", csf) > _mean(case, "t2", wm), case.case_id
        assert _mean(case, "t2", edema) > _mean(case, "t2", wm), case.case_id
        assert _mean(case, "flair", edema) > _mean(case, "flair", wm) > _mean(case, "flair", csf), (
            case.case_id
        )
        if case.grade == "HGG":
            assert _mean(case, "t1ce", case.seg == 4) > 1.2 * _mean(case, "t1ce", wm), case.case_id


def test_cases_on_disk_match_memory(phantom: Path, cases) -> None:
    for case in cases[:2]:
        assert np.array_equal(_load(phantom, case.case_id, "flair"), case.images["flair"])
        assert np.array_equal(_load(phantom, case.case_id, "seg"), case.seg)


def test_deterministic_and_order_independent(tmp_path: Path) -> None:
    a = _files(generate_phantom(tmp_path / "a", sites=1, cases_per_site=2, seed=3, progress=False))
    b = _files(generate_phantom(tmp_path / "b", sites=1, cases_per_site=2, seed=3, progress=False))
    assert a == b
    c = _files(generate_phantom(tmp_path / "c", sites=1, cases_per_site=1, seed=4, progress=False))
    key = "Phantom_001_0001/Phantom_001_0001_t1.nii.gz"
    assert c[key] != a[key]
    d = _files(generate_phantom(tmp_path / "d", sites=1, cases_per_site=1, seed=3, progress=False))
    assert d[key] == a[key], "a case must not depend on how many cases are generated"


def test_rerun_and_foreign_folder(tmp_path: Path) -> None:
    out = generate_phantom(tmp_path / "p", sites=1, cases_per_site=2, seed=3, progress=False)
    stamp = (out / "sites.json").stat().st_mtime_ns
    generate_phantom(out, sites=1, cases_per_site=2, seed=3, progress=False)
    assert (out / "sites.json").stat().st_mtime_ns == stamp, "same arguments: nothing regenerated"
    generate_phantom(out, sites=1, cases_per_site=1, seed=3, progress=False)
    assert not (out / "Phantom_001_0002").exists(), "stale case of the previous run left behind"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_phantom(foreign, sites=1, cases_per_site=1, progress=False)
    with pytest.raises(ValueError, match="layout"):
        generate_phantom(tmp_path / "x", layout="brats2019", progress=False)


def test_brats2023_layout(tmp_path: Path) -> None:
    out = generate_phantom(tmp_path, sites=1, cases_per_site=2, seed=SEED, layout="brats2023", progress=False)
    cid = "Phantom_001_0001"
    names = sorted(p.name for p in (out / cid).iterdir())
    assert names == sorted(f"{cid}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg"))
    assert set(np.unique(_load(out, cid, "seg", BRATS2023)).tolist()) == {0, 1, 2, 3}  # an HGG case
    assert json.loads((out / "sites.json").read_text())["labels"]["ET"] == 3


def test_heavy_tailed_site_sizes(tmp_path: Path) -> None:
    sizes = np.array([p.n_cases for seed in range(10) for p in draw_site_profiles(17, seed=seed)])
    assert sizes.min() >= 3
    assert 6 <= np.median(sizes) <= 13  # FeTS 2021: median 9
    assert sizes.max() >= 8 * np.median(sizes)  # FeTS 2021: 129 vs 9
    assert sizes.mean() > 1.4 * np.median(sizes)  # right-skewed
    assert draw_case_count(13, 1) == 4
    out = generate_phantom(tmp_path, sites=1, cases_per_site=None, seed=13, progress=False)
    _, rows = _rows(out / "partitioning_1.csv")
    assert len(rows) == 4


def test_sites_differ_measurably(cases) -> None:
    profiles = draw_site_profiles(2, seed=SEED)
    assert profiles[0].scanner != profiles[1].scanner
    assert profiles[0].train_seconds_per_case != profiles[1].train_seconds_per_case

    def z_scored(site: int, modality: str):
        for case in (c for c in cases if c.site == site):
            img = case.images[modality].astype(float)
            brain = img > 0
            yield case, (img - img[brain].mean()) / img[brain].std()

    def white_matter(site: int, modality: str) -> np.ndarray:
        return np.concatenate([z[(c.tissue == 3) & (c.seg == 0)] for c, z in z_scored(site, modality)])

    def edema_contrast(site: int, modality: str) -> float:
        return float(
            np.mean(
                [
                    z[c.seg == 2].mean() - z[(c.tissue == 3) & (c.seg == 0)].mean()
                    for c, z in z_scored(site, modality)
                ]
            )
        )

    # After z-scoring (what every model sees) the sites still differ: WM histogram and lesion contrast.
    ks = [stats.ks_2samp(white_matter(1, m), white_matter(2, m)).statistic for m in MODALITIES]
    assert max(ks) > 0.15, f"white-matter histograms too alike between sites: KS {np.round(ks, 3)}"
    gap = [abs(edema_contrast(1, m) - edema_contrast(2, m)) for m in MODALITIES]
    assert max(gap) > 0.5, f"edema-to-WM contrast (z units) too alike between sites: {np.round(gap, 2)}"


def test_montage(phantom: Path, tmp_path: Path) -> None:
    png = save_montage(phantom, ["Phantom_001_0001", "Phantom_002_0002"], tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with pytest.raises(FileNotFoundError, match="segmentation"):
        save_montage(phantom, ["nope"], tmp_path / "n.png")
