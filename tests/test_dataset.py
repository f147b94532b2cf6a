"""Loading geometry, region mapping, preprocessing, augmentation, PatientDataset (patches, caches, seeds)."""

from __future__ import annotations

import logging
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity

from fedbrats.shared.constants import LABELS_2021, LABELS_2023, LABELS_2024, REGIONS
from fedbrats.shared.data.cases import discover_cases, find_case
from fedbrats.shared.data.dataset import PatientDataset
from fedbrats.shared.data.problems import CaseError
from fedbrats.shared.data.transforms import (
    ForegroundBiasedCropd,
    preprocess,
    train_augmentation,
    zscore_nonzero,
)
from fedbrats.shared.data.volumes import load_case
from fedbrats.shared.labels import labels_to_regions, regions_to_labels
from tests.data_fixtures import AFFINE, SHAPE, case_id_for, synthetic_arrays, write_case

PATCH = (16, 16, 16)


def make_cases(root, n=3, **kw):
    for i in range(n):
        write_case(root, seed=i, **kw)
    cases, _ = discover_cases(root)
    return cases


# ----------------------------------------------------------------------------- volumes


@pytest.mark.parametrize(
    ("label_set", "et", "ncr", "ed", "rc"),
    [(LABELS_2021, 4, 1, 2, None), (LABELS_2023, 3, 1, 2, None), (LABELS_2024, 3, 1, 2, 4)],
)
def test_region_membership(label_set, et, ncr, ed, rc):
    values = [0, ncr, ed, et] + ([rc] if rc else [])
    seg = np.array(values, np.uint8).reshape(1, 1, -1)
    got = labels_to_regions(seg, label_set).reshape(3, -1)
    member = {r: got[REGIONS.index(r)].tolist() for r in REGIONS}
    expected = {  # columns: background, NCR, ED, ET, (RC in no region)
        "ET": [0, 0, 0, 1],
        "TC": [0, 1, 0, 1],
        "WT": [0, 1, 1, 1],
    }
    for region in REGIONS:
        assert member[region] == expected[region] + ([0] if rc else []), region
    assert got.dtype == np.uint8


def test_regions_to_labels_inverts_mapping():
    _, seg = synthetic_arrays(labels="brats2023")
    regions = labels_to_regions(seg, LABELS_2023)
    np.testing.assert_array_equal(regions_to_labels(regions, LABELS_2023), seg)
    with pytest.raises(ValueError, match=r"labels \{3\} are not in brats2021"):
        labels_to_regions(seg, LABELS_2021)


def test_load_case_keeps_input_geometry(tmp_path):
    flipped = AFFINE.copy()
    flipped[:3, :3] = np.diag([1.0, 1.0, 2.0])  # not RAS-canonicalised on load
    folder = write_case(tmp_path, affines=dict.fromkeys(("t1", "t1ce", "t2", "flair", "seg"), flipped))
    img = nib.load(folder / f"{case_id_for(1)}_t1.nii.gz")
    img.header.set_zooms((1.0, 1.0, 2.0))
    nib.save(img, folder / f"{case_id_for(1)}_t1.nii.gz")
    volume = load_case(find_case(folder))
    images, seg = synthetic_arrays()
    assert volume.image.shape == (4, *SHAPE) and volume.image.dtype == np.float32
    np.testing.assert_array_equal(volume.image[2], images["t2"])
    np.testing.assert_allclose(volume.affine, flipped)
    assert volume.spacing == (1.0, 1.0, 2.0) and volume.header.get_data_shape() == SHAPE
    np.testing.assert_array_equal(volume.regions, labels_to_regions(seg, LABELS_2021))


# ----------------------------------------------------------------------------- transforms


