"""HD95 in both definitions: a hand-computed example, MedPy's formula and MONAI's, empty masks, config."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from fedbrats.shared.config import CHOICES, RunConfig
from fedbrats.shared.constants import BRATS_SHAPE
from fedbrats.shared.evaluation.metrics import hd95, hd95_note, region_metrics
from fedbrats.shared.evaluation.surface import DEFAULT_HD95, HD95_DEFINITIONS, hd95_of, surface

torch.set_num_threads(1)


def medpy_hd95(result: np.ndarray, reference: np.ndarray, voxelspacing) -> float:
    """MedPy's `hd95` (medpy.metric.binary), written out independently: full volume, no cropping."""

    def surface_distances(a, b):
        footprint = ndimage.generate_binary_structure(a.ndim, 1)
        a_border = a ^ ndimage.binary_erosion(a, structure=footprint, iterations=1)
        b_border = b ^ ndimage.binary_erosion(b, structure=footprint, iterations=1)
        return ndimage.distance_transform_edt(~b_border, sampling=voxelspacing)[a_border]

    return float(
        np.percentile(
            np.hstack((surface_distances(result, reference), surface_distances(reference, result))), 95
        )
    )


def column(length: int, start: int, stop: int) -> np.ndarray:
    """A one-voxel-thick line of voxels start..stop-1 along x: every voxel is surface."""
    mask = np.zeros((length, 1, 1), bool)
    mask[start:stop] = True
    return mask


def blobs(rng: np.random.Generator, shape, sigma=2.0, level=0.6) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


def test_hand_computed_far_voxel_separates_the_definitions():
    """Truth x=0..9, prediction the same plus a lone voxel at x=29 (spacing 2 mm along x).

    pred -> truth: ten 0s and one 2 x (29 - 9) = 40 mm; truth -> pred: ten 0s.
    pooled: 21 values, 95th percentile at index 0.95 x 20 = 19 of the sorted list -> 0.
    max: pred -> truth's 95th percentile at index 0.95 x 10 = 9.5, halfway between 0 and 40 -> 20 mm.
    """
    truth, pred = column(30, 0, 10), column(30, 0, 10)
    pred[29] = True
    spacing = (2.0, 1.0, 1.0)
    assert hd95(pred, truth, spacing, "pooled") == pytest.approx(0.0)
    assert hd95(pred, truth, spacing, "max") == pytest.approx(20.0)
    assert hd95(pred, truth, spacing) == hd95(pred, truth, spacing, "pooled")  # the default


def test_hand_computed_shift_where_pooled_is_the_larger():
    """Truth x=0..9, prediction x=2..11 (1 mm). Each direction: eight 0s, then 1 and 2 mm.

    directed: index 0.95 x 9 = 8.55 -> 1 + 0.55 = 1.55 both ways, so max = 1.55.
    pooled: sixteen 0s, two 1s, two 2s; index 0.95 x 19 = 18.05 -> 2.
    """
    truth, pred = column(14, 0, 10), column(14, 2, 12)
    assert hd95(pred, truth, (1, 1, 1), "max") == pytest.approx(1.55)
    assert hd95(pred, truth, (1, 1, 1), "pooled") == pytest.approx(2.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.8, 1.2, 2.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_matches_medpy_formula(seed, spacing):
    rng = np.random.default_rng(seed)
    pred, truth = blobs(rng, (36, 32, 20)), blobs(rng, (36, 32, 20))
    assert hd95(pred, truth, spacing) == pytest.approx(medpy_hd95(pred, truth, spacing), rel=1e-9)


@pytest.mark.slow  # importing MONAI takes 10-40 s on a loaded 2-core machine
def test_max_matches_monai():
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(7)
    for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)]:
        pred, truth = blobs(rng, (30, 28, 18)), blobs(rng, (30, 28, 18))
        p, t = (torch.from_numpy(m)[None, None] for m in (pred, truth))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            monai = float(
                compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
            )
        assert hd95(pred, truth, spacing, "max") == pytest.approx(monai, rel=1e-5)


def test_masks_on_the_image_border_count_the_border_as_surface():
    """A mask filling the whole array has only border voxels as surface (MedPy erodes with background outside)."""
    full = np.ones((5, 5, 5), bool)
    assert surface(full).sum() == 5**3 - 3**3
    pred = full.copy()
    pred[0] = False  # the x=0 face moves in by one voxel
    assert hd95(pred, full, (1, 1, 1)) == pytest.approx(medpy_hd95(pred, full, (1, 1, 1)))


@pytest.mark.parametrize("definition", HD95_DEFINITIONS)
def test_empty_masks_follow_the_captk_convention_in_both_definitions(definition):
    empty = np.zeros(BRATS_SHAPE, bool)
    one = empty.copy()
    one[100:110, 100:110, 70:80] = True
    assert hd95(empty, empty, (1, 1, 1), definition) == 0.0
    assert hd95(one, empty, (1, 1, 1), definition) == pytest.approx(373.13, abs=0.01)
    assert hd95(empty, one, (1, 1, 1), definition) == pytest.approx(373.13, abs=0.01)


def test_region_metrics_and_notes_name_the_definition():
    rng = np.random.default_rng(3)
    pred = np.stack([blobs(rng, (20, 20, 12)) for _ in range(3)])
    truth = np.stack([blobs(rng, (20, 20, 12)) for _ in range(3)])
    for definition in HD95_DEFINITIONS:
        result = region_metrics(pred, truth, (1, 1, 2), hd95_definition=definition)
        assert result["ET"]["hd95"] == pytest.approx(hd95_of(pred[0], truth[0], (1, 1, 2), definition))
    with pytest.raises(ValueError, match="'median'.*pooled, max"):
        region_metrics(pred, truth, hd95_definition="median")
    assert hd95_note().startswith("HD95 pooled: 95th percentile of both directions")
    assert "MONAI" in hd95_note("max")


def test_run_config_field_defaults_to_pooled_and_rejects_others():
    assert (
        CHOICES["hd95_definition"] == HD95_DEFINITIONS
        and RunConfig().hd95_definition == DEFAULT_HD95 == "pooled"
    )
    assert RunConfig.from_flower({"hd95-definition": "max"}).hd95_definition == "max"
    with pytest.raises(ValueError, match="hd95-definition"):
        RunConfig(hd95_definition="mean")
