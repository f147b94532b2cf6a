"""Model registry and the residual U-Net: shapes, size, Opacus compatibility, gradients, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import wrap_model
from opacus.validators import ModuleValidator

from fedbrats.shared.models import (
    DEFAULT_MODEL,
    ResUNet,
    available_models,
    count_parameters,
    create_model,
    register_model,
)
from fedbrats.shared.models.losses import region_loss

TINY = {"width": 8, "depth": 3}



def tiny(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resunet", **TINY, **extra)


# ---- registry ----------------------------------------------------------------------------------


def test_registry_lists_the_default_and_names_known_models_on_error():
    assert DEFAULT_MODEL == "selfensemble" and {"resunet", "selfensemble"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown model 'nope'.*resunet"):
        create_model("nope")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['widht'\].*width"):
        create_model("resunet", widht=8)


def test_register_refuses_a_second_model_under_the_same_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resunet")(torch.nn.Identity)


def test_config_rebuilds_the_same_architecture():
    model = tiny(deep_supervision=True, se=True)
    assert model.model_name == "resunet"
    assert model.config == {
        "in_channels": 4, "out_channels": 3, "width": 8, "depth": 3,
        "deep_supervision": True, "dropout": 0.0, "act": "leakyrelu", "se": True, "n_classes": 0,
        "class_head": "bottleneck",
    }  # fmt: skip
    again = create_model(model.model_name, **model.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    again.load_state_dict(model.state_dict())  # strict: same names


def test_bad_config_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("resunet", width=12)
    with pytest.raises(ValueError, match="depth"):
        create_model("resunet", depth=1)
    with pytest.raises(ValueError, match="activation"):
        create_model("resunet", act="gelu")


# ---- shapes --------------------------------------------------------------------------------------


def test_output_shape_and_no_list_without_deep_supervision():
    out = tiny()(torch.randn(2, 4, 32, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 32, 32)


def test_non_cubic_input():
    out = create_model("resunet", width=8, depth=4)(torch.randn(1, 4, 16, 24, 8))
    assert out.shape == (1, 3, 16, 24, 8)


def test_deep_supervision_lists_in_training_and_tensor_in_eval():
    model = create_model("resunet", width=8, depth=4, deep_supervision=True)
    x = torch.randn(1, 4, 32, 32, 16)
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 32, 32, 16), (1, 3, 16, 16, 8), (1, 3, 8, 8, 4)]
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 16)
    assert torch.allclose(out, outs[0], atol=1e-5)  # eval differs only in what it returns (no dropout)


def test_input_size_must_be_a_multiple_of_the_downsampling():
    with pytest.raises(ValueError, match=r"multiples of 2\^\(depth-1\) = 4"):
        tiny()(torch.randn(1, 4, 32, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 4, X, Y, Z\]"):
        tiny()(torch.randn(1, 3, 32, 32, 32))


# ---- size ----------------------------------------------------------------------------------------------


def test_full_size_default_parameter_count():
    model = create_model(DEFAULT_MODEL)  # width 32, depth 5: constructed, never run
    n = count_parameters(model)
    assert 20e6 <= n <= 30e6
    # resunet's size (its docstring's 21.7 M) with its 1x1 head replaced by a 4-label head per scale
    assert n == count_parameters(create_model("resunet")) - (32 * 3 + 3) + sum(4 * (c + 1) for c in (32, 64, 128, 256, 512))
    assert n == 21_717_012
    assert count_parameters(tiny()) < 100_000


# ---- privacy compatibility ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_passes_opacus_validation(name):
    model = create_model(name)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert list(model.buffers()) == []  # every state_dict entry is a trainable parameter


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_functorch_per_sample_gradients_match_single_sample_backward():
    """What DP-SGD relies on: per-sample gradients of the batch loss = gradients of each sample alone."""
    model = tiny(deep_supervision=True, se=True)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 8, 8, 8)
    y = (torch.rand(2, 3, 8, 8, 8) > 0.7).float()
    gsm = wrap_model(model, "functorch", loss_reduction="mean")  # what PrivacyEngine builds
    region_loss(gsm(x), y).backward()
    for i in range(2):
        reference.zero_grad()
        region_loss(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], ref.grad, atol=1e-6, rtol=1e-3), name


# ---- training behaviour --------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    model = tiny(deep_supervision=True, se=True, dropout=0.1)
    x = torch.randn(2, 4, 16, 16, 16)
    y = (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    region_loss(model.train()(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_same_seed_same_model_and_output():
    x = torch.randn(1, 4, 16, 16, 16)
    a, b = tiny(), tiny()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a(x), b(x))
    torch.manual_seed(1)
    c = create_model("resunet", **TINY)
    assert not torch.equal(a(x), c(x))


def test_class_is_usable_directly():
    model = ResUNet(width=8, depth=2)
    assert model.config["depth"] == 2 and model(torch.randn(1, 4, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
