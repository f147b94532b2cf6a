"""Random patch-size training (a pool of batch shapes), and the other bag-of-tricks keys with any model."""

from __future__ import annotations

import math

import pytest
import torch

from fedbrats.client.settings import steps_per_epoch, train_config
from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.shared.config import RunConfig
from fedbrats.shared.constants import REGIONS
from fedbrats.shared.data.cases import discover_cases
from fedbrats.shared.data.dataset import PatientDataset
from fedbrats.shared.data.patch_pool import PatchPoolBatches, PoolEntry, batches_per_pass, parse_patch_pool
from fedbrats.shared.models import create_model
from fedbrats.shared.tasks import model_loss
from tests.data_fixtures import write_case

WT = REGIONS.index("WT")



@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    for i in range(4):
        write_case(root, seed=i)  # 24x24x16 volumes, a tumor in each
    found, _ = discover_cases(root)
    return found


# ---- parsing and validation -----------------------------------------------------------------------


def test_pool_is_parsed_from_patch_x_batch_pairs():
    assert parse_patch_pool("48x2,64x1") == (PoolEntry(48, 2), PoolEntry(64, 1))
    assert parse_patch_pool(" 64X4 , 128x1 ") == (PoolEntry(64, 4), PoolEntry(128, 1))
    assert parse_patch_pool("") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("48", r"entry '48' must be PATCHxBATCH"),
        ("48x2;64x1", r"entry '48x2;64x1' must be PATCHxBATCH"),
        ("48x-2", r"entry '48x-2' must be PATCHxBATCH"),
        ("48x0", r"entry '48x0': patch edge and batch size must be >= 1"),
        ("48x2,,64x1", r"has an empty entry"),
        ("48x2,48x1", r"lists patch size 48 twice"),
    ],
)
def test_a_bad_pool_is_refused_naming_the_entry(text, message):
    with pytest.raises(ValueError, match=message):
        parse_patch_pool(text)
    with pytest.raises(ValueError, match="invalid run configuration: patch-pool"):
        RunConfig(patch_pool=text)


def test_run_configuration_checks_the_pool_against_depth_dp_and_task():
    assert RunConfig(patch_pool="64x2,128x1", model_depth=5).patch_pool == "64x2,128x1"
    with pytest.raises(ValueError, match=r"patch-pool patch sizes \[40\] must be multiples of .* = 16"):
        RunConfig(patch_pool="64x2,40x4", model_depth=5)
    with pytest.raises(ValueError, match="does not combine with dp = true"):
        RunConfig(patch_pool="64x2", dp=True)
    with pytest.raises(ValueError, match="applies to task 'segmentation'"):
        RunConfig(patch_pool="64x2", task="classification")
    flower = RunConfig(patch_pool="64x2").to_flower()
    assert flower["patch-pool"] == "64x2" and RunConfig.from_flower(flower).patch_pool == "64x2"


def test_the_schedule_counts_about_one_pass_per_epoch():
    config = RunConfig(patch_pool="16x4,32x1", patch_size=16, model_depth=3, batch_size=2)
    assert steps_per_epoch(config, 10) == math.ceil(10 / 2.5) == 4
    assert steps_per_epoch(config.replace(patch_pool=""), 10) == 5
    assert train_config(config, 10).patch_pool == ((16, 4), (32, 1))
    assert train_config(config.replace(patch_pool=""), 10).patch_pool == ()


# ---- sampling -------------------------------------------------------------------------------------


def test_batches_follow_the_pool_and_each_pass_sees_every_patient_once():
    pool = parse_patch_pool("16x3,32x1")
    sampler = PatchPoolBatches(9, pool, seed=0)
    batches = list(sampler) + list(sampler)  # two passes continue one stream
    assert len(sampler) == batches_per_pass(9, pool) == 5
    shapes = {(len(b), b[0][1]) for b in batches}
    assert shapes == {(3, (16, 16, 16)), (1, (32, 32, 32))}  # both entries are drawn, nothing else
    for b in batches:
        # distinct patients, one shape
        assert len({i for i, _ in b}) == len(b) and len({p for _, p in b}) == 1
    drawn = [i for b in batches for i, _ in b]
    first_pass = drawn[:9]
    assert sorted(first_pass) == list(range(9))  # the first nine draws are a permutation
    again = [[i for i, _ in b] for b in PatchPoolBatches(9, pool, seed=0)]
    assert again == [[i for i, _ in b] for b in batches[:5]]  # same seed, same batches
    capped = PatchPoolBatches(2, parse_patch_pool("16x5"), seed=1)
    assert [len(b) for b in capped] == [2]  # a batch never holds more than the cases


def test_dataset_cuts_the_drawn_patch_size_with_foreground_bias(cases):
    dataset = PatientDataset(cases, (16, 16, 16), foreground_prob=1.0, cache="memory", progress=False)
    image, regions = dataset[(1, (8, 8, 8))]
    assert image.shape == (4, 8, 8, 8) and regions.shape == (3, 8, 8, 8)
    assert dataset[1][0].shape == (4, 16, 16, 16)  # a plain index keeps patch-size
    big = dataset[(0, (32, 32, 32))][0]
    assert big.shape == (4, 32, 32, 32)  # larger than the 24x24x16 volume: zero-padded
    # foreground-prob 1: tumor in every patch
    assert all(dataset[(i % 4, (8, 8, 8))][1][WT].any() for i in range(12))


# ---- training: pool, warm-up and foreground sampling with any model ------------------------------


@pytest.mark.parametrize("name", ["tunet", "selfensemble"])
def test_training_draws_batches_from_the_pool_and_warms_up(cases, name):
    dataset = PatientDataset(cases, (16, 16, 16), foreground_prob=1.0, cache="memory", progress=False)
    torch.manual_seed(0)
    model = create_model(name, width=8, depth=2)
    shapes, lrs = [], []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    config = TrainConfig(steps=6, lr=1e-3, warmup_steps=3, schedule="constant", patch_pool=((8, 3), (16, 1)))
    result = train_local(model, dataset, config, loss_fn=model_loss(name),
                         progress=lambda done, planned, loss, lr: lrs.append(lr))  # fmt: skip
    assert set(shapes) == {(3, 4, 8, 8, 8), (1, 4, 16, 16, 16)}
    assert result.steps == 6 and result.examples == sum(s[0] for s in shapes)
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3])  # linear warm-up, any model
