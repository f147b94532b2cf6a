"""The task abstraction: classification and multitask rounds through the real site handlers and server loop."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedbrats.server.app import run_server
from fedbrats.server.history import read_history
from fedbrats.server.replies import histograms_problem
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.config import CHOICES, RunConfig
from fedbrats.shared.data.case_labels import CaseLabelError
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.data.site_cases import cases_of_sites
from fedbrats.shared.evaluation.classification import HISTOGRAM_BINS, histogram_auc
from fedbrats.shared.models import create_model
from fedbrats.shared.tasks import (
    TASKS,
    MultitaskTask,
    class_metrics,
    load_labels,
    round_summary,
    task_for,
    with_label_classes,
)

from .local_grid import LocalGrid

TINY = dict(model_width=8, model_depth=2, patch_size=16, batch_size=2, local_steps=2, local_epochs=1, cache="memory",
            class_input_size=16, val_fraction=0.5, min_sites=1)  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Two sites of four cases (two for validation each); labels.csv rewritten so that site 1 holds HGG
    only (its AUC is undefined) and site 2 validates on one case of each grade."""
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, sites=2, cases_per_site=4, voxel_size=5.0, seed=3, progress=False)
    split = cases_of_sites(root, root / "partitioning_1.csv", seed=0, val_fraction=0.5)
    grades = {c.case_id: "HGG" for c in split["1"].cases}
    for cases in (split["2"].train, split["2"].val):
        grades.update({c.case_id: grade for c, grade in zip(cases, ("HGG", "LGG"), strict=False)})
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("Subject_ID", "Grade"), *grades.items()])
    return root


def _config(phantom, out, **changes):
    values = dict(rounds=1, data_dir=str(phantom), partition=str(phantom / "partitioning_1.csv"), out_dir=str(out),
                  task="classification", model="resclassifier")  # fmt: skip
    return RunConfig(**{**values, **TINY, **changes})


def _evaluations(grid):
    return [r for r in grid.replies if not r.has_error() and "arrays" not in r.content]


def test_every_task_is_a_configuration_choice_and_refuses_a_model_it_cannot_use():
    assert CHOICES["task"] == TASKS
    assert [task_for(RunConfig(task=t)).headline_name for t in TASKS] == ["mean-dice", "auc", "auc"]
    task_for(RunConfig(task="classification", model="densenet121")).check_model(RunConfig(model="densenet121"))
    for task, model in (("segmentation", "resclassifier"), ("classification", "resunet"), ("multitask", "densenet121")):
        config = RunConfig(task=task, model=model)
        with pytest.raises(ValueError, match=f"task '{task}' needs"):
            task_for(config).check_model(config)
    assert RunConfig().model_config["n_classes"] == 0  # segmentation: no classification head
    assert RunConfig(task="multitask", model_classes=3).model_config["n_classes"] == 3
    with pytest.raises(ValueError, match=r"model-classes \(3\) does not apply to task 'segmentation'"):
        _ = RunConfig(model_classes=3).model_config


def test_labels_are_found_and_the_class_count_is_checked(phantom, tmp_path):
    config = _config(phantom, tmp_path)
    labels = load_labels(config, phantom)
    assert labels.classes == ("HGG", "LGG") and labels.label_column == "Grade"
    assert load_labels(config.replace(label_classes="LGG,HGG"), phantom).classes == ("LGG", "HGG")
    assert with_label_classes(config.replace(model_classes=2)).model_classes == 2
    assert with_label_classes(config).label_classes == "HGG,LGG"  # sites number the classes alike
    with pytest.raises(ValueError, match="hold 2 classes .* but model-classes = 3; set model-classes = 2"):
        with_label_classes(config.replace(model_classes=3))
    with pytest.raises(CaseLabelError, match="no labels file"):
        load_labels(config, tmp_path)


def test_classification_round_sends_histograms_and_the_server_pools_the_auc(phantom, tmp_path):
    config = _config(phantom, tmp_path, rounds=2)
    grid = LocalGrid(config.to_flower(), sites=2)
    checkpoint = run_server(grid, config)
    history = read_history(tmp_path / "history.jsonl")
    assert [h["status"] for h in history] == ["ok", "ok"]
    record = history[-1]
    sites = {e["site"]: e for e in record["evaluate"]}
    # site 1 holds one grade: it trains, its AUC is undefined (never 0 or 1), the flag says so
    assert all(t["dropped"] is None for t in record["train"])
    assert "auc" not in sites["1"] and sites["1"]["auc-undefined"] == 1.0
    assert 0.0 <= sites["2"]["auc"] <= 1.0 and "auc-undefined" not in sites["2"]
    assert {"balanced-accuracy", "sensitivity", "specificity", "accuracy"} <= set(sites["2"])
    # what leaves a site: numbers and histograms (counts per class and bin), no per-case score
    for reply in _evaluations(grid):
        assert set(reply.content.keys()) == {"metrics", "site", "scores"}
        counts = reply.content["scores"]["histograms"].numpy()
        assert counts.shape == (2, 1, HISTOGRAM_BINS) and counts.sum() == reply.content["metrics"]["num-examples"] == 2
    summed = np.sum([np.asarray(e["histograms"]) for e in record["evaluate"]], axis=0)
    pooled = histogram_auc(summed)
    assert record["pooled_auc"] == pytest.approx(pooled.auc) and record["pooled_auc_bound"] == pooled.error_bound
    assert record["headline"] == {"name": "auc", "value": record["pooled_auc"]}
    model, meta = load_checkpoint(checkpoint)
    assert meta["task"] == "classification" and meta["classes"] == ["HGG", "LGG"] and meta["label_column"] == "Grade"
    assert meta["class_input_size"] == 16
    assert model(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 2)


