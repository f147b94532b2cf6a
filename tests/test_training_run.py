"""`fedbrats train` baseline and `fedbrats evaluate` on tiny synthetic cases (24x24x16, CPU)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from rich.console import Console

from fedbrats.client.trainer import TrainConfig, train_local
from fedbrats.client.training_run import run_train, select_cases
from fedbrats.shared.checkpoint import load_checkpoint
from fedbrats.shared.data.cases import discover_cases
from fedbrats.shared.data.dataset import PatientDataset
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


def test_select_cases_splits_each_site(data):
    ids = sorted(case_id_for(s + 1) for seeds in SITES.values() for s in seeds)
    train, val = select_cases(ids, data / "partitioning_1.csv", None, seed=0, val_fraction=0.2)
    assert sorted(train + val) == ids and len(val) == 2  # one validation case per site
    train1, val1 = select_cases(ids, data / "partitioning_1.csv", "1", seed=0, val_fraction=0.2)
    assert set(train1 + val1) == {case_id_for(s + 1) for s in SITES["1"]}
    with pytest.raises(ValueError, match="--partition"):
        select_cases(ids, None, "1", seed=0, val_fraction=0.2)


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
    rc = run_train(
        data, partition=data / "partitioning_1.csv", site=None, model="resunet",
        model_config={"width": 8, "depth": 2}, epochs=2, patch_size=(16, 16, 16), batch_size=2, lr=1e-3,
        out=out, seed=0, device="cpu", console=_quiet(),
    )  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(0.0 <= e["val"]["dice_WT"] <= 1.0 for e in metrics["epochs"])
    assert len(metrics["val_cases"]) == 2 and len(metrics["train_cases"]) == 3
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    model, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["selected"] == "best" and meta["epoch"] == metrics["best_epoch"]
    assert meta["patch_size"] == [16, 16, 16] and meta["label_set"] == "brats2021"
    assert model.config["width"] == 8

    rows, summary = evaluate_checkpoint(
        out / "checkpoint.safetensors", data, data / "partitioning_1.csv", out_csv=tmp_path / "eval.csv",
        split="val", device="cpu", console=_quiet(),
    )  # fmt: skip
    assert sorted(r["case_id"] for r in rows) == sorted(metrics["val_cases"])
    assert set(summary) == {"1", "2", "all"} and summary["all"]["cases"] == 2
    with (tmp_path / "eval.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["site", "case_id", *METRIC_COLUMNS]
    assert all(0.0 <= float(r["dice_ET"]) <= 1.0 for r in table)
    assert (tmp_path / "eval_sites.csv").exists()
    rows_all, summary_all = evaluate_checkpoint(out / "last.safetensors", data, console=_quiet())
    assert len(rows_all) == 5 and set(summary_all) == {"all"}


def test_bad_input_exits_2_with_a_reason(data, tmp_path, capsys):
    rc = run_train(
        data, partition=data / "partitioning_1.csv", site="9", model="resunet", model_config={"width": 8, "depth": 2},
        epochs=1, patch_size=(16, 16, 16), batch_size=2, lr=1e-3, out=tmp_path / "run", seed=0, console=_quiet(),
    )  # fmt: skip
    assert rc == 2
    assert "unknown site '9'" in capsys.readouterr().err
