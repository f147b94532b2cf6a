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
from fedbrats.shared.data.case_labels import load_case_labels
from fedbrats.shared.data.phantom import (
    draw_site_profiles,
    generate_phantom,
    load_site_profiles,
    make_case,
    save_montage,
)
from fedbrats.shared.data.phantom.anatomy import load_template, make_grid
from fedbrats.shared.data.phantom.generate import case_grade_features
from fedbrats.shared.data.phantom.sites import draw_case_count
from fedbrats.shared.data.phantom.tumor import (
    HGG_NECROSIS,
    HGG_SOLID_ENHANCING,
    LGG_CYST,
    LGG_ENHANCING,
    draw_tumor,
)
from fedbrats.shared.evaluation.classification import auc

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


def test_labels_follow_the_drawn_grade_features(phantom: Path) -> None:
    """ET is present exactly when the case's features say it enhances (not by grade: they overlap)."""
    labels = load_case_labels(phantom)
    assert labels is not None and labels.classes == ("HGG", "LGG") and len(labels) == 6
    profiles = {p.site: p for p in draw_site_profiles(2, seed=SEED, cases_per_site=3)}
    for cid, grade in labels.labels.items():
        site, case = int(cid.split("_")[1]), int(cid.split("_")[2])
        features = case_grade_features(SEED, profiles[site], case)
        assert features.grade == grade, cid
        seg = _load(phantom, cid, "seg")
        values = set(np.unique(seg).tolist())
        assert {1, 2} <= values <= {0, 1, 2, 4}, cid
        assert (4 in values) == features.enhancing, f"{cid}: {features}"
        if features.enhancement == "patchy":  # patches: at most 30 % of the solid core
            assert (seg == 4).sum() <= 0.31 * np.isin(seg, (1, 4)).sum(), cid
        assert (_load(phantom, cid, "t1")[seg > 0] > 0).all(), f"{cid}: tumor outside the brain"
        whole_ml = (seg > 0).sum() * VOXEL**3 / 1000
        assert 5 < whole_ml < 500, f"{cid}: whole tumor {whole_ml:.0f} ml"


def _grade_features(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth features of n drawn tumours (half HGG): ET, fluid centre, both, log radius, log edema."""
    rng = np.random.default_rng(seed)
    hgg = rng.random(n) < 0.5
    specs = [draw_tumor(rng, "HGG" if h else "LGG", VOXEL) for h in hgg]
    rows = [
        (s.features.enhancing, s.features.fluid_centre, s.features.enhancing and s.features.fluid_centre,
         np.log(s.radius_mm), np.log(s.edema_mm))
        for s in specs
    ]  # fmt: skip
    return np.array(rows, float), hgg.astype(int)


def _logistic_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = np.c_[np.ones(len(x)), x]
    w = np.zeros(x.shape[1])
    for _ in range(30):  # Newton steps
        p = 1 / (1 + np.exp(-x @ w))
        w += np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + 1e-6 * np.eye(len(w)), x.T @ (y - p))
    return w


def test_grade_features_overlap_as_in_real_gliomas() -> None:
    """The numbers tumor.py's docstring states: rates per grade, ET-only AUC ~0.85, best AUC ~0.95."""
    x, y = _grade_features(0)
    hgg, lgg = x[y == 1], x[y == 0]
    assert abs(hgg[:, 1].mean() - HGG_NECROSIS) < 0.03 and 0.1 <= 1 - HGG_NECROSIS <= 0.2
    assert abs(hgg[:, 0].mean() - (HGG_NECROSIS + (1 - HGG_NECROSIS) * HGG_SOLID_ENHANCING)) < 0.03
    assert abs(lgg[:, 0].mean() - LGG_ENHANCING) < 0.03 and 0.15 <= LGG_ENHANCING <= 0.25
    assert abs(lgg[:, 1].mean() - LGG_CYST) < 0.03
    assert 0.2 < hgg[:, 4].mean() - lgg[:, 4].mean() < 0.45  # HGG edema thicker on average only (log 11/8)
    assert abs(hgg[:, 3].mean() - lgg[:, 3].mean()) < 0.1  # sizes alike
    et_only, _ = auc(x[:, 0], y)
    assert 0.82 < et_only < 0.88, "ET present must not decide the grade"
    w = _logistic_fit(x, y)
    x_test, y_test = _grade_features(100)
    best, _ = auc(1 / (1 + np.exp(-(np.c_[np.ones(len(x_test)), x_test] @ w))), y_test)
    assert best == pytest.approx(0.946, abs=0.005)  # learnable, not trivial


def test_overlapping_cases_look_like_their_features() -> None:
    """An enhancing LGG shows ET; a solid non-enhancing HGG shows none (what makes the grade non-trivial)."""
    profiles = draw_site_profiles(8, seed=SEED, cases_per_site=20)
    found = {}
    for p in profiles:
        for c in range(1, 21):
            f = case_grade_features(SEED, p, c)
            key = (f.grade, f.enhancement)
            if key in {("LGG", "patchy"), ("HGG", "none")}:
                found.setdefault(key, (p, c))
    assert set(found) == {("LGG", "patchy"), ("HGG", "none")}
    grid, template = make_grid(VOXEL), load_template(VOXEL)
    lgg = make_case(SEED, *found["LGG", "patchy"], grid, template)
    hgg = make_case(SEED, *found["HGG", "none"], grid, template)
    assert lgg.grade == "LGG" and lgg.features.enhancing and (lgg.seg == 4).any()
    wm = (lgg.tissue == 3) & (lgg.seg == 0)
    assert _mean(lgg, "t1ce", lgg.seg == 4) > 1.1 * _mean(lgg, "t1ce", wm)
    assert hgg.grade == "HGG" and not hgg.features.fluid_centre and not (hgg.seg == 4).any()
    assert {1, 2} <= set(np.unique(hgg.seg).tolist())


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
        if case.features.enhancement == "rim":
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
