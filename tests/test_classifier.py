"""Case-level classifiers: registry, shapes, Opacus validity, per-sample gradients, the multi-task head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedbrats.shared.models import available_models, count_parameters, create_model
from fedbrats.shared.models.classifier import ClassificationHead, ResClassifier, dp_problem

TINY = {"width": 8, "depth": 2}



def tiny(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resclassifier", **{**TINY, **extra})


def test_registered_by_name_with_plain_config():
    assert {"resclassifier", "densenet121"} <= set(available_models())
    model = tiny(n_classes=3, dropout=0.2)
    assert isinstance(model, ResClassifier) and model.model_name == "resclassifier"
    assert model.config == {
        "in_channels": 4, "n_classes": 3, "width": 8, "depth": 2, "dropout": 0.2, "act": "leakyrelu", "se": False,
    }  # fmt: skip
    assert all(isinstance(v, (int, float, str, bool)) for v in model.config.values())
    rebuilt = create_model(model.model_name, **model.config)
    assert count_parameters(rebuilt) == count_parameters(model)
    assert count_parameters(create_model("resclassifier")) == 892_066  # the number the docstring states
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['classes'\]"):
        create_model("resclassifier", classes=2)


@pytest.mark.parametrize("size", [(16, 16, 16), (12, 10, 9), (32, 24, 16)])
def test_logits_shape_for_any_input_size(size):
    model = tiny(n_classes=3).eval()
    assert model(torch.randn(2, 4, *size)).shape == (2, 3)


def test_bad_input_and_config_are_refused_with_the_reason():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected input \[B, 4, X, Y, Z\], got shape \(2, 3, 8, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("resclassifier", width=12)
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        create_model("resclassifier", n_classes=1)
    with pytest.raises(ValueError, match="dropout"):
        create_model("resclassifier", dropout=1.0)
    with pytest.raises(ValueError, match="depth"):
        create_model("resclassifier", depth=0)


def test_depth_and_width_change_the_network():
    small, deep, wide = tiny(), tiny(depth=3), tiny(width=16)
    assert count_parameters(small) < count_parameters(deep)
    assert count_parameters(small) < count_parameters(wide)
    assert deep.head.in_channels == 32 and wide.head.in_channels == 32  # last level: width * 2^(depth-1)


def test_dropout_only_in_training_mode():
    model = tiny(dropout=0.5)
    x = torch.randn(2, 4, 8, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_opacus_valid_and_no_buffers():
    for model in (create_model("resclassifier"), tiny(se=True, dropout=0.1)):
        assert ModuleValidator.validate(model, strict=True) == []
        assert list(model.buffers()) == []
        assert dp_problem(model) is None


def test_densenet121_is_group_norm_and_dp_valid():
    model = create_model("densenet121", n_classes=3)
    assert model.model_name == "densenet121" and model.config == {
        "in_channels": 4,
        "n_classes": 3,
        "dropout": 0.0,
    }
    assert ModuleValidator.validate(model, strict=True) == []
    assert list(model.buffers()) == [] and dp_problem(model.eval()) is None
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert 11e6 < count_parameters(model) < 11.5e6
    with torch.no_grad():
        assert model(torch.randn(1, 4, 32, 32, 32)).shape == (1, 3)


def test_dp_problem_names_batchnorm():
    from monai.networks.nets import DenseNet

    batchnorm = DenseNet(3, 4, 2, init_features=8, growth_rate=8, block_config=(1, 1), norm="batch")
    reason = dp_problem(batchnorm)
    assert reason is not None and "BatchNorm cannot support training with differential privacy" in reason
    n_batchnorm = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in batchnorm.modules())
    assert f"({n_batchnorm} modules)" in reason and "densenet121" in reason  # how many, what to use instead
    fixed = ModuleValidator.fix(copy.deepcopy(batchnorm))  # Opacus' own converter: GroupNorm instead
    assert dp_problem(fixed) is None


def _per_sample_matches_single_backward(model: torch.nn.Module, mode: str, loss_of) -> None:
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 8)
    y = torch.tensor([0, 1])
    gsm = GradSampleModule(model) if mode == "hooks" else wrap_model(model, mode, loss_reduction="mean")
    loss_of(gsm(x), y).backward()
    for i in range(2):
        reference.zero_grad()
        loss_of(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad_sample.shape[0] == 2, name
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_match_single_sample_backward(mode):
    """What DP-SGD needs: each sample's gradient of the batch loss is the gradient of that sample alone."""
    _per_sample_matches_single_backward(tiny(se=True), mode, F.cross_entropy)


def test_head_pools_any_feature_map():
    head = ClassificationHead(16, n_classes=4)
    assert head(torch.randn(3, 16, 5, 4, 3)).shape == (3, 4)
    assert count_parameters(head) == 16 * 4 + 4
    with pytest.raises(ValueError, match=r"expected a feature map \[B, 16, x, y, z\]"):
        head(torch.randn(3, 8, 5, 4, 3))


class _SegmentAndClassify(torch.nn.Module):
    """How a multi-task U-Net can use the head without touching ResUNet: a hook on the bottleneck."""

    def __init__(self, unet: torch.nn.Module, n_classes: int):
        super().__init__()
        self.unet = unet
        self.head = ClassificationHead(unet.config["width"] * 2 ** (unet.config["depth"] - 1), n_classes)
        self._bottleneck: torch.Tensor | None = None
        unet.encoder[-1].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._bottleneck = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segmentation = self.unet(x)
        return torch.cat([segmentation.flatten(1), self.head(self._bottleneck)], dim=1)


def test_head_on_the_resunet_bottleneck():
    torch.manual_seed(0)
    unet = create_model("resunet", width=8, depth=3)
    joint = _SegmentAndClassify(unet, n_classes=2)
    out = joint(torch.randn(2, 4, 8, 8, 8))
    assert out.shape == (2, 3 * 8**3 + 2)
    F.cross_entropy(out[:, -2:], torch.tensor([0, 1])).backward()  # the classification loss alone
    assert joint.head.linear.weight.grad.abs().sum() > 0
    assert unet.encoder[0].conv1.weight.grad.abs().sum() > 0, "the head trains the shared encoder"
    decoder = [p.grad for p in unet.decoder.parameters()]
    assert all(g is None or not g.any() for g in decoder), "and leaves the decoder alone"
    assert ModuleValidator.validate(joint, strict=True) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_head_on_the_bottleneck_has_per_sample_gradients():
    torch.manual_seed(0)
    joint = _SegmentAndClassify(create_model("resunet", width=8, depth=2), n_classes=2)

    def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seg = out[:, :-2].reshape(len(y), 3, 8, 8, 8)
        return F.cross_entropy(out[:, -2:], y) + torch.sigmoid(seg).mean()

    _per_sample_matches_single_backward(joint, "hooks", loss_of)