@pytest.mark.parametrize(("model", "head"), [("resunet", "bottleneck"), ("selfensemble", "profile")])
def test_multitask_round_reports_both_metric_sets(phantom, tmp_path, model, head):
    config = _config(phantom, tmp_path, task="multitask", model=model, multitask_weight=0.5, model_class_head=head)
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    record = read_history(tmp_path / "history.jsonl")[0]
    assert record["status"] == "ok"
    site = {e["site"]: e for e in record["evaluate"]}["2"]
    assert 0.0 <= site["dice-WT"] <= 1.0 and 0.0 <= site["auc"] <= 1.0 and len(site["histograms"]) == 2
    assert set(record["mean_dice"]) == {"ET", "TC", "WT"} and record["pooled_auc"] is not None
    assert record["headline"]["name"] == "auc"


def test_dp_sgd_trains_a_classifier_with_the_patient_as_unit(phantom, tmp_path):
    from fedbrats.client.ledger import PrivacyLedger

    config = _config(phantom, tmp_path, dp=True, dp_noise_multiplier=1.0, dp_epsilon=50.0, local_steps=2)
    run_server(LocalGrid(config.to_flower(), sites=2), config)
    record = read_history(tmp_path / "history.jsonl")[0]
    assert record["status"] == "ok"
    for entry in record["train"]:
        assert entry["dropped"] is None and entry["epsilon"] > 0
        assert entry["sample-rate"] == pytest.approx(config.batch_size / entry["num-examples"])  # patients
    rows = PrivacyLedger.at(tmp_path / "sites" / "1").rows()
    assert len(rows) == 1 and rows[0].steps == 2 and rows[0].n_cases == 2
    # dp-eval-metrics = suppress: no metric and no histogram leaves a DP site, so nothing to pool
    assert all(set(e) == {"site", "dropped", "num-examples", "eval-seconds"} for e in record["evaluate"])
    assert record["pooled_auc"] is None and record["headline"] == {"name": "auc", "value": None}


def test_losses_reach_both_heads_of_a_multitask_unet():
    model = create_model("resunet", width=8, depth=2, n_classes=2)
    segmentation, logits = model(torch.randn(2, 4, 16, 16, 16))
    assert segmentation.shape == (2, 3, 16, 16, 16) and logits.shape == (2, 2)
    regions = (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    loss = MultitaskTask(weight=2.0).loss((segmentation, logits), (regions, torch.tensor([0.0, 1.0])))
    loss.backward()
    assert model.class_head.linear.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="n_classes must be 0"):
        create_model("resunet", n_classes=1)


def test_single_class_metrics_say_why_and_the_round_summary_pools_sites():
    one = class_metrics(np.array([[0.2, 0.8], [0.4, 0.6]]), np.array([1, 1]), 2)
    assert "auc" not in one and one["auc-undefined"] == 1.0 and "only class 1" in one["reasons"]["auc"]
    other = class_metrics(np.array([[0.9, 0.1], [0.7, 0.3]]), np.array([0, 0]), 2)
    config = RunConfig(task="classification", model="resclassifier")
    summary = round_summary(config, [one, other], [one["histograms"], other["histograms"]])
    assert summary["pooled_auc"] == 1.0 and summary["headline"] == {"name": "auc", "value": 1.0}
    dice = [{"dice-ET": 0.2, "dice-TC": 0.4, "dice-WT": 0.6}, {"num-examples": 3}]  # 2nd: DP-suppressed
    assert round_summary(RunConfig(), dice, [])["headline"] == {"name": "mean-dice", "value": pytest.approx(0.4)}
    assert "pooled_auc" not in round_summary(RunConfig(), dice, [])


def test_histograms_that_miscount_the_sites_cases_are_refused():
    good = np.zeros((2, 1, 100), np.int64)
    good[0, 0, 3], good[1, 0, 90] = 2, 1
    assert histograms_problem(ArrayRecord({"histograms": Array(good)}), 3) is None
    assert "num-examples says 2" in histograms_problem(ArrayRecord({"histograms": Array(good)}), 2)
    assert "negative" in histograms_problem(ArrayRecord({"histograms": Array(-good)}), 3)
    floats = ArrayRecord({"histograms": Array(good.astype(np.float32))})
    assert "whole counts" in histograms_problem(floats, 3)


def test_classification_dataset_gives_cubes_per_patient_and_caches_them_on_disk(phantom, tmp_path):
    from fedbrats.shared.data.class_dataset import ClassificationDataset

    cases = cases_of_sites(phantom, phantom / "partitioning_1.csv", seed=0, val_fraction=0.5)["2"].cases
    label_of = load_labels(_config(phantom, tmp_path), phantom).indices
    data = ClassificationDataset(cases, dict(zip([c.case_id for c in cases], label_of([c.case_id for c in cases]),
                                                 strict=True)), 16, cache="disk", cache_dir=tmp_path)  # fmt: skip
    assert len(data) == len(cases) and sorted(data.labels) == [0, 0, 1, 1]
    image, label = data[0]
    assert image.shape == (4, 16, 16, 16) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert len(list(tmp_path.glob("*.class16v1.npy"))) == len(cases)
    data.reseed(5)
    first = data[1][0]
    data.reseed(5)
    assert torch.equal(data[1][0], first)  # the augmentation stream replays
    assert np.abs(data.image(1)).max() > 0  # z-scored brain, not an empty cube
    with pytest.raises(ValueError, match="no class label for 1 case"):
        ClassificationDataset(cases[:1], {}, 16, cache=None)
