"""A seeded classification run is reproducible on CPU, and `class-balance` weights a site's rare class.

Two centralized runs of one seed once differed by 0.15 in test AUC: `run_train` built its model
before seeding torch, so the initial weights changed from run to run. Tiny synthetic cases, a
width-8 classifier on 16^3 cubes, one thread.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedbrats.client.training_run import one_site_config, run_train
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.class_balance import ClassBalanced, class_weights
from fedbrats.shared.tasks import ClassificationTask, load_labels
from tests.data_fixtures import case_id_for, write_case

GRADES = ["HGG", "LGG", "HGG", "HGG", "HGG", "LGG"]  # cases 1..6; site 1 = 1-3, site 2 = 4-6


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("graded")
    lines, labels = ["Partition_ID,Subject_ID"], ["Subject_ID,Grade"]
    for i, grade in enumerate(GRADES):
        write_case(root, seed=i, seg=False)
        lines.append(f"{1 + i // 3},{case_id_for(i + 1)}")
        labels.append(f"{case_id_for(i + 1)},{grade}")
    (root / "partitioning_1.csv").write_text("\n".join(lines) + "\n")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return root


def _config(**changes) -> RunConfig:
    values = dict(task="classification", model="resclassifier", model_width=8, model_depth=2, class_input_size=16,
                  batch_size=2, val_fraction=0.0, cache="memory", seed=5)  # fmt: skip
    return one_site_config(RunConfig(**{**values, **changes}), epochs=1)


def _train(graded, out, **changes) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(1234 + len(str(out)))  # whatever the global RNG held before, the run seeds its own
    run_train(_config(**changes), graded, partition=graded / "partitioning_1.csv", out=out, device="cpu")
    return load_file(out / "last.safetensors")


@pytest.mark.slow  # three tiny trainings, ~30 s on a loaded CPU
def test_two_seeded_runs_give_identical_weights_and_another_seed_does_not(graded, tmp_path):
    first, second = _train(graded, tmp_path / "a"), _train(graded, tmp_path / "bb")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit for bit
    other = _train(graded, tmp_path / "c", seed=6)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_class_weights_have_mean_one_over_the_site_and_one_class_sites_weigh_one():
    weights = class_weights([0, 0, 0, 1])
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})  # n / (k n_c)
    assert sum(weights[c] for c in [0, 0, 0, 1]) / 4 == pytest.approx(1.0)
    assert class_weights([1, 1, 1]) == {1: 1.0}


def test_class_balance_weights_training_targets_only_and_the_loss_reads_them(graded):
    config = _config(class_balance=True)
    labels = load_labels(config, graded)
    task = ClassificationTask()
    cases = sorted((p for p in graded.iterdir() if p.is_dir()), key=lambda p: p.name)
    from fedbrats.shared.data.cases import find_case

    found = [find_case(p) for p in cases]
    train = task.dataset(found, config, labels=labels, augment=True, cache_dir=None)
    val = task.dataset(found, config, labels=labels, augment=False, cache_dir=None)
    assert isinstance(train, ClassBalanced) and not isinstance(val, ClassBalanced)
    assert train.labels == val.labels == [0, 1, 0, 0, 0, 1] and train.case_ids() == val.case_ids()
    _, target = train[1]
    assert target.tolist() == pytest.approx([1.0, 1.5])  # an LGG: 6 / (2 x 2)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    weighted = torch.tensor([[0.0, 0.75], [1.0, 1.5]])
    per_case = F.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    assert task.loss(logits, weighted) == pytest.approx(float((per_case * torch.tensor([0.75, 1.5])).mean()))
    assert task.loss(logits, torch.tensor([0.0, 1.0])) == pytest.approx(float(per_case.mean()))
    unbalanced = task.dataset(
        found, config.replace(class_balance=False), labels=labels, augment=True, cache_dir=None
    )
    assert unbalanced[1][1].ndim == 0
