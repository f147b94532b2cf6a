"""Inference: sliding window + flip TTA, post-processing, labels, uncertainty, and predict_case files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fedbrats.shared.checkpoint import save_checkpoint
from fedbrats.shared.constants import LABELS_2021, LABELS_2023, LABELS_2024, MODALITIES, REGIONS
from fedbrats.shared.evaluation.inference import (
    TTA_FLIPS,
    predict_case,
    predict_logits,
    predict_probabilities,
)
from fedbrats.shared.evaluation.postprocess import postprocess, uncertainty
from fedbrats.shared.labels import labels_to_regions, regions_to_labels
from fedbrats.shared.models import create_model


def _conv(kernel: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv3d(4, 3, kernel, padding=kernel // 2)


def test_probabilities_have_the_image_shape_for_any_size():
    torch.manual_seed(0)
    model = create_model("resunet", width=8, depth=2)
    image = torch.randn(4, 19, 16, 23)  # not multiples of the patch, one axis smaller than it
    for tta in (False, True):
        probs = predict_probabilities(model, image, patch_size=(16, 16, 16), tta=tta)
        assert probs.shape == (3, 19, 16, 23) and probs.dtype == torch.float32
        assert float(probs.min()) >= 0.0 and float(probs.max()) <= 1.0
    assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match=r"\[4, X, Y, Z\]"):
        predict_probabilities(model, torch.randn(3, 8, 8, 8), patch_size=(8, 8, 8))


def test_tta_averages_flipped_logits_before_the_sigmoid():
    model = _conv(3).eval()
    image = torch.randn(4, 12, 10, 8)
    # one window covering the whole image: the sliding window returns the model output unchanged
    with torch.no_grad():
        logits = [torch.flip(model(torch.flip(image[None], [a + 2 for a in f])), [a + 2 for a in f])[0] for f in TTA_FLIPS]
    expected = torch.sigmoid(torch.stack(logits).mean(0))
    got = predict_probabilities(model, image, patch_size=(12, 10, 8), tta=True)
    assert len(TTA_FLIPS) == 8
    assert torch.allclose(got, expected, atol=1e-5)
    plain = predict_probabilities(model, image, patch_size=(12, 10, 8), tta=False)
    assert not torch.allclose(plain, got, atol=1e-3)  # a 3x3x3 conv is not flip-invariant
    # averaging probabilities instead would differ
    assert not torch.allclose(torch.stack([torch.sigmoid(x) for x in logits]).mean(0), got, atol=1e-4)


def test_tta_changes_nothing_for_a_flip_equivariant_model():
    model = _conv(1)  # a 1x1x1 conv commutes with flips
    image = torch.randn(4, 20, 20, 20)
    with_tta = predict_logits(model, image, patch_size=(16, 16, 16), tta=True)
    without = predict_logits(model, image, patch_size=(16, 16, 16), tta=False)
    assert torch.allclose(with_tta, without, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(without, model(image[None])[0], atol=1e-5)  # gaussian blending of a pointwise model


def _ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0)) <= radius


def test_postprocess_turns_small_et_into_core_and_nests_regions():
    shape = (30, 30, 30)
    wt = _ball(shape, (15, 15, 15), 10)
    tc = _ball(shape, (15, 15, 15), 6)
    small_et = _ball(shape, (15, 15, 15), 1)  # 7 voxels
    regions = np.stack([small_et, tc, wt])
    out = postprocess(regions, min_et_voxels=500)
    assert not out[0].any()
    assert np.array_equal(out[1], tc) and np.array_equal(out[2], wt)
    assert set(np.unique(regions_to_labels(out, LABELS_2021))) == {0, 1, 2}  # former ET is now core (1)
    big_et = _ball(shape, (15, 15, 15), 5.5)  # ~700 voxels
    kept = postprocess(np.stack([big_et, tc, wt]), min_et_voxels=500)
    assert np.array_equal(kept[0], big_et)
    stray = np.zeros(shape, bool)
    stray[0, 0, 0] = True  # ET outside TC and WT: nesting puts it in both
    nested = postprocess(np.stack([big_et | stray, tc, wt]), min_et_voxels=1)
    assert nested[1, 0, 0, 0] and nested[2, 0, 0, 0]


@pytest.mark.parametrize(("label_set", "et"), [(LABELS_2021, 4), (LABELS_2023, 3), (LABELS_2024, 3)])
def test_regions_to_labels_for_each_label_set(label_set, et):
    seg = np.zeros((6, 5, 4), np.uint8)
    seg[1:5, 1:4, 1:3] = 2
    seg[2:4, 2, 1:3] = 1
    seg[3, 2, 2] = et
    regions = labels_to_regions(seg, label_set)
    assert np.array_equal(regions_to_labels(regions, label_set), seg)
    assert np.array_equal(regions_to_labels(regions, label_set.name), seg)  # by name too
    assert regions_to_labels(regions, label_set).dtype == np.uint8
    with pytest.raises(ValueError, match="unknown label set"):
        regions_to_labels(regions, "brats1999")


def test_uncertainty_formula_and_range():
    p = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], np.float32).reshape(1, 7, 1, 1).repeat(3, 0)
    u = uncertainty(p)
    assert np.allclose(u[0].ravel(), [0, 20, 50, 100, 50, 20, 0], atol=1e-4)
    rand = uncertainty(torch.rand(3, 8, 8, 8))
    assert rand.shape == (3, 8, 8, 8) and rand.min() >= 0 and rand.max() <= 100


# --- predict_case on a real folder ----------------------------------------------------------------

SHAPE = (27, 22, 19)


def _write_case(root, case_id="BraTS2021_00001"):
    """A case with an oblique affine, 1.5 mm voxels and a zero border (so the crop box matters)."""
    folder = root / case_id
    folder.mkdir(parents=True)
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) * 1.5
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = (20.0, -15.0, 7.5)
    rng = np.random.default_rng(0)
    brain = _ball(SHAPE, (14, 11, 9), 8)
    for k, m in enumerate(MODALITIES):
        data = np.where(brain, 200 + 50 * k + rng.normal(0, 10, SHAPE), 0).astype(np.int16)
        img = nib.Nifti1Image(data, affine)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, folder / f"{case_id}_{m}.nii.gz")
    return folder, affine


def test_predict_case_writes_files_with_the_input_geometry(tmp_path):
    folder, affine = _write_case(tmp_path / "data")
    torch.manual_seed(0)
    model = create_model("resunet", width=8, depth=2)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([-0.2, 0.1, 0.4]))  # some voxels in each region
    ckpt = save_checkpoint(tmp_path / "c.safetensors", model, extra={"patch_size": [16, 16, 16]})
    written = predict_case(ckpt, folder, tmp_path / "out", tta=False, device="cpu")
    assert set(written) == {"labels", "uncertainty_ET", "uncertainty_TC", "uncertainty_WT", "overlay"}
    pred = nib.load(written["labels"])
    assert pred.shape == SHAPE
    assert np.allclose(pred.affine, affine)
    assert np.allclose(pred.header.get_sform(), affine) and int(pred.header["sform_code"]) == 1
    assert np.allclose(pred.header.get_zooms()[:3], (1.5, 1.5, 1.5))
    assert pred.get_data_dtype() == np.uint8
    labels = np.asarray(pred.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert labels[0, 0, 0] == 0  # outside the crop box: background
    for region in REGIONS:
        unc = nib.load(written[f"uncertainty_{region}"])
        assert unc.shape == SHAPE and unc.get_data_dtype() == np.uint8
        assert np.asarray(unc.dataobj).max() <= 100
    assert written["overlay"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_case_needs_a_patch_size_in_the_checkpoint(tmp_path):
    folder, _ = _write_case(tmp_path / "data")
    ckpt = save_checkpoint(tmp_path / "c.safetensors", create_model("resunet", width=8, depth=2))
    with pytest.raises(ValueError, match="patch_size"):
        predict_case(ckpt, folder, tmp_path / "out")
