"""Ensembles of checkpoints in `fedbrats predict`: the mean of the members' probabilities, their spread,
different networks together, and the refusals (a classifier among segmenters, a checkpoint twice)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fedbrats.cli import main
from fedbrats.shared.checkpoint import CheckpointError, save_checkpoint
from fedbrats.shared.data.cases import find_case
from fedbrats.shared.data.transforms import preprocess
from fedbrats.shared.data.volumes import load_case
from fedbrats.shared.evaluation.ensemble import check_members, load_members, predict_ensemble
from fedbrats.shared.evaluation.inference import (
    Predictor,
    mean_probabilities,
    predict_case,
    predict_probabilities,
    spread_map,
)
from fedbrats.shared.evaluation.postprocess import uncertainty
from fedbrats.shared.models import create_model

from .test_inference import SHAPE, _write_case


@pytest.fixture
def two_networks(tmp_path) -> tuple[Path, Path, Path]:
    """A case, a 3D resunet checkpoint (patch 16) and a 2D resfcn2d checkpoint (patch 8)."""
    folder, _ = _write_case(tmp_path / "data")
    torch.manual_seed(0)
    unet = create_model("resunet", width=8, depth=2)
    with torch.no_grad():
        unet.head.bias.copy_(torch.tensor([-0.2, 0.1, 0.4]))  # some voxels in each region
    a = save_checkpoint(tmp_path / "unet.safetensors", unet, extra={"patch_size": [16, 16, 16]})
    torch.manual_seed(1)
    fcn = create_model("resfcn2d", width=8, depth=2)
    with torch.no_grad():
        fcn.net.head.bias.copy_(torch.tensor([0.0, 0.3, 0.6, 0.2]))  # some tumor labels too
    b = save_checkpoint(tmp_path / "fcn.safetensors", fcn, extra={"patch_size": [8, 8, 8]})
    return folder, a, b


def _image(folder: Path):
    volume = load_case(find_case(folder), with_labels=False)
    image, _, box = preprocess(volume)
    return torch.as_tensor(image), box


def test_ensemble_probabilities_are_the_mean_of_the_members(two_networks):
    folder, a, b = two_networks
    members = load_members([a, b])
    assert [m.source for m in members] == [f"{a} (resunet)", f"{b} (resfcn2d)"]
    assert [m.patch_size for m in members] == [(16, 16, 16), (8, 8, 8)]  # each predicts with its own patch
    image, _ = _image(folder)
    mean, std = mean_probabilities(members, image, tta=False)
    alone = [predict_probabilities(m.model, image, patch_size=m.patch_size, tta=False) for m in members]
    assert mean.shape == (3, *image.shape[1:])
    assert torch.allclose(mean, (alone[0] + alone[1]) / 2, atol=1e-6)
    assert torch.allclose(std, (alone[0] - alone[1]).abs() / 2, atol=1e-6)
    assert float(std.max()) > 0.01  # two different networks do disagree


def test_running_mean_and_spread_match_the_stacked_ones():
    image = torch.randn(4, 8, 8, 8)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(Predictor(nn.Conv3d(4, 3, 3, padding=1), (8, 8, 8)))
    mean, std = mean_probabilities(members, image, tta=False)
    stacked = torch.stack(
        [predict_probabilities(m.model, image, patch_size=(8, 8, 8), tta=False) for m in members]
    )
    assert torch.allclose(mean, stacked.mean(0), atol=1e-6)
    assert torch.allclose(std, stacked.std(0, correction=0), atol=1e-6)
    one_mean, one_std = mean_probabilities(members[:1], image, tta=False)
    assert one_std is None and torch.equal(one_mean, stacked[0])


def test_spread_map_scale():
    assert spread_map(torch.tensor([0.0, 0.1, 0.25, 0.5, 0.6])).tolist() == [0, 20, 50, 100, 100]


def test_predict_case_writes_the_ensemble_of_two_networks(two_networks, tmp_path):
    folder, a, b = two_networks
    written = predict_ensemble([a, b], folder, tmp_path / "out", tta=False, device="cpu")
    regions = ("ET", "TC", "WT")
    assert set(written) == {
        "labels",
        "overlay",
        *(f"{k}_{r}" for k in ("uncertainty", "spread") for r in regions),
    }
    image, box = _image(folder)
    members = load_members([a, b])
    alone = [predict_probabilities(m.model, image, patch_size=m.patch_size, tta=False) for m in members]
    mean = (alone[0] + alone[1]) / 2
    expected_unc = box.uncrop(np.rint(uncertainty(mean)).astype(np.uint8))
    expected_spread = box.uncrop(spread_map((alone[0] - alone[1]).abs() / 2))
    for i, region in enumerate(regions):
        unc = np.asarray(nib.load(written[f"uncertainty_{region}"]).dataobj)
        spread = np.asarray(nib.load(written[f"spread_{region}"]).dataobj)
        assert unc.shape == spread.shape == SHAPE
        assert np.abs(unc.astype(int) - expected_unc[i]).max() <= 1  # the TuNet map of the MEAN probability
        assert np.abs(spread.astype(int) - expected_spread[i]).max() <= 1
    labels = np.asarray(nib.load(written["labels"]).dataobj)
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1, 2, 4}
    single = predict_case(a, folder, tmp_path / "one", tta=False, device="cpu")  # one checkpoint: as before
    assert set(single) == {"labels", "overlay", *(f"uncertainty_{r}" for r in regions)}


def test_the_command_takes_repeated_checkpoints(two_networks, tmp_path, capsys):
    folder, a, b = two_networks
    argv = ["predict", "--checkpoint", str(a), "--checkpoint", str(b), "--case", str(folder),
            "--out", str(tmp_path / "cli"), "--no-tta", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 2 checkpoints" in printed and "spread_WT:" in printed
    assert (tmp_path / "cli" / f"{folder.name}_spread_WT.nii.gz").is_file()


def test_a_classifier_is_not_mixed_with_segmenters_nor_a_checkpoint_repeated(two_networks, tmp_path, capsys):
    folder, a, _ = two_networks
    classifier = save_checkpoint(tmp_path / "grade.safetensors", create_model("resclassifier", width=8, depth=2),
                                 extra={"task": "classification", "classes": ["HGG", "LGG"]})  # fmt: skip
    with pytest.raises(CheckpointError, match="cannot mix a case classifier"):
        check_members([a, classifier])
    with pytest.raises(CheckpointError, match="segmentation checkpoints only"):
        check_members([classifier, _copy(classifier)])
    with pytest.raises(ValueError, match="given twice"):
        check_members([a, a])
    with pytest.raises(CheckpointError, match="case classifier"):
        load_members([classifier])
    argv = ["predict", "--checkpoint", str(a), "--checkpoint", str(classifier), "--case", str(folder),
            "--out", str(tmp_path / "x"), "--no-tta", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "cannot mix a case classifier" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything ran


def _copy(path: Path) -> Path:
    other = path.with_name("other_" + path.name)
    other.write_bytes(path.read_bytes())
    return other
