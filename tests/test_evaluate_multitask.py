"""`fedbrats evaluate` of a multitask checkpoint: segmentation metrics and the class head's AUC, the class
figures equal to those the multitask site computes during the federation (tiny U-Net, 5 mm phantom, CPU)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch

from fedbrats import cli
from fedbrats.shared import tasks
from fedbrats.shared.checkpoint import save_checkpoint
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.data.site_cases import cases_of_sites
from fedbrats.shared.evaluation.classification import auc, score_histograms
from fedbrats.shared.evaluation.evaluate_multitask import evaluate_multitask_checkpoint
from fedbrats.shared.models import create_model
from fedbrats.shared.tasks import checkpoint_metadata, task_for, with_label_classes

TINY = dict(task="multitask", model="resunet", model_width=8, model_depth=2, patch_size=16, cache="memory",
            val_fraction=0.5, min_sites=1)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Two sites of four cases; labels.csv rewritten so each site validates on one case of each grade."""
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, sites=2, cases_per_site=4, voxel_size=5.0, seed=3, progress=False)
    grades = {}
    for found in cases_of_sites(root, root / "partitioning_1.csv", seed=0, val_fraction=0.5).values():
        for cases in (found.train, found.val):
            grades.update({c.case_id: g for c, g in zip(cases, ("HGG", "LGG"), strict=False)})
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("Subject_ID", "Grade"), *grades.items()])
    return root


@pytest.fixture(scope="module")
def checkpoint(phantom, tmp_path_factory):
    """A multitask checkpoint written as the server writes its final one (untrained: evaluation needs no skill)."""
    config = with_label_classes(_config(phantom))
    torch.manual_seed(0)
    model = create_model(config.model, **config.model_config)
    path = tmp_path_factory.mktemp("run") / "checkpoint.safetensors"
    return save_checkpoint(
        path, model, extra={"patch_size": list(config.patch), **checkpoint_metadata(config)}
    )


def _config(phantom, **changes):
    return RunConfig(
        **{"data_dir": str(phantom), "partition": str(phantom / "partitioning_1.csv"), **TINY, **changes}
    )


def test_the_class_figures_equal_the_multitask_sites(phantom, checkpoint, tmp_path, monkeypatch):
    from fedbrats.client.site import open_site
    from fedbrats.shared.checkpoint import load_checkpoint

    config = with_label_classes(_config(phantom))
    result = evaluate_multitask_checkpoint(checkpoint, phantom, phantom / "partitioning_1.csv", config=config,
                                           split="val", device="cpu", n_boot=200)  # fmt: skip
    classes = result.classes
    assert [r["case_id"] for r in result.segmentation.rows] == [r["Subject_ID"] for r in classes.rows]
    assert classes.classes == ("HGG", "LGG") and classes.label_column == "Grade"
    seen: list[np.ndarray] = []  # what the site's evaluation scores, case by case
    softmax = tasks.class_softmax
    monkeypatch.setattr(tasks, "class_softmax", lambda logits: seen.append(softmax(logits)) or seen[-1])
    model, _ = load_checkpoint(checkpoint)
    for site_name in ("1", "2"):
        seen.clear()
        site = open_site({"site-name": site_name, "work-dir": str(tmp_path / site_name)}, config)
        reply = task_for(config).evaluate(model, site.val, config, "cpu")
        rows = [r for r in classes.rows if r["site"] == site_name]
        assert [r["Subject_ID"] for r in rows] == [c.case_id for c in site.val.cases] and len(rows) == 2
        ours = np.array([[r["p_HGG"], r["p_LGG"]] for r in rows])
        np.testing.assert_allclose(ours, np.concatenate(seen), rtol=0, atol=1e-6)
        truth = np.array([("HGG", "LGG").index(r["Grade"]) for r in rows])
        assert truth.tolist() == list(site.val.labels)
        summary = classes.summary[site_name]
        assert summary["auc"] == pytest.approx(reply["auc"], abs=1e-9)
        for key in ("balanced_accuracy", "sensitivity", "specificity", "accuracy"):
            assert summary[key] == pytest.approx(reply[key.replace("_", "-")], abs=1e-9)
        np.testing.assert_array_equal(score_histograms(ours, truth, 2), np.asarray(reply["histograms"]))
        dice = {k: v for k, v in result.segmentation.summary[site_name].items() if k.startswith("dice_")}
        assert all(0.0 <= v <= 1.0 for v in dice.values())
    everything = classes.summary["all"]
    assert everything["cases"] == 4 and classes.interval.auc == everything["auc"]
    probs = np.array([r["p_LGG"] for r in classes.rows])
    labels = [int(r["Grade"] == "LGG") for r in classes.rows]
    assert everything["auc"] == pytest.approx(auc(probs, labels)[0])


