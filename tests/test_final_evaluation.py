"""The federation's final evaluation: the global model through `fedbrats evaluate --split val`, into the report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fedbrats.shared.checkpoint import save_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.models import create_model
from fedbrats.simulations.final_evaluation import (
    CSV_FILE,
    RESULT_FILE,
    final_evaluation,
    final_evaluation_lines,
    read_final_evaluation,
)
from tests.data_fixtures import case_id_for, write_case


def _federation(root, *, seg=True, grades=None):
    lines = ["Partition_ID,Subject_ID"]
    for i in range(8):  # sites 1 and 2, four cases each
        write_case(root, seed=i, seg=seg)
        lines.append(f"{1 + i // 4},{case_id_for(i + 1)}")
    (root / "partitioning_1.csv").write_text("\n".join(lines) + "\n")
    if grades:
        rows = [f"{case_id_for(i + 1)},{g}" for i, g in enumerate(grades)]
        (root / "labels.csv").write_text("Subject_ID,Grade\n" + "\n".join(rows) + "\n")
    return root


def _config(root, **extra):
    return RunConfig(data_dir=str(root), partition=str(root / "partitioning_1.csv"), **{"val_fraction": 0.5, **extra})


def test_a_segmentation_run_is_scored_on_every_sites_validation_cases(tmp_path):
    torch.manual_seed(0)
    root, run = _federation(tmp_path / "data"), tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "global_model.safetensors", create_model("resunet", width=8, depth=2),
                    extra={"patch_size": [16, 16, 16]})  # fmt: skip
    result = final_evaluation(run, _config(root))
    rows = list(csv.DictReader((run / CSV_FILE).open()))
    assert result["cases"] == len(rows) == 4 and sorted(result["sites"]) == ["1", "2"]  # half of each site
    assert json.loads((run / RESULT_FILE).read_text()) == read_final_evaluation(run) == result
    wt = next(r for r in result["intervals"] if r["metric"] == "dice_WT")
    assert wt["case_weighted"] == pytest.approx(np.mean([float(r["dice_WT"]) for r in rows]), rel=1e-5)  # CSV: 6 digits
    assert wt["case_low"] <= wt["case_weighted"] <= wt["case_high"]
    text = "\n".join(final_evaluation_lines(result))
    assert "## Final evaluation" in text and "post-processing" in text and "| dice_WT |" in text
    assert "HD95 pooled" in text and "| sensitivity" not in text  # the report shows Dice and HD95 only


def test_a_classification_run_gets_its_auc_with_an_interval(tmp_path):
    root, run = _federation(tmp_path / "data", seg=False, grades=["HGG", "LGG"] * 4), tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "global_model.safetensors", create_model("resclassifier", width=8, depth=2),
                    extra={"task": "classification", "classes": ["HGG", "LGG"], "label_column": "Grade",
                           "class_input_size": 16})  # fmt: skip
    result = final_evaluation(run, _config(root, task="classification"))
    assert result["task"] == "classification" and result["cases"] == 4
    auc = result["auc"]
    assert auc["value"] is None or auc["low"] <= auc["value"] <= auc["high"]
    assert "AUC" in "\n".join(final_evaluation_lines(result))


def test_no_model_or_no_validation_case_skips_with_a_warning_and_writes_nothing(tmp_path, caplog):
    root, run = _federation(tmp_path / "data"), tmp_path / "run"
    run.mkdir()
    assert final_evaluation(run, _config(root)) is None and "does not exist" in caplog.text
    save_checkpoint(run / "global_model.safetensors", create_model("resunet", width=8, depth=2),
                    extra={"patch_size": [16, 16, 16]})  # fmt: skip
    assert final_evaluation(run, _config(root, val_fraction=0.0)) is None and "no case to evaluate" in caplog.text
    assert not (run / RESULT_FILE).exists() and final_evaluation_lines(read_final_evaluation(run)) == []
    (run / RESULT_FILE).write_text("{broken")
    assert read_final_evaluation(run) is None and "ignoring" in caplog.text
