"""Simulated attacks (client/attack.py), their record in the history, and how far they move each strategy."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbrats.client.attack import (
    ATTACKS,
    DEFAULT_SCALES,
    FlippedClasses,
    FlippedRegions,
    attacked_site,
    attacks_here,
    complement_regions,
    misbehave,
    poison_metrics,
    poison_update,
    rotate_class,
)
from fedbrats.server.history import read_history
from fedbrats.shared.config import CHOICES, RunConfig
from fedbrats.strategies.arithmetic import record_views, to_record

from .fake_sites import Sites, federation

ROOT = Path(__file__).resolve().parents[1]
RECEIVED = {"w": np.zeros((2, 3), np.float32), "steps": np.array([4], np.int64)}
TRAINED = {"w": np.full((2, 3), 0.5, np.float32), "steps": np.array([5], np.int64)}
SIMULATED = {"partition-id": 0, "num-partitions": 4}


def test_scale_signflip_and_inflate_transform_the_update():
    scaled = poison_update("scale", RECEIVED, TRAINED)
    np.testing.assert_allclose(scaled["w"], 0.5e6)
    assert scaled["w"].dtype == np.float32 and scaled["steps"] == 5  # integer buffers are left alone
    np.testing.assert_allclose(poison_update("signflip", RECEIVED, TRAINED)["w"], -0.5)
    np.testing.assert_allclose(poison_update("signflip", RECEIVED, TRAINED, 3.0)["w"], -1.5)
    np.testing.assert_allclose(poison_update("inflate", RECEIVED, TRAINED)["w"], -0.5)
    assert poison_metrics("inflate", {"num-examples": 10})["num-examples"] == 1e12
    assert poison_metrics("scale", {"num-examples": 10}) == {"num-examples": 10}


def test_noise_replaces_the_update_with_scaled_gaussian_noise():
    big = {"w": np.zeros(20_000, np.float32)}
    trained = {"w": np.full(20_000, 0.01, np.float32)}
    noisy = poison_update("noise", big, trained, rng=np.random.default_rng(1))["w"]
    assert np.std(noisy) == pytest.approx(DEFAULT_SCALES["noise"] * 0.01, rel=0.05)
    assert abs(np.mean(noisy)) < 0.05  # no trace of the honest direction
    again = poison_update("noise", big, trained, rng=np.random.default_rng(1))["w"]
    np.testing.assert_array_equal(noisy, again)


def test_only_named_simulated_sites_attack():
    config = RunConfig(attack="scale", attack_sites="1, 3")
    assert attacks_here(config, SIMULATED, "1") and attacks_here(config, SIMULATED, "3")
    assert not attacks_here(config, SIMULATED, "2")
    assert not attacks_here(config, {"site-name": "1"}, "1")  # a real hospital's SuperNode ignores it
    assert not attacks_here(RunConfig(), SIMULATED, "1")


def test_misbehave_leaves_an_honest_site_untouched():
    received, reply = to_record(RECEIVED), to_record(TRAINED)
    metrics = {"num-examples": 10.0}
    assert misbehave(RunConfig(), SIMULATED, "1", received, reply, metrics, 1) == (reply, metrics)
    config = RunConfig(attack="signflip", attack_sites="1", attack_scale=2.0)
    arrays, _ = misbehave(config, SIMULATED, "1", received, reply, metrics, 1)
    assert isinstance(arrays, ArrayRecord)
    np.testing.assert_allclose(record_views(arrays)["w"], -1.0)


def test_attack_settings_are_checked():
    assert CHOICES["attack"] == ATTACKS
    with pytest.raises(ValueError, match="attack must be one of none, scale, signflip, noise, inflate, labelflip, got 'x'"):
        RunConfig(attack="x", attack_sites="1")
    with pytest.raises(ValueError, match="attack 'scale' needs attack-sites"):
        RunConfig(attack="scale")
    with pytest.raises(ValueError, match="attack-scale must be >= 0"):
        RunConfig(attack="scale", attack_sites="1", attack_scale=-1.0)
    flat = RunConfig(attack="noise", attack_sites="2,4", attack_scale=5.0).to_flower()
    assert (flat["attack"], flat["attack-sites"], flat["attack-scale"]) == ("noise", "2,4", 5.0)


def test_the_history_names_the_attacking_sites(tmp_path):
    def attack(msg):
        trained = record_views(msg.content["arrays"])
        msg.content["arrays"] = to_record(poison_update("scale", {k: np.zeros_like(v) for k, v in trained.items()}, trained))

    fed = federation(tmp_path, Sites(nodes=(1, 2, 3, 4, 5), train={5: attack}), attack="scale", attack_sites="s5")
    fed.run()
    (record,) = read_history(tmp_path / "history.jsonl")
    entries = {t["site"]: t for t in record["train"]}
    assert entries["s5"]["attack"] == "scale" and entries["s5"]["dropped"].startswith("screened: update norm")
    assert all("attack" not in entries[f"s{n}"] for n in range(1, 5))


# --- the table (benchmarks/bench_robustness.py) ------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("bench_robustness", ROOT / "benchmarks" / "bench_robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedbn", "fedcostwavg", "fedpidavg", "bulyan"])
def test_one_scaled_update_decides_a_weighted_mean_unless_screened(strategy):
    rnd = bench.Round(5, 1, "scale")
    assert bench.alone(strategy, rnd) > 1e4
    moved, dropped = bench.defended(strategy, rnd)
    assert moved < 0.2 and dropped == ["site5"]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "fets_clipped", bench.CLIENT_DP])
def test_robust_aggregators_resist_one_scaled_update_alone(strategy):
    assert bench.alone(strategy, bench.Round(5, 1, "scale")) < 1.0


def test_a_sign_flip_with_inflated_num_examples_wins_the_weighting_unless_validated():
    rnd = bench.Round(5, 1, "inflate")
    assert bench.alone("fedavg", rnd) == pytest.approx(2.0, rel=0.05)  # the aggregate is the flipped update
    moved, dropped = bench.defended("fedavg", rnd)
    assert moved < 0.2 and dropped == ["site5"]


def test_two_attackers_in_seven_are_screened():
    for attack in ("scale", "noise"):
        moved, dropped = bench.defended("fedavg", bench.Round(7, 2, attack))
        assert moved < 0.3 and dropped == ["site6", "site7"], attack


def test_a_sign_flip_of_ordinary_size_passes_the_default_screen():
    """The direction test is off by default (honest sites with other labels point away from the median
    too); a sign flip is then bounded, not dropped: docs/reliability.md says by how much."""
    moved, dropped = bench.defended("fedavg", bench.Round(7, 2, "signflip"))
    assert dropped == [] and 0.3 < moved < 2.0


def test_the_table_lists_every_strategy_and_attack():
    rows = [{"strategy": s, "sites": n, "attackers": f, "attack": a, "alone": 1.0, "defended": math.nan, "dropped": []}
            for s in ("fedavg", "krum") for n, f in bench.SETTINGS for a in bench.ATTACKS]  # fmt: skip
    table = bench.markdown(rows)
    assert "| fedavg | 1 / fails | 1 / fails |" in table and table.count("| krum |") == 2


def test_a_simulated_site_attacks_through_the_real_client_app(tmp_path):
    """The client hook (client/app.py handle_train) with the real sites: site 3 scales its update."""
    from fedbrats.server.app import run_server
    from fedbrats.shared.data.phantom import generate_phantom

    from .local_grid import LocalGrid

    data = tmp_path / "phantom"
    generate_phantom(data, sites=3, cases_per_site=3, voxel_size=5.0, seed=3, progress=False)
    config = RunConfig(
        rounds=1, min_sites=2, data_dir=str(data), partition=str(data / "partitioning_1.csv"), out_dir=str(tmp_path / "run"),
        model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=1, cache="memory",
        attack="scale", attack_sites="3",
    )  # fmt: skip
    grid = LocalGrid(config.to_flower(), sites=3)
    run_server(grid, config)
    (record,) = read_history(tmp_path / "run" / "history.jsonl")
    entries = {t["site"]: t for t in record["train"]}
    assert entries["3"]["attack"] == "scale" and entries["3"]["dropped"].startswith("screened: update norm")
    assert entries["1"]["dropped"] is None and entries["2"]["dropped"] is None and record["status"] == "ok"
    norms = record["screening"]["norms"]
    assert norms["3"] > 1e5 * max(norms["1"], norms["2"])


# --- labelflip: an attacker trains on corrupted labels ------------------------------------------------
SITE_1 = {"partition-id": 0, "num-partitions": 3}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from fedbrats.shared.data.phantom import generate_phantom

    data = tmp_path_factory.mktemp("phantom")
    return generate_phantom(data, sites=3, cases_per_site=3, voxel_size=5.0, seed=3, progress=False)


def flip_config(phantom, tmp_path, **changes):
    return RunConfig(data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"), out_dir=str(tmp_path),
                     cache="memory", patch_size=16, attack="labelflip", attack_sites="1", **changes)  # fmt: skip


def test_label_corruption_rules():
    image = np.zeros((4, 3, 1, 1), np.float32)
    image[1, :2] = 0.5  # brain: the first two voxels
    regions = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]], np.uint8).reshape(3, 3, 1, 1)
    flipped = complement_regions(image, regions)
    assert flipped.dtype == np.uint8
    assert flipped.reshape(3, 3).tolist() == [[0, 1, 0], [0, 1, 0], [1, 1, 0]]  # the background stays 0
    assert [rotate_class(k, 3) for k in (0, 1, 2)] == [1, 2, 0] and rotate_class(1, 2) == 0
    with pytest.raises(ValueError, match="at least 2 classes"):
        rotate_class(0, 1)


def test_labelflip_corrupts_only_the_attackers_training_regions(phantom, tmp_path):
    from fedbrats.client.site import open_site
    from fedbrats.shared.data.dataset import PatientDataset

    config = flip_config(phantom, tmp_path, foreground_prob=0.0)
    honest = open_site({"partition-id": 1, "num-partitions": 3}, config)
    assert attacked_site(config, {"partition-id": 1, "num-partitions": 3}, honest) is honest
    site = open_site(SITE_1, config)
    assert attacked_site(config, {"site-name": "1"}, site) is site  # a hospital's SuperNode never attacks
    attacker = attacked_site(config, SITE_1, site)
    assert isinstance(attacker.train, FlippedRegions) and isinstance(site.train, PatientDataset)
    assert attacker.val is site.val and attacker.name == "1" and len(attacker.train) == len(site.train)
    image, regions, _ = site.train.volume(0)
    _, flipped, _ = attacker.train.volume(0)
    brain = np.any(image != 0, axis=0)
    assert regions[0].any() and brain.sum() > regions[0].sum()
    np.testing.assert_array_equal(flipped, brain[None] & (regions == 0))
    # patches: the same crop as the honest dataset's (uniform crops, same seed), labels inverted in the brain
    plain = PatientDataset(site.train.cases, (16, 16, 16), foreground_prob=0.0, augment=False, progress=False)
    wrapped = FlippedRegions(plain)
    plain.reseed(7)
    wrapped.reseed(7)
    for i in range(len(plain)):
        (x, y), (fx, fy) = plain[i], wrapped[i]
        torch_brain = (x != 0).any(dim=0)
        assert (fx == x).all() and fy.dtype == y.dtype
        assert (fy == (torch_brain & (y == 0)).float()).all()
    assert attacker.train[0][1].shape == (3, 16, 16, 16)


def test_labelflip_rotates_the_attackers_classes(phantom, tmp_path):
    from fedbrats.client.site import open_site

    for task, changes in (("classification", {"model": "resclassifier", "class_input_size": 16}), ("multitask", {})):
        config = flip_config(phantom, tmp_path, task=task, **changes)
        site = open_site(SITE_1, config)
        attacker = attacked_site(config, SITE_1, site)
        assert attacker.train.labels == [(k + 1) % 2 for k in site.train.labels], task
        assert site.train.labels != attacker.train.labels and attacker.val is site.val
        target = attacker.train[0][1]
        if task == "multitask":
            assert isinstance(attacker.train.patients, FlippedRegions)
            target = target[1]
        else:
            assert isinstance(attacker.train, FlippedClasses)
        assert int(target) == attacker.train.labels[0]


def test_labelflip_leaves_the_reply_alone():
    received, reply = to_record(RECEIVED), to_record(TRAINED)
    metrics = {"num-examples": 10.0}
    config = RunConfig(attack="labelflip", attack_sites="1")
    assert misbehave(config, SIMULATED, "1", received, reply, metrics, 1) == (reply, metrics)


def test_a_labelflip_site_trains_through_the_real_client_app(phantom, tmp_path, monkeypatch):
    """One round of the real ClientApp: site 3 trains on its corrupted cases, the history marks it."""
    from fedbrats.client import attack
    from fedbrats.server.app import run_server

    from .local_grid import LocalGrid

    flipped = []
    real = attack.flip_labels
    monkeypatch.setattr(attack, "flip_labels", lambda dataset, k: flipped.append(real(dataset, k)) or flipped[-1])
    config = RunConfig(
        rounds=1, min_sites=2, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"),
        out_dir=str(tmp_path / "run"), model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=1,
        cache="memory", attack="labelflip", attack_sites="3",
    )  # fmt: skip
    run_server(LocalGrid(config.to_flower(), sites=3), config)
    (record,) = read_history(tmp_path / "run" / "history.jsonl")
    entries = {t["site"]: t for t in record["train"]}
    assert entries["3"]["attack"] == "labelflip" and "attack" not in entries["1"] and "attack" not in entries["2"]
    assert record["status"] == "ok" and entries["3"]["num-examples"] >= 1
    (dataset,) = flipped  # one training message, to site 3 only
    assert isinstance(dataset, FlippedRegions) and all(c.startswith("Phantom_003_") for c in dataset.case_ids())