def test_evaluate_prints_the_dice_then_the_auc_and_writes_the_class_csv(
    phantom, checkpoint, tmp_path, capsys
):
    out = tmp_path / "eval.csv"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(phantom), "--partition",
            str(phantom / "partitioning_1.csv"), "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    intervals = printed.index("dice_ET: case-weighted")
    match = re.search(r"AUC (\d\.\d{3}) \(95% CI (\d\.\d{3})-(\d\.\d{3})\)", printed)
    assert match and match.start() > intervals, printed
    with out.open() as f:
        segmentation = list(csv.DictReader(f))
    assert len(segmentation) == 8 and "dice_WT" in segmentation[0]  # the segmentation CSV as before
    with (tmp_path / "eval_class.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Subject_ID", "Grade", "p_HGG", "p_LGG"]
    assert [r["Subject_ID"] for r in rows] == [r["case_id"] for r in segmentation]
    assert all(float(r["p_HGG"]) + float(r["p_LGG"]) == pytest.approx(1.0, abs=1e-5) for r in rows)
    expected, _ = auc([float(r["p_LGG"]) for r in rows], [int(r["Grade"] == "LGG") for r in rows])
    value, low, high = map(float, match.groups())
    assert value == pytest.approx(expected, abs=5e-4) and low <= value <= high
    with (tmp_path / "eval_class_sites.csv").open() as f:
        sites = {r["site"]: r for r in csv.DictReader(f)}
    assert set(sites) == {"1", "2", "all"} and sites["all"]["cases"] == "8"
    assert printed.count("written: ") == 5
    assert all((tmp_path / name).is_file() for name in ("eval_sites.csv", "eval_intervals.csv"))


def test_a_multitask_checkpoint_without_its_classes_is_refused_naming_it(phantom, tmp_path, capsys):
    model = create_model("resunet", width=8, depth=2, n_classes=2)
    bare = save_checkpoint(
        tmp_path / "bare.safetensors", model, extra={"task": "multitask", "patch_size": [16] * 3}
    )
    argv = ["evaluate", "--checkpoint", str(bare), "--data", str(phantom), "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {bare}" in err and "has no classes, label_column in its metadata" in err


def test_class_only_gives_the_same_probabilities_without_segmenting(phantom, checkpoint, tmp_path, capsys, monkeypatch):
    from fedbrats.shared.evaluation import evaluate

    config = with_label_classes(_config(phantom))
    both = evaluate_multitask_checkpoint(checkpoint, phantom, phantom / "partitioning_1.csv", config=config,
                                         device="cpu", n_boot=200)  # fmt: skip
    monkeypatch.setattr(evaluate, "score_case", lambda *a, **k: pytest.fail("--class-only segmented a case"))
    out = tmp_path / "eval.csv"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(phantom), "--partition",
            str(phantom / "partitioning_1.csv"), "--out", str(out), "--device", "cpu", "--class-only"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "dice_ET" not in printed and "AUC" in printed and printed.count("written: ") == 2
    assert not out.exists() and (tmp_path / "eval_class_sites.csv").is_file()
    with (tmp_path / "eval_class.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = {r["Subject_ID"]: r["p_LGG"] for r in both.classes.rows}  # every case ("all"), in its own order
    assert sorted(r["Subject_ID"] for r in rows) == sorted(expected) and len(rows) == 8
    np.testing.assert_allclose([float(r["p_LGG"]) for r in rows], [expected[r["Subject_ID"]] for r in rows], atol=1e-6)


def test_class_only_on_a_segmentation_checkpoint_is_refused(phantom, tmp_path, capsys):
    model = create_model("resunet", width=8, depth=2)
    seg = save_checkpoint(tmp_path / "seg.safetensors", model, extra={"task": "segmentation", "patch_size": [16] * 3})
    argv = ["evaluate", "--checkpoint", str(seg), "--data", str(phantom), "--device", "cpu", "--class-only"]
    assert cli.main(argv) == 2
    assert f"--class-only scores a class head; {seg} segments only" in capsys.readouterr().err
