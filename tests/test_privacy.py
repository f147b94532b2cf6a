"""DP-SGD at a site (accounting oracles, ledger across rounds and processes, budget, empty batches,
model refusal) and client-level DP at the server (Flower's wrappers with our accounting)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedbrats.client.privacy as privacy
from fedbrats.client.accounting import calibrate_noise, epsilon_for, make_accountant
from fedbrats.client.ledger import LedgerError, PrivacyLedger
from fedbrats.client.privacy import (
    DPConfig,
    IncompatibleModelError,
    PrivacyBudgetExhausted,
    PrivacyPlanExceeded,
    check_budget,
    default_delta,
    plan_privacy,
    poisson_loader,
    train_private,
    validate_model,
)
from fedbrats.client.site import SiteError
from fedbrats.client.trainer import TrainConfig
from fedbrats.shared.models import create_model
from fedbrats.strategies import build_strategy
from fedbrats.strategies.client_dp import (
    ClientDPAdaptiveClipping,
    adaptive_effective_noise,
    client_level_epsilons,
    with_client_dp,
)

ROOT = Path(__file__).resolve().parents[1]
#: Opacus notes when the best RDP order is at the end of its grid (tiny or huge epsilons): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
N, PATCH = 6, 16
SIGMA = 1.3



def _data(n: int = N) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 4, PATCH, PATCH, PATCH, generator=g)
    return torch.utils.data.TensorDataset(images, (images[:, :3] > 0.8).float())


def _model():
    torch.manual_seed(0)
    return create_model("resunet", width=8, depth=2)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(model, before) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))


CONFIG = TrainConfig(steps=2, batch_size=2, lr=1e-3)
DP = DPConfig(epsilon=100.0, noise_multiplier=SIGMA, max_grad_norm=1.0, planned_rounds=10)


# --- accounting oracles (DESIGN section 6), delta 1e-5 -----------------------------------------
@pytest.mark.parametrize(
    ("q", "sigma", "steps", "accountant", "expected"),
    [(0.01, 1.1, 10_000, "rdp", 5.632), (0.01, 1.1, 10_000, "prv", 5.203), (0.1, 1.0, 500, "rdp", 18.02),
     (0.1, 1.0, 500, "prv", 16.57), (0.01, 4.0, 10_000, "rdp", 1.035)],
)  # fmt: skip
def test_accounting_oracles(q, sigma, steps, accountant, expected):
    assert epsilon_for([(sigma, q, steps)], 1e-5, accountant) == pytest.approx(expected, rel=0.01)
    if accountant == "rdp":  # our cached path computes what Opacus' accountant computes
        direct = make_accountant("rdp", [(sigma, q, steps)]).get_epsilon(delta=1e-5)
        assert epsilon_for([(sigma, q, steps // 3), (sigma, q, steps - steps // 3)], 1e-5) == pytest.approx(
            direct
        )


def test_plan_calibrates_sigma_once_for_all_planned_rounds():
    dp = DPConfig(epsilon=8.0, planned_rounds=10)
    plan = plan_privacy(20, 2, dp, epochs=1)
    assert plan.sample_rate == 0.1 and plan.steps == 10 and plan.delta == 1e-5
    history = [plan.entry] * 9
    assert 7.95 < plan.epsilon_after(history) <= 8.0  # the 10 planned rounds fit, tightly
    with pytest.raises(PrivacyBudgetExhausted, match="would reach"):
        check_budget(plan, [*history, plan.entry], dp.epsilon)  # an 11th does not
    assert plan_privacy(20, 2, dp, epochs=1).noise_multiplier == plan.noise_multiplier  # same every round


def test_a_second_run_calibrates_against_what_is_left():
    """What earlier runs spent counts: the same plan after a spent run needs more noise and still fits the budget."""
    dp = DPConfig(epsilon=8.0, planned_rounds=5)
    first = plan_privacy(20, 2, dp, epochs=1)
    spent = [first.entry] * 5  # the first run used its whole plan
    assert first.epsilon_after(spent[:-1]) <= 8.0
    with pytest.raises(PrivacyBudgetExhausted, match="nothing is left to plan a run with"):
        plan_privacy(20, 2, dp, epochs=1, spent=spent)
    half = [first.entry] * 2
    second = plan_privacy(20, 2, dp, epochs=1, spent=half)
    assert second.noise_multiplier > first.noise_multiplier and second.spent_before == pytest.approx(
        epsilon_for(half, 1e-5)
    )
    assert 7.95 < second.epsilon_after(half + [second.entry] * 4) <= 8.0  # earlier spend + the whole new plan
    assert calibrate_noise(8.0, 1e-5, 0.1, 50) == first.noise_multiplier  # no history: the plain calibration


def test_config_defaults_and_errors():
    from fedbrats.shared.config import RunConfig

    assert default_delta(10) == 1e-5 and default_delta(1_000_000) == pytest.approx(1e-7)
    with pytest.raises(ValueError, match="epsilon budget must be > 0.*accountant must be one of"):
        DPConfig(epsilon=0, accountant="moments")
    run = RunConfig(rounds=12, dp_epsilon=3.0, dp_max_grad_norm=0.5, dp_accountant="prv", dp_target_epsilon=2.0,
                    dp_max_physical_batch=4, dp_grad_sample_mode="hooks", dp_noise_multiplier=1.5, dp_delta=1e-6)  # fmt: skip
    assert DPConfig.from_run_config(run) == DPConfig(
        epsilon=3.0, delta=1e-6, max_grad_norm=0.5, noise_multiplier=1.5, target_epsilon=2.0, planned_rounds=12,
        accountant="prv", max_physical_batch=4, grad_sample_mode="hooks",
    )  # fmt: skip
    with pytest.raises(AttributeError, match="dp_epsilon"):  # explicit fields, nothing silently defaulted
        DPConfig.from_run_config(SimpleNamespace(rounds=3))


# --- budget never exceeded, whatever the settings ------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 400), batch=st.integers(1, 16), sigma=st.sampled_from([0.7, 1.0, 1.5, 2.5, 5.0]),
    steps=st.integers(1, 60), budget=st.floats(0.3, 20.0), attempts=st.integers(1, 6),
)  # fmt: skip
def test_budget_is_never_exceeded(n, batch, sigma, steps, budget, attempts):
    dp = DPConfig(epsilon=budget, noise_multiplier=sigma)
    plan = plan_privacy(n, batch, dp, steps=steps)
    with tempfile.TemporaryDirectory() as folder:
        ledger = PrivacyLedger.at(folder)
        for rnd in range(1, attempts + 1):  # the gate train_private applies before every round
            try:
                projected = check_budget(plan, ledger.history(), budget)
            except PrivacyBudgetExhausted as refused:
                assert refused.projected > budget >= refused.spent
                break
            ledger.record(run_id="r", round=rnd, noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=steps,
                          epsilon=epsilon_for([*ledger.history(), plan.entry], plan.delta), delta=plan.delta,
                          accountant="rdp", budget=budget, max_grad_norm=1.0, n_cases=n)  # fmt: skip
            assert ledger.epsilon() == pytest.approx(projected)
        assert all(row.epsilon <= budget for row in ledger.rows())


# --- DP-SGD rounds -----------------------------------------------------------------------------
def test_three_rounds_compose_like_one_shot_and_report_epsilon(tmp_path):
    model, data, ledger = _model(), _data(), PrivacyLedger.at(tmp_path)
    results = [train_private(model, data, CONFIG, DP, ledger, round=r, run_id="run", start_step=2 * (r - 1))
               for r in (1, 2, 3)]  # fmt: skip
    q = 2 / N
    assert [r.steps for r in results] == [2, 2, 2] and results[-1].end_step == 6
    assert ledger.history() == [(SIGMA, q, 2)] * 3
    one_shot = make_accountant("rdp", [(SIGMA, q, 6)]).get_epsilon(delta=1e-5)
    assert results[-1].epsilon == pytest.approx(one_shot, rel=1e-9)
    assert ledger.rows()[-1].epsilon == pytest.approx(one_shot, rel=1e-9)
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon
    metrics = results[-1].metrics()
    assert metrics["epsilon"] == results[-1].epsilon and metrics["delta"] == 1e-5 and metrics["dp-steps"] == 2
    assert not hasattr(next(model.parameters()), "grad_sample")  # handed back as a plain module
    with pytest.raises(LedgerError, match="already trained"):
        train_private(model, data, CONFIG, DP, ledger, round=3, run_id="run")


def test_a_gradient_correction_survives_the_dp_optimizer(tmp_path):
    model = _model()
    name, param = next(iter(model.named_parameters()))
    before = param.detach().clone()
    correction = {name: torch.full_like(param, 1e6)}  # dwarfs gradient and noise: Adam steps by -lr each time
    train_private(model, _data(), CONFIG, DP, PrivacyLedger.at(tmp_path), round=1, grad_correction=correction)
    assert torch.allclose(param.detach(), before - 2 * CONFIG.lr, atol=2e-4)
    with pytest.raises(ValueError, match="does not have"):
        train_private(
            model, _data(), CONFIG, DP, PrivacyLedger.at(tmp_path), round=2, grad_correction={"x": param}
        )


def test_budget_exhausted_refuses_before_training(tmp_path):
    model, ledger = _model(), PrivacyLedger.at(tmp_path)
    dp = DPConfig(epsilon=2.0, noise_multiplier=0.8)
    before = _weights(model)
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted") as refused:
        train_private(model, _data(), CONFIG, dp, ledger, round=1)
    assert isinstance(refused.value, SiteError)  # the client app forwards its message to the server
    assert ledger.rows() == [] and not _changed(model, before)


def test_empty_poisson_batches_are_noise_only_steps_still_counted(tmp_path, monkeypatch):
    real = privacy.UniformWithReplacementSampler
    loader = poisson_loader(_data(), 1e-9, 4, generator=torch.Generator().manual_seed(0))
    assert [len(batch) for batch in loader] == [0, 0, 0, 0]  # a tiny sample rate: every batch empty
    monkeypatch.setattr(privacy, "UniformWithReplacementSampler",
                        lambda **kw: real(**{**kw, "sample_rate": 1e-9}))  # fmt: skip
    model, ledger = _model(), PrivacyLedger.at(tmp_path)
    before = _weights(model)
    result = train_private(model, _data(), TrainConfig(steps=3, batch_size=2), DP, ledger, round=1)
    assert result.steps == 3 and result.empty_steps == 3 and result.examples == 0
    assert ledger.history() == [(SIGMA, 2 / N, 3)]  # accounted with the plan's q
    assert _changed(model, before)  # the noise moved the weights: a real step, not a skipped one


def test_a_model_opacus_cannot_handle_is_refused_before_training(tmp_path):
    batchnorm = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1), torch.nn.BatchNorm3d(8),
                                    torch.nn.Conv3d(8, 3, 1))  # fmt: skip
    ledger = PrivacyLedger.at(tmp_path)
    with pytest.raises(IncompatibleModelError, match="BatchNorm"):
        train_private(batchnorm, _data(), CONFIG, DP, ledger, round=1)
    assert ledger.rows() == []
    validate_model(_model())  # every registered model uses GroupNorm


def test_sigma_is_calibrated_once_per_run_and_a_round_beyond_the_plan_is_refused(tmp_path):
    """The run's plan is made at its first round and reused, even when later rounds are shorter (epoch-decay)."""
    model, data, ledger = _model(), _data(), PrivacyLedger.at(tmp_path)
    dp = DPConfig(epsilon=30.0, planned_rounds=3)
    shorter = [TrainConfig(steps=s, batch_size=2) for s in (3, 2, 1)]
    results = [
        train_private(model, data, c, dp, ledger, round=r, run_id="a") for r, c in enumerate(shorter, 1)
    ]
    plan = ledger.plan_for("a")
    assert plan.round_steps == 3 and plan.total_steps == 9 and plan.spent_before == 0.0
    assert {r.noise_multiplier for r in ledger.rows()} == {plan.noise_multiplier}  # never recalibrated
    assert [r.row_hash for r in ledger.rows()] and {r.plan_hash for r in ledger.rows()} == {plan.row_hash}
    assert results[-1].epsilon < 30.0 and ledger.verify() == []
    with pytest.raises(PrivacyPlanExceeded, match="allows 3 per round"):
        train_private(model, data, TrainConfig(steps=4, batch_size=2), dp, ledger, round=4, run_id="a")
    train_private(
        model, data, TrainConfig(steps=3, batch_size=2), dp, ledger, round=4, run_id="a"
    )  # 6 + 3 = 9
    with pytest.raises(PrivacyPlanExceeded, match="taken 9 of the 9 DP steps"):
        train_private(model, data, TrainConfig(steps=1, batch_size=2), dp, ledger, round=5, run_id="a")
    assert len(ledger.rows()) == 4 and ledger.epsilon() <= 30.0


