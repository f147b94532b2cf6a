"""The profile head of the multi-task U-Nets: class logits from the segmented tumour's label fractions
and intensities (shared.models.classifier.tumour_profile), read from the segmentation, never training it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedbrats.shared.config import RunConfig
from fedbrats.shared.models import count_parameters, create_model
from fedbrats.shared.models.classifier import PROFILE_FEATURES, ProfileHead, tumour_profile

from . import model_checks as checks

TINY = {"width": 8, "depth": 2}


def _hand_built_tumour(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4x4 volume (plus `pad` background voxels each side): 8 WT voxels, 4 of them TC, 2 of those ET.
    Modality c reads c + 1 in the core and -(c + 1) in the edema."""
    n = 4 + 2 * pad
    regions = torch.zeros(1, 3, n, n, n)
    image = torch.zeros(1, 4, n, n, n)
    wt = [(pad + i, pad, pad) for i in range(4)] + [(pad + i, pad + 1, pad) for i in range(4)]
    for k, (x, y, z) in enumerate(wt):
        regions[0, 2, x, y, z] = 1
        core, enhancing = k < 4, k < 2
        regions[0, 1, x, y, z] = float(core)
        regions[0, 0, x, y, z] = float(enhancing)
        for c in range(4):
            image[0, c, x, y, z] = (c + 1) if core else -(c + 1)
    return image, regions


def test_profile_of_a_hand_built_tumour():
    image, regions = _hand_built_tumour()
    profile = tumour_profile(image, regions)[0]
    assert profile.shape == (len(PROFILE_FEATURES),) == (12,)
    got = dict(zip(PROFILE_FEATURES, profile.tolist(), strict=True))
    expected = {"ET/WT": 2 / 8, "NCR/WT": 2 / 8, "ED/WT": 4 / 8, "ET/TC": 2 / 4}
    expected |= {f"{m}_in_TC": c + 1 for c, m in enumerate(("t1", "t1ce", "t2", "flair"))}
    expected |= {f"{m}_in_ED": -(c + 1) for c, m in enumerate(("t1", "t1ce", "t2", "flair"))}
    assert got == pytest.approx(expected, abs=1e-5)
    # scale-free: the same tumour seen in a larger patch (more background) has the same profile
    assert torch.allclose(tumour_profile(*_hand_built_tumour(pad=3))[0], profile, atol=1e-5)
    # no tumour at all: finite features (zeros), not NaN
    empty = tumour_profile(torch.randn(2, 4, 4, 4, 4), torch.zeros(2, 3, 4, 4, 4))
    assert torch.isfinite(empty).all() and empty.abs().max() < 1e-3
    with pytest.raises(ValueError, match="region probabilities"):
        tumour_profile(image, regions[:, :2])
    with pytest.raises(ValueError, match="do not match"):
        tumour_profile(image[..., :3], regions)


@pytest.mark.parametrize("model_name", ["selfensemble", "resunet"])
def test_profile_head_reads_the_segmentation_and_never_trains_it(model_name):
    torch.manual_seed(0)
    model = create_model(model_name, **TINY, n_classes=2, class_head="profile", deep_supervision=True)
    assert isinstance(model.class_head, ProfileHead) and model.config["class_head"] == "profile"
    plain = create_model(model_name, **TINY, deep_supervision=True)
    assert count_parameters(model) - count_parameters(plain) == len(PROFILE_FEATURES) * 2 + 2
    x = torch.randn(2, 4, 16, 16, 16)
    segmentation, logits = model.train()(x)
    assert torch.equal(logits, torch.zeros(2, 2)), "a zero-initialised head: every class equally likely"
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()  # the class loss alone
    assert model.class_head.linear.weight.grad.abs().sum() > 0
    untouched = [n for n, p in model.named_parameters() if not n.startswith("class_head") and p.grad is not None]
    assert not untouched, f"the class loss reached the segmentation: {untouched[:3]}"
    model.eval()
    regions, logits = model(x)
    assert regions.shape == (2, 3, 16, 16, 16) and logits.shape == (2, 2)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_profile_head_has_per_sample_gradients(mode):
    """DP-SGD: Opacus computes each case's gradient of the head as the case alone would give it."""
    torch.manual_seed(0)
    model = create_model("selfensemble", **TINY, n_classes=2, class_head="profile")
    with torch.no_grad():
        model.class_head.linear.weight.normal_()  # away from zero, so the gradients differ by case
    checks.assert_opacus_valid(model)

    def loss_of(out, y):
        return F.cross_entropy(out[1], y) + torch.sigmoid(out[0]).mean()

    checks.assert_per_sample_gradients(model, loss_of, torch.randn(2, 4, 8, 8, 8), torch.tensor([0, 1]), mode)


def test_class_head_is_a_run_configuration_key():
    config = RunConfig(task="multitask", model_class_head="profile", model="selfensemble")
    assert config.model_config["class_head"] == "profile"
    with pytest.raises(ValueError, match="model-class-head"):
        RunConfig.from_flower({"model-class-head": "pooled"})
    with pytest.raises(ValueError, match="class_head must be one of bottleneck, profile"):
        create_model("selfensemble", **TINY, class_head="pooled")
