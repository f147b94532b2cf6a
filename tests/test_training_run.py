"""`fedbrats train` baseline and `fedbrats evaluate` on tiny synthetic cases (24x24x16, CPU)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from rich.console import Console

from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.client.training_run import one_site_config, run_train, training_cases
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.cases import discover_cases
from fedbrats.shared.data.dataset import PatientDataset
from fedbrats.shared.data.partition import PartitionError
from fedbrats.shared.evaluation.evaluate import METRIC_COLUMNS, evaluate_checkpoint
from fedbrats.shared.models import create_model
from tests.data_fixtures import case_id_for, write_case

SITES = {"1": [1, 2, 3], "2": [4, 5]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    lines = ["Partition_ID,Subject_ID"]
    for site, seeds in SITES.items():
        for seed in seeds:
            write_case(root, seed=seed)
            lines.append(f"{site},{case_id_for(seed + 1)}")
    (root / "partitioning_1.csv").write_text("\n".join(lines) + "\n")
    return root


def _quiet() -> Console:
    return Console(quiet=True)


#: The one-site federation of the tests: a tiny model on 16^3 patches.
TINY = RunConfig(model_width=8, model_depth=2, patch_size=16, batch_size=2, rounds=2, cache="memory")


def test_training_cases_pool_or_pick_sites(data):
    ids = sorted(case_id_for(s + 1) for seeds in SITES.values() for s in seeds)
    train, val = training_cases(TINY, data, data / "partitioning_1.csv", None)
    assert sorted(c.case_id for c in train + val) == ids and len(val) == 2  # one validation case per site
    train1, val1 = training_cases(TINY, data, data / "partitioning_1.csv", "1")
    assert {c.case_id for c in train1 + val1} == {case_id_for(s + 1) for s in SITES["1"]}
    with pytest.raises(ValueError, match="--partition"):
        training_cases(TINY, data, None, "1")


def test_epochs_make_the_one_site_federation():
    config = one_site_config(RunConfig(rounds=20, local_epochs=3, local_steps=5, epoch_decay=0.9), 4)
    assert (config.rounds, config.local_epochs, config.local_steps, config.epoch_decay) == (4, 1, 0, 1.0)
    assert one_site_config(TINY) == TINY  # no --epochs: as long as each site of the federation trains
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        one_site_config(TINY, 0)
    with pytest.raises(ValueError, match="non-private baseline"):
        one_site_config(RunConfig(dp=True))


def test_training_on_patient_dataset_is_reproducible(data):
    """Augmented random patches come from the dataset's own RNG: train_local must reseed it."""
    cases, _ = discover_cases(data)
    dataset = PatientDataset(cases, (16, 16, 16), augment=True, progress=False)
    states = []
    for start_step in (0, 0, 5):
        torch.manual_seed(0)
        model = create_model("resunet", width=8, depth=2)
        train_local(model, dataset, TrainConfig(steps=3, lr=1e-2, seed=1), start_step=start_step)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # a later round draws other patches


def test_train_then_evaluate(data, tmp_path):
    out = tmp_path / "run"
    summary = run_train(TINY, data, partition=data / "partitioning_1.csv", out=out, device="cpu", console=_quiet())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(0.0 <= e["val"]["dice_WT"] <= 1.0 for e in metrics["epochs"])
    assert len(metrics["val_cases"]) == 2 and len(metrics["train_cases"]) == 3
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    recorded = RunConfig.from_flower(json.loads((out / "run_config.json").read_text()))
    assert recorded.model_width == 8 and recorded.partition == str((data / "partitioning_1.csv").resolve())
    model, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["selected"] == "best" and meta["epoch"] == metrics["best_epoch"]
    assert meta["patch_size"] == [16, 16, 16] and meta["label_set"] == "brats2021"
    assert model.config["width"] == 8

    result = evaluate_checkpoint(
        out / "checkpoint.safetensors", data, data / "partitioning_1.csv", out_csv=tmp_path / "eval.csv",
        split="val", device="cpu", console=_quiet(),
    )  # fmt: skip
    assert sorted(r["case_id"] for r in result.rows) == sorted(metrics["val_cases"])
    assert set(result.summary) == {"1", "2", "all"} and result.summary["all"]["cases"] == 2
    with (tmp_path / "eval.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["site", "case_id", *METRIC_COLUMNS, "hd95_definition"]
    assert {r["hd95_definition"] for r in table} == {"pooled"} and len(result.intervals) == len(METRIC_COLUMNS)
    assert all(0.0 <= float(r["dice_ET"]) <= 1.0 for r in table)
    assert result.written == [tmp_path / "eval.csv", tmp_path / "eval_sites.csv", tmp_path / "eval_intervals.csv"]
    everything = evaluate_checkpoint(out / "last.safetensors", data, console=_quiet())
    assert len(everything.rows) == 5 and set(everything.summary) == {"all"}


def test_unknown_site_is_an_error_naming_the_known_ones(data, tmp_path):
    with pytest.raises(PartitionError, match="unknown site '9'.*1, 2"):
        run_train(TINY, data, partition=data / "partitioning_1.csv", site="9", out=tmp_path / "run", console=_quiet())
