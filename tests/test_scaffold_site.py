"""SCAFFOLD at a site: the new control variate is the mean gradient the optimiser was given (less the
correction), which is the paper's option II under SGD and stays a gradient under Adam, the sites' optimiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedbrats.client.algorithms import ControlVariate
from fedbrats.strategies.scaffold import client_control_update

from .test_privacy import CONFIG, DP, _data, _model


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 1)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()})


def _train(model: torch.nn.Module, control: ControlVariate, optimizer: torch.optim.Optimizer, steps: int, scale=1.0):
    torch.manual_seed(1)
    control.attach(model)
    for _ in range(steps):
        x = torch.randn(8, 6)
        optimizer.zero_grad()
        (scale * (model(x) - x.sum(1, keepdim=True)).pow(2).mean()).backward()
        optimizer.step()


def _round(tmp_path, c_global, make_optimizer, steps, lr, scale=1.0):
    model = _linear()
    x_global = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    control = ControlVariate(tmp_path, _record(c_global), server_round=1)
    _train(model, control, make_optimizer(model.parameters()), steps, scale)
    control.finish(model, _record(x_global), steps=steps, mean_lr=lr)
    y_local = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return control.files.latest(upto_round=1), x_global, y_local


def test_under_sgd_the_mean_gradient_is_option_two(tmp_path):
    rng = np.random.default_rng(0)
    c_global = {"weight": rng.normal(0, 0.1, (1, 6)), "bias": rng.normal(0, 0.1, 1)}
    c_new, x, y = _round(tmp_path, c_global, lambda p: torch.optim.SGD(p, lr=0.01), steps=5, lr=0.01)
    option_two, _ = client_control_update(None, {k: v.astype(np.float32) for k, v in c_global.items()}, x, y,
                                          steps=5, lr=0.01)  # fmt: skip
    for name in c_global:
        np.testing.assert_allclose(c_new[name], option_two[name], rtol=1e-4, atol=1e-5)


def test_under_adam_the_control_variate_stays_on_the_gradients_scale(tmp_path):
    zero = {"weight": np.zeros((1, 6)), "bias": np.zeros(1)}
    # gradients of about 1e-4: one Adam step still moves every weight by about lr
    c_new, x, y = _round(tmp_path, zero, lambda p: torch.optim.Adam(p, lr=1e-3), steps=1, lr=1e-3, scale=1e-4)
    option_two, _ = client_control_update(None, {k: v.astype(np.float32) for k, v in zero.items()}, x, y,
                                          steps=1, lr=1e-3)  # fmt: skip
    assert np.abs(option_two["weight"]).max() == pytest.approx(1.0, rel=0.01)  # Adam's step, not a gradient
    assert 1e-7 < np.abs(c_new["weight"]).max() < 1e-2  # the gradient itself


def test_dp_sgd_hands_its_noisy_gradients_to_the_control_variate(tmp_path):
    from fedbrats.client.ledger import PrivacyLedger
    from fedbrats.client.privacy import train_private

    model = _model()
    name, param = next(iter(model.named_parameters()))
    seen: list[tuple[str, torch.Tensor]] = []
    correction = {name: torch.full_like(param, 1e6)}
    train_private(model, _data(), CONFIG, DP, PrivacyLedger.at(tmp_path), round=1, grad_correction=correction,
                  on_gradient=lambda n, g: seen.append((n, g.detach().clone())))  # fmt: skip
    assert [n for n, _ in seen] == [name] * CONFIG.steps  # once a logical step, before the correction
    assert all(g.abs().max() < 1e3 for _, g in seen)  # noisy gradients, not the 1e6 correction


def test_control_average_keeps_a_share_of_the_previous_control_variate():
    """`control-average`: c_i is an exponential mean over the site's rounds; round 1 has nothing to keep."""
    c = {"w": np.array([0.5], np.float32)}
    first, _ = client_control_update(None, c, c, c, 1, 0.1, mean_gradients={"w": np.array([2.0], np.float32)}, average=0.75)
    np.testing.assert_allclose(first["w"], [2.0])
    kept, change = client_control_update(first, c, c, c, 1, 0.1, mean_gradients={"w": np.array([6.0], np.float32)},
                                         average=0.75)  # fmt: skip
    np.testing.assert_allclose(kept["w"], [3.0])  # 0.75 * 2 + 0.25 * 6
    np.testing.assert_allclose(change["w"], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        client_control_update(first, c, c, c, 1, 0.1, average=1.0)


class _Point(torch.nn.Module):
    def __init__(self, start: np.ndarray) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))


def _federate(tmp_path, strategy_name: str, steps: list[int], rounds: int = 60) -> np.ndarray:
    """Sites with quadratic losses 0.5 a_i |p - b_i|^2 and case counts n_i, SGD with momentum 0.9 at the sites,
    the real site (`ControlVariate`) and server (`Scaffold`) code; returns the distance to the optimum of the
    case-weighted objective after each round."""
    from fedbrats.strategies import build_strategy

    from .test_strategies import reply, round_of

    rng = np.random.default_rng(0)
    n = np.array([15.0, 11.0, 1, 1, 1, 1, 1])
    a, b = rng.uniform(0.5, 2.0, len(n)), rng.normal(size=(len(n), 3))
    optimum = (n * a) @ b / (n * a).sum()
    strategy = build_strategy(strategy_name, {})
    x, distances = np.zeros(3, np.float32), []
    for rnd in range(1, rounds + 1):
        control = (strategy.control or {"p": np.zeros(3, np.float32)}) if strategy_name == "scaffold" else None
        replies = []
        for i, k in enumerate(steps):
            model = _Point(x)
            site = ControlVariate(tmp_path / str(i), _record(control), server_round=rnd) if control else None
            if site:
                site.attach(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            for _ in range(k):
                optimizer.zero_grad()
                (0.5 * a[i] * (model.p - torch.from_numpy(b[i]).float()).pow(2).sum()).backward()
                optimizer.step()
            delta = {"p": site.finish(model, _record({"p": x}), steps=k, mean_lr=0.01)["p"].numpy()} if site else None
            replies.append(reply(i + 1, {"p": model.p.detach().numpy()}, {"num-examples": n[i]}, site=str(i),
                                 control_delta=delta))  # fmt: skip
        x = round_of(strategy, rnd, _record({"p": x}), replies)["p"]
        distances.append(float(np.linalg.norm(x - optimum)))
    return np.array(distances)


def test_scaffold_reaches_the_federation_optimum_when_sites_take_unequal_steps(tmp_path):
    """Two large hospitals taking 8 momentum steps a round and five one-case sites taking one: FedAvg settles
    where the large sites' extra steps pull it; SCAFFOLD's corrections (site and server code as deployed)
    remove that drift and it converges to the case-weighted optimum, as the paper's analysis says."""
    steps = [8, 8, 1, 1, 1, 1, 1]
    scaffold = _federate(tmp_path / "scaffold", "scaffold", steps)
    fedavg = _federate(tmp_path / "fedavg", "fedavg", steps)
    assert scaffold[-1] < 1e-3 < 0.1 < fedavg[-1]
    assert scaffold[-1] < scaffold[9] < scaffold[0]  # it converges, not merely ends near
