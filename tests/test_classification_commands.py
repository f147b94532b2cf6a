"""Classification in the commands: `fedbrats train --set task=classification`, then `evaluate` and
`predict` on its checkpoint (tiny synthetic cases and a width-8 classifier on 16^3 cubes, CPU)."""

from __future__ import annotations

import csv
import json
import re

import pytest

from fedbrats import cli, commands
from fedbrats.shared.checkpoint import read_metadata, save_checkpoint
from fedbrats.shared.evaluation.classification import auc
from fedbrats.shared.models import create_model
from tests.data_fixtures import case_id_for, write_case

GRADES = ["HGG", "LGG", "HGG", "LGG", "LGG", "HGG", "LGG", "HGG"]  # cases 1..8; site 1 = 1-4, site 2 = 5-8
TINY = ["--preset", "demo", "--model", "resclassifier", "--set", "task=classification", "--set", "model-width=8",
        "--set", "model-depth=2", "--set", "class-input-size=16", "--set", "val-fraction=0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("graded")
    lines, labels = ["Partition_ID,Subject_ID"], ["Subject_ID,Grade"]
    for i, grade in enumerate(GRADES):
        write_case(root, seed=i, seg=False)  # a classifier needs no masks
        lines.append(f"{1 + i // 4},{case_id_for(i + 1)}")
        labels.append(f"{case_id_for(i + 1)},{grade}")
    (root / "partitioning_1.csv").write_text("\n".join(lines) + "\n")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(graded, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--data", str(graded), "--partition", str(graded / "partitioning_1.csv"), "--out", str(out),
            "--epochs", "2", "--device", "cpu", *TINY]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_train_writes_a_classifier_checkpoint_that_names_its_task(trained):
    meta = read_metadata(trained / "checkpoint.safetensors")
    assert (meta["task"], meta["classes"], meta["label_column"]) == ("classification", ["HGG", "LGG"], "Grade")
    assert meta["class_input_size"] == 16 and meta["model_name"] == "resclassifier"
    assert meta["model_config"]["n_classes"] == 2  # from the labels
    metrics = json.loads((trained / "metrics.json").read_text())
    assert (metrics["task"], metrics["headline"], metrics["classes"]) == ("classification", "auc", ["HGG", "LGG"])
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and len(metrics["val_cases"]) == 4
    for epoch in metrics["epochs"]:
        assert 0.0 <= epoch["val"]["balanced_accuracy"] <= 1.0 and 0.0 <= epoch["val"]["auc"] <= 1.0
        assert epoch["val_headline"] == epoch["val"]["auc"]  # 4 validation cases of both grades
    assert meta["epoch"] == metrics["best_epoch"] and metrics["checkpoint"] == "best validation auc"
    assert (trained / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_writes_one_row_per_case_and_prints_the_auc(graded, trained, tmp_path, capsys):
    out = tmp_path / "eval.csv"
    argv = ["evaluate", "--checkpoint", str(trained / "checkpoint.safetensors"), "--data", str(graded),
            "--partition", str(graded / "partitioning_1.csv"), "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Subject_ID", "Grade", "p_HGG", "p_LGG"]
    assert {r["Subject_ID"]: r["Grade"] for r in rows} == {case_id_for(i + 1): g for i, g in enumerate(GRADES)}
    assert all(float(r["p_HGG"]) + float(r["p_LGG"]) == pytest.approx(1.0, abs=1e-5) for r in rows)
    expected, _ = auc([float(r["p_LGG"]) for r in rows], [int(r["Grade"] == "LGG") for r in rows])
    match = re.search(r"AUC (\d\.\d{3}) \(95% CI (\d\.\d{3})-(\d\.\d{3})\)", printed)
    assert match, printed
    value, low, high = map(float, match.groups())
    assert value == pytest.approx(expected, abs=5e-4) and low <= value <= high
    with (tmp_path / "eval_sites.csv").open() as f:
        sites = {r["site"]: r for r in csv.DictReader(f)}
    assert set(sites) == {"1", "2", "all"} and sites["all"]["cases"] == "8"
    val = tmp_path / "val.csv"
    assert cli.main([*argv[:-4], "--out", str(val), "--split", "val", "--set", "val-fraction=0.5"]) == 0
    assert len(val.read_text().splitlines()) == 1 + 4  # the validation cases of training, two per site


def test_predict_prints_and_writes_the_class_probabilities(graded, trained, tmp_path, capsys):
    case = case_id_for(3)
    argv = ["predict", "--checkpoint", str(trained / "checkpoint.safetensors"), "--case", str(graded / case),
            "--out", str(tmp_path / "pred"), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "pred" / f"{case}_class.json").read_text())
    probs = result["probabilities"]
    assert list(probs) == ["HGG", "LGG"] and sum(probs.values()) == pytest.approx(1.0)
    assert result["predicted"] == max(probs, key=probs.get) and result["label_column"] == "Grade"
    assert f"p_HGG: {probs['HGG']:.4f}" in printed and f"predicted: {result['predicted']}" in printed
    evaluated = tmp_path / "all.csv"
    assert cli.main(["evaluate", "--checkpoint", str(trained / "checkpoint.safetensors"), "--data", str(graded),
                     "--out", str(evaluated), "--device", "cpu"]) == 0  # fmt: skip
    row = next(r for r in csv.DictReader(evaluated.open()) if r["Subject_ID"] == case)
    assert float(row["p_LGG"]) == pytest.approx(probs["LGG"], abs=1e-5)  # the same preprocessing


def test_classifier_checkpoints_without_their_metadata_or_with_other_classes_are_refused(graded, tmp_path, capsys):
    bare = save_checkpoint(tmp_path / "bare.safetensors", create_model("resclassifier", width=8, depth=2),
                           extra={"task": "classification", "classes": ["HGG", "LGG"]})  # fmt: skip
    argv = ["evaluate", "--checkpoint", str(bare), "--data", str(graded), "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "has no label_column, class_input_size in its metadata" in capsys.readouterr().err
    other = save_checkpoint(tmp_path / "other.safetensors", create_model("resclassifier", width=8, depth=2),
                            extra={"task": "classification", "classes": ["0", "1"], "label_column": "label",
                                   "class_input_size": 16})  # fmt: skip
    assert cli.main(["evaluate", "--checkpoint", str(other), "--data", str(graded), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has Grade 'HGG'; expected one of ['0', '1']" in err and "--set label-classes=A,B" in err
    named = ["--set", "label-classes=HGG,LGG"]
    assert cli.main(["evaluate", "--checkpoint", str(other), "--data", str(graded), "--device", "cpu", *named]) == 0
    assert "AUC " in capsys.readouterr().out


def test_compare_refuses_a_dice_target_for_a_classifier_before_any_data(monkeypatch, capsys):
    monkeypatch.setattr(commands, "_federation_data", lambda *a: pytest.fail("data prepared before the check"))
    argv = ["compare", "--strategies", "fedavg", "--set", "task=classification", "--set", "model=resclassifier"]
    assert cli.main([*argv, "--target-dice", "0.7"]) == 2
    assert "--target-dice applies to segmentation's mean Dice" in capsys.readouterr().err
    assert cli.main([*argv, "--target", "1.5"]) == 2
    assert "target must be in (0, 1], got 1.5" in capsys.readouterr().err