def test_a_second_run_at_a_site_counts_what_the_first_spent(tmp_path):
    model, data, ledger = _model(), _data(), PrivacyLedger.at(tmp_path)
    config, q = TrainConfig(steps=2, batch_size=2), 2 / N
    for rnd in (1, 2):  # the first run aims at half the budget
        train_private(model, data, config, DPConfig(epsilon=30.0, target_epsilon=15.0, planned_rounds=2), ledger,
                      round=rnd, run_id="first")  # fmt: skip
    spent = ledger.epsilon()
    second = train_private(model, data, config, DPConfig(epsilon=30.0, planned_rounds=2), ledger, round=1,
                           run_id="second")  # fmt: skip
    plan = ledger.plan_for("second")
    assert plan.spent_before == pytest.approx(spent) and 14.9 < spent <= 15.0
    whole = [*ledger.history(), (plan.noise_multiplier, q, 2)]  # after the second run's last planned round
    assert second.epsilon < epsilon_for(whole, 1e-5) <= 30.0
    naive = calibrate_noise(30.0, 1e-5, q, 4)  # as if nothing had been spent: the budget would be exceeded
    assert plan.noise_multiplier > naive and epsilon_for([*ledger.history()[:2], (naive, q, 4)], 1e-5) > 30.0
    metrics = second.metrics()
    row = ledger.rows()[-1]
    assert metrics["ledger-row"] == row.seq == 3 and metrics["ledger-head"] == int(row.row_hash[:12], 16)
    assert metrics["ledger-key"] == int(ledger.meta()["key_fingerprint"][:12], 16)


