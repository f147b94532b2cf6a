"""Region metrics against independent numpy/scipy references, and the empty-mask convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from fedbrats.shared.constants import BRATS_SHAPE, REGIONS
from fedbrats.shared.evaluation.metrics import (
    binary_metrics,
    hd95,
    image_diagonal,
    mean_over_cases,
    region_metrics,
)

# ---- independent references (full-volume EDT, no cropping, no MONAI) -------------------------


def ref_surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def ref_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of a to the nearest surface voxel of b."""
    return ndimage.distance_transform_edt(~ref_surface(b), sampling=spacing)[ref_surface(a)]


def ref_hd95(a, b, spacing) -> float:
    return max(np.percentile(ref_directed(a, b, spacing), 95), np.percentile(ref_directed(b, a, spacing), 95))


def ref_hd95_pooled(a, b, spacing) -> float:
    """MedPy's convention: one 95th percentile over both directions' distances."""
    return float(
        np.percentile(np.concatenate([ref_directed(a, b, spacing), ref_directed(b, a, spacing)]), 95)
    )


def ref_counts(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    tp, fp = np.sum(p & t), np.sum(p & ~t)
    fn, tn = np.sum(~p & t), np.sum(~p & ~t)
    return {"dice": 2 * tp / (2 * tp + fp + fn), "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp)}


def blobs(rng: np.random.Generator, shape, sigma=2.0, level=0.6) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


# ---- agreement with the references ------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.8, 1.2, 2.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_reference(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (36, 32, 20)
    pred = np.stack([blobs(rng, shape) for _ in REGIONS])
    truth = np.stack([blobs(rng, shape) for _ in REGIONS])
    result = region_metrics(pred, truth, spacing, hd95_definition="max")
    assert list(result) == list(REGIONS)
    for i, region in enumerate(REGIONS):
        expected = ref_counts(pred[i], truth[i])
        for metric in ("dice", "sensitivity", "specificity"):
            assert result[region][metric] == pytest.approx(expected[metric], rel=1e-12)
        assert result[region]["hd95"] == pytest.approx(ref_hd95(pred[i], truth[i], spacing), rel=1e-5)


def test_masks_touching_the_border_and_overlapping_partly():
    shape = (20, 20, 12)
    truth = np.zeros(shape, bool)
    truth[:8, 5:15, :] = True  # touches three faces of the image
    pred = np.zeros(shape, bool)
    pred[3:12, 6:18, 2:] = True
    for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)]:
        assert hd95(pred, truth, spacing, "max") == pytest.approx(ref_hd95(pred, truth, spacing), rel=1e-5)
        assert hd95(pred, truth, spacing) == pytest.approx(ref_hd95_pooled(pred, truth, spacing), rel=1e-5)


def test_default_is_pooled_and_max_is_the_larger_directed_percentile():
    """A prediction with a far-away false positive: the two definitions differ; the default is MedPy's pooled."""
    shape = (48, 48, 48)
    g = np.indices(shape)
    truth = ((g - 24) ** 2).sum(0) < 12**2
    pred = truth.copy()
    pred[2:8, 2:8, 2:8] = True  # distant blob: few surface voxels, large distances
    directed, pooled = ref_hd95(pred, truth, (1, 1, 1)), ref_hd95_pooled(pred, truth, (1, 1, 1))
    assert abs(directed - pooled) > 2.0  # the example really separates the conventions
    assert hd95(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(pooled, rel=1e-5)
    assert hd95(pred, truth, (1.0, 1.0, 1.0), "max") == pytest.approx(directed, rel=1e-5)


# ---- edge cases: the CaPTk/FeTS convention -----------------------------------------------------


def test_brats_diagonal():
    assert image_diagonal(BRATS_SHAPE, (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.01)


def test_both_empty():
    empty = np.zeros((3, 8, 8, 8), bool)
    for metrics in region_metrics(empty, empty).values():
        assert metrics == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}


@pytest.mark.parametrize("empty_side", ["pred", "truth"])
def test_exactly_one_empty_gives_zero_dice_and_the_diagonal(empty_side):
    shape, spacing = (10, 12, 6), (1.0, 1.0, 3.0)
    mask = np.zeros((3, *shape), bool)
    mask[:, 4:6, 4:7, 2:4] = True
    empty = np.zeros_like(mask)
    pred, truth = (empty, mask) if empty_side == "pred" else (mask, empty)
    diagonal = math.sqrt(10**2 + 12**2 + 18**2)
    for metrics in region_metrics(pred, truth, spacing).values():
        assert metrics["dice"] == 0.0
        assert metrics["hd95"] == pytest.approx(diagonal)
        assert metrics["sensitivity"] == 0.0
        n = mask[0].size
        expected_spec = 1.0 if empty_side == "pred" else (n - 12) / n
        assert metrics["specificity"] == pytest.approx(expected_spec)


def test_single_voxel_identical_and_shifted_along_the_thick_axis():
    a = np.zeros((9, 9, 9), bool)
    a[4, 4, 2] = True
    assert binary_metrics(a, a, (1, 1, 3)) == {
        "dice": 1.0,
        "hd95": 0.0,
        "sensitivity": 1.0,
        "specificity": 1.0,
    }
    b = np.zeros_like(a)
    b[4, 4, 5] = True  # three slices away at 3 mm
    m = binary_metrics(a, b, (1, 1, 3))
    assert m["dice"] == 0.0 and m["sensitivity"] == 0.0
    assert m["hd95"] == pytest.approx(9.0)


def test_identical_masks():
    rng = np.random.default_rng(5)
    mask = np.stack([blobs(rng, (24, 24, 16)) for _ in REGIONS])
    for metrics in region_metrics(mask, mask, (1.0, 1.0, 3.0)).values():
        assert metrics == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}


def test_accepts_torch_and_0_1_arrays():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    pred = np.stack([blobs(rng, (16, 16, 16)) for _ in REGIONS])
    truth = np.stack([blobs(rng, (16, 16, 16)) for _ in REGIONS])
    expected = region_metrics(pred, truth)
    assert region_metrics(torch.from_numpy(pred), torch.from_numpy(truth.astype(np.uint8))) == expected


# ---- aggregation and bad input ---------------------------------------------------------------------


def test_mean_over_cases():
    a = {r: {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0} for r in REGIONS}
    b = {r: {"dice": 0.0, "hd95": 10.0, "sensitivity": 0.5, "specificity": 0.0} for r in REGIONS}
    mean = mean_over_cases([a, b, b])
    assert mean["ET"] == pytest.approx(
        {"dice": 1 / 3, "hd95": 20 / 3, "sensitivity": 2 / 3, "specificity": 1 / 3}
    )
    with pytest.raises(ValueError, match="at least one"):
        mean_over_cases([])
    with pytest.raises(ValueError, match="case 1"):
        mean_over_cases([a, {"ET": a["ET"]}])


def test_bad_inputs_are_named():
    good = np.zeros((3, 4, 4, 4), bool)
    good[:, 1, 1, 1] = True
    with pytest.raises(ValueError, match="REGIONS"):
        region_metrics(good[:2], good[:2])
    with pytest.raises(ValueError, match="differs"):
        region_metrics(good, good[:, :2])
    with pytest.raises(ValueError, match="binary mask.*2"):
        region_metrics(good.astype(np.uint8) * 2, good)
    with pytest.raises(ValueError, match="spacing"):
        region_metrics(good, good, (1.0, 1.0))