def test_preprocess_crops_border_and_zscores_brain(tmp_path):
    volume = load_case(find_case(write_case(tmp_path)))
    image, regions, box = preprocess(volume)
    brain = (volume.image != 0).any(0)
    idx = np.argwhere(brain)
    assert box.start == tuple(idx.min(0)) and box.end == tuple(idx.max(0) + 1) and box.shape == SHAPE
    assert (
        image.shape[1:] == regions.shape[1:] == tuple(e - s for s, e in zip(box.start, box.end, strict=True))
    )
    for c in range(4):
        inside = image[c][image[c] != 0]
        assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    np.testing.assert_array_equal(box.uncrop(regions), volume.regions)
    assert (box.uncrop(image)[:, ~brain] == 0).all()


def test_zscore_matches_monai_normalize_intensity():
    rng = np.random.default_rng(1)
    shape = (4, 12, 10, 8)
    image = np.where(rng.random(shape) < 0.6, rng.normal(300, 40, shape), 0).astype(np.float32)
    image[3] = np.where(image[3] != 0, 5.0, 0.0)  # a flat channel: std 0
    expected = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(image.copy()))
    np.testing.assert_allclose(zscore_nonzero(image), np.asarray(expected), atol=1e-5)


def test_augmentation_pads_small_volumes_and_replays_with_seed():
    image = np.random.default_rng(0).normal(size=(4, 10, 20, 30)).astype(np.float32)
    label = np.zeros((3, 10, 20, 30), np.uint8)
    label[:, 5, 5, 5] = 1
    a = train_augmentation((16, 16, 16), 0.5, seed=3)({"image": image, "label": label})
    b = train_augmentation((16, 16, 16), 0.5, seed=3)({"image": image, "label": label})
    c = train_augmentation((16, 16, 16), 0.5, seed=4)({"image": image, "label": label})
    assert tuple(a["image"].shape) == (4, 16, 16, 16) and tuple(a["label"].shape) == (3, 16, 16, 16)
    assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
    assert not torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(c["image"]))


def test_foreground_crop_contains_tumor_voxel():
    label = np.zeros((3, 40, 40, 40), np.uint8)
    label[:, 37, 2, 20] = 1  # near a corner: the window must be clipped, not shifted off the voxel
    crop = ForegroundBiasedCropd(["label"], "label", (8, 8, 8), foreground_prob=1.0)
    crop.set_random_state(0)
    for _ in range(20):
        assert crop({"label": label})["label"].sum() == 3
    with pytest.raises(ValueError, match="probability"):
        ForegroundBiasedCropd(["label"], "label", (8, 8, 8), foreground_prob=1.5)


# ----------------------------------------------------------------------------- dataset


def test_patch_shapes_and_types(tmp_path):
    ds = PatientDataset(make_cases(tmp_path), PATCH, progress=False)
    assert len(ds) == 3 and ds.skipped == []
    image, regions = ds[0]
    assert image.shape == (4, *PATCH) and image.dtype == torch.float32
    assert regions.shape == (3, *PATCH) and regions.dtype == torch.float32
    assert set(regions.unique().tolist()) <= {0.0, 1.0}
    big = PatientDataset(ds.cases, (32, 32, 32), progress=False)  # larger than the cropped volume: padded
    assert big[1][0].shape == (4, 32, 32, 32)


def test_foreground_bias(tmp_path):
    cases = make_cases(tmp_path)
    always = PatientDataset(cases, (8, 8, 8), foreground_prob=1.0, progress=False)
    assert all(always[i % 3][1][REGIONS.index("WT")].sum() > 0 for i in range(30))
    never = PatientDataset(cases, (8, 8, 8), foreground_prob=0.0, augment=False, progress=False)
    hits = sum(never[i % 3][1].sum() > 0 for i in range(60))
    assert hits < 60  # uniform crops miss the tumor sometimes: the bias above is real