def test_a_site_does_not_train_on_a_ledger_that_fails_verification(tmp_path):
    import sqlite3

    model, data, ledger = _model(), _data(), PrivacyLedger.at(tmp_path)
    train_private(model, data, CONFIG, DP, ledger, round=1, run_id="a")
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("UPDATE rounds SET noise_multiplier = 9.0")
    before = _weights(model)
    with pytest.raises(LedgerError, match="fails verification .row 1: its contents do not match its hash"):
        train_private(model, data, CONFIG, DP, ledger, round=2, run_id="a")
    assert not _changed(model, before) and len(ledger.rows()) == 1


SITE_ROUND = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from fedbrats.client.ledger import PrivacyLedger
    from fedbrats.client.privacy import DPConfig, train_private
    from fedbrats.client.trainer import TrainConfig
    from fedbrats.shared.models import create_model
    rounds, die_during = [int(r) for r in sys.argv[1].split(",")], sys.argv[2] == "die-during"
    kill = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    g = torch.Generator().manual_seed(0)
    images = torch.randn({n}, 4, {patch}, {patch}, {patch}, generator=g)
    data = torch.utils.data.TensorDataset(images, (images[:, :3] > 0.8).float())
    for rnd in rounds:  # each round as the client app runs it: a fresh ledger object, restored from disk
        last = rnd == rounds[-1]
        train_private(create_model("resunet", width=8, depth=2), data, TrainConfig(steps=2, batch_size=2),
                      DPConfig(epsilon=100.0, noise_multiplier={sigma}, planned_rounds=3), PrivacyLedger.at({site!r}),
                      round=rnd,
                      run_id="run", progress=kill if die_during and last else None)
    kill()  # a site process killed between rounds, without any clean shutdown
    """
)


def test_the_ledger_survives_killed_site_processes(tmp_path):
    code = SITE_ROUND.format(root=str(ROOT), n=N, patch=PATCH, sigma=SIGMA, site=str(tmp_path / "site"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # process 1 trains round 1 and is killed; process 2 restores it, trains round 2, is killed during round 3
    for rounds, how in (("1", "die-after"), ("2,3", "die-during")):
        proc = subprocess.run(
            [sys.executable, "-c", code, rounds, how], env=env, capture_output=True, text=True
        )
        assert proc.returncode == -9, proc.stderr[-2000:]
    ledger = PrivacyLedger.at(tmp_path / "site")
    assert [r.round for r in ledger.rows()] == [1, 2]  # round 3 died mid-round: nothing recorded
    assert ledger.epsilon() == pytest.approx(
        make_accountant("rdp", [(SIGMA, 2 / N, 4)]).get_epsilon(delta=1e-5)
    )


# --- client-level DP at the server -------------------------------------------------------------
def test_client_level_epsilon_over_rounds_matches_an_independent_accountant():
    import dp_accounting
    from dp_accounting import rdp

    for q in (1.0, 0.3):
        eps = client_level_epsilons(1.0, q, 20)
        assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
        google = rdp.RdpAccountant()
        google.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), 20))  # fmt: skip
        assert eps[-1] == pytest.approx(google.get_epsilon(1e-5), rel=0.01)
    assert client_level_epsilons(1.0, 1.0, 20)[-1] > 25  # ten hospitals, every round: a large epsilon


def _reply(node: int, update: float, examples: int, current: ArrayRecord) -> Message:
    request = Message(RecordDict({"arrays": current, "config": ConfigRecord({})}), dst_node_id=node,
                      message_type="train")  # fmt: skip
    arrays = ArrayRecord({k: Array(v.numpy() + update) for k, v in current.items()})
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=request)


def test_fixed_clipping_clips_averages_equally_and_accounts_each_release():
    current = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(1, np.float32))})
    strategy = with_client_dp(build_strategy("fedavg"), noise_multiplier=1e-6, clipping_norm=0.5,
                              num_sampled_sites=2, total_sites=10)  # fmt: skip
    strategy.current_arrays = current
    # site 1 pushes +1 per weight (norm sqrt 5) with 1000 cases, site 2 pushes -0.01 (norm 0.022) with 1 case
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(1, 1.0, 1000, current), _reply(2, -0.01, 1, current)]
    )
    update = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    expected = (0.5 / np.sqrt(5) - 0.01) / 2  # clipped to 0.5, then an unweighted mean
    assert update == pytest.approx(np.full(5, expected), abs=1e-4)
    assert strategy.releases == 1 and metrics["client-epsilon"] == strategy.epsilon() > 0
    assert strategy.sample_rate == 1.0  # no amplification unless the sampling is secret and asked for
    arrays_state, meta = strategy.state_dict()
    again = with_client_dp(build_strategy("fedavg"), noise_multiplier=1e-6, clipping_norm=0.5, num_sampled_sites=2,
                           total_sites=10)  # fmt: skip
    again.load_state_dict(arrays_state, meta)
    assert again.releases == 1 and again.epsilon() == strategy.epsilon()


def test_adaptive_clipping_accounts_its_effective_noise():
    strategy = with_client_dp(build_strategy("fedavg"), noise_multiplier=1.0, num_sampled_sites=10, total_sites=10,
                              adaptive=True, clipped_count_stddev=2.0)  # fmt: skip
    assert isinstance(strategy, ClientDPAdaptiveClipping)
    z_eff = strategy.accounted_noise_multiplier
    assert z_eff == pytest.approx(adaptive_effective_noise(strategy.noise_multiplier, 2.0))
    assert z_eff == pytest.approx((1.0 + 0.75 / 4.0) ** -0.5) and z_eff < 1.0
    current = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    strategy.current_arrays = current
    arrays, _ = strategy.aggregate_train(1, [_reply(i, 0.01 * i, 5, current) for i in range(1, 11)])
    assert arrays is not None and strategy.releases == 1
    assert strategy.epsilon() == pytest.approx(client_level_epsilons(z_eff, 1.0, 1)[0])


class _Grid:
    """In-process sites that 'train' by adding node id / 10 to every weight."""

    def __init__(self, nodes=(1, 2, 3)):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict({"metrics": MetricRecord({"num-examples": 10 * node, "num-val": 1}),
                                  "site": ConfigRecord({"name": f"s{node}"})})  # fmt: skip
            if msg.metadata.message_type.startswith("train"):
                content["arrays"] = ArrayRecord(
                    {k: Array(v.numpy() + node / 10) for k, v in msg.content["arrays"].items()}
                )
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_client_dp_runs_in_the_round_loop_and_resumes(tmp_path):
    from fedbrats.server.federation import Federation
    from fedbrats.server.state import load_state
    from fedbrats.shared.config import RunConfig

    def strategy():
        return with_client_dp(build_strategy("fedavg"), noise_multiplier=0.01, clipping_norm=0.3,
                              num_sampled_sites=3, total_sites=3)  # fmt: skip

    arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})
    config = RunConfig(rounds=2, min_sites=3, out_dir=str(tmp_path))
    dp = strategy()
    final = Federation(_Grid(), config, dp, arrays, out_dir=tmp_path).run()
    # updates of norm 0.3, 0.6 and 0.9 all clipped to 0.3 (0.1 per weight), averaged with equal weights
    np.testing.assert_allclose(final["w"].numpy(), 0.2, atol=0.01)
    assert dp.releases == 2 and load_state(tmp_path / "server").strategy_meta["client_dp"]["releases"] == 2
    resumed = strategy()
    Federation(_Grid(), config.replace(rounds=3), resumed, arrays, out_dir=tmp_path).run()
    assert resumed.releases == 3 and resumed.epsilon() == pytest.approx(
        client_level_epsilons(0.01, 1.0, 3)[-1]
    )