def test_skipped_cases_are_recorded_and_logged(tmp_path, caplog):
    cases = make_cases(tmp_path, n=2)
    bad = find_case(write_case(tmp_path, case_id_for(9), arrays={"t1": np.zeros(SHAPE, np.int16)}))
    no_seg = find_case(write_case(tmp_path, case_id_for(10), seg=False))
    with caplog.at_level(logging.WARNING, logger="fedbrats.shared.data.dataset"):
        ds = PatientDataset([*cases, bad, no_seg], PATCH, progress=False)
    assert ds.case_ids() == [c.case_id for c in cases]
    assert {p.case_id for p in ds.skipped} == {case_id_for(9), case_id_for(10)}
    assert case_id_for(9) in caplog.text and case_id_for(10) in caplog.text
    # without a cache only headers are checked up front: corrupt data fails loudly on access
    lazy = PatientDataset([*cases, bad, no_seg], PATCH, cache=None, progress=False)
    assert [p.case_id for p in lazy.skipped] == [case_id_for(10)]
    with pytest.raises(CaseError, match="every voxel is zero"):
        lazy[lazy.case_ids().index(case_id_for(9))]


def test_disk_cache_reuse_and_invalidation(tmp_path):
    cases = make_cases(tmp_path / "data", n=2)
    cache_dir = tmp_path / "cache"
    ds = PatientDataset(cases, PATCH, cache="disk", cache_dir=cache_dir, progress=False)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 6 and not any(f.endswith(".tmp") for f in files)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    again = PatientDataset(cases, PATCH, cache="disk", cache_dir=cache_dir, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == stamps  # reused, not rewritten
    np.testing.assert_array_equal(again.volume(0)[0], ds.volume(0)[0])

    # rewrite one case's t1 with other intensities: its cache must be rebuilt, the other one kept
    t1 = cases[0].files["t1"]
    img = nib.load(t1)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2, img.affine, img.header), t1)
    os.utime(t1, ns=(0, 10**18))
    rebuilt = PatientDataset(cases, PATCH, cache="disk", cache_dir=cache_dir, progress=False)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 6 and names != files  # stale entry replaced, not accumulated
    kept = [n for n in names if n.startswith(cases[1].case_id)]
    assert all(stamps[n] == (cache_dir / n).stat().st_mtime_ns for n in kept)
    image, regions, spacing = rebuilt.volume(0)
    assert image.dtype == np.float32 and regions.dtype == np.uint8 and spacing == (1.0, 1.0, 1.0)


def test_caches_give_identical_patches(tmp_path):
    cases = make_cases(tmp_path / "data", n=2)
    kinds = [
        PatientDataset(cases, PATCH, cache=c, cache_dir=tmp_path / "cache", seed=5, progress=False)
        for c in ("memory", "disk", None)
    ]
    for i in range(4):
        ref = kinds[0][i % 2]
        for ds in kinds[1:]:
            got = ds[i % 2]
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_seed_determinism(tmp_path):
    cases = make_cases(tmp_path)
    a = PatientDataset(cases, PATCH, seed=1, progress=False)
    b = PatientDataset(cases, PATCH, seed=1, progress=False)
    c = PatientDataset(cases, PATCH, seed=2, progress=False)
    seq = [a[i % 3][0] for i in range(6)]
    assert all(torch.equal(x, b[i % 3][0]) for i, x in enumerate(seq))
    assert not all(torch.equal(x, c[i % 3][0]) for i, x in enumerate(seq))
    a.reseed(1)
    assert torch.equal(a[0][0], seq[0])


def test_dataset_pickles_for_workers(tmp_path):
    ds = PatientDataset(
        make_cases(tmp_path, n=2), PATCH, cache="disk", cache_dir=tmp_path / "c", progress=False
    )
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], ds[0][0])


def test_validation_volume(tmp_path):
    ds = PatientDataset(make_cases(tmp_path, n=1), PATCH, progress=False)
    image, regions, spacing = ds.volume(0)
    assert image.shape[0] == 4 and regions.shape[0] == 3 and image.shape[1:] == regions.shape[1:]
    assert regions[REGIONS.index("WT")].sum() > 0 and spacing == (1.0, 1.0, 1.0)


def test_bad_arguments(tmp_path):
    cases = make_cases(tmp_path, n=1)
    with pytest.raises(ValueError, match="cache_dir"):
        PatientDataset(cases, PATCH, cache="disk")
    with pytest.raises(ValueError, match="expected 'memory'"):
        PatientDataset(cases, PATCH, cache="ram")
