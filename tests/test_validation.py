"""One test per kind of malformed input, label-set detection, and the `data check` exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from fedbrats.check_output import format_report, run_check
from fedbrats.shared.constants import BRATS2021, BRATS2023, LABELS_2021, LABELS_2023, LABELS_2024
from fedbrats.shared.data.cases import find_case
from fedbrats.shared.data.check import check_case, check_root
from fedbrats.shared.data.problems import CaseError, CaseProblem
from fedbrats.shared.data.volumes import detect_label_set, load_case
from tests.data_fixtures import AFFINE, SHAPE, case_id_for, synthetic_arrays, truncate, write_case

CID = case_id_for(1)


def problems_of(tmp_path, **kw) -> list[CaseProblem]:
    return check_case(find_case(write_case(tmp_path, CID, **kw)))


def only_fatal(problems, file_suffix: str) -> CaseProblem:
    fatal = [p for p in problems if p.fatal]
    assert len(fatal) == 1, problems
    assert fatal[0].case_id == CID and fatal[0].file == f"{CID}_{file_suffix}.nii.gz"
    return fatal[0]


def test_clean_case_has_no_problems(tmp_path):
    assert problems_of(tmp_path) == []


def test_missing_modality(tmp_path):
    write_case(tmp_path, CID, missing=("t2",))
    report = check_root(tmp_path)
    assert report.unusable_ids == [CID] and report.usable == []
    assert "missing t2" in report.problems[0].problem


def test_shape_mismatch(tmp_path):
    p = only_fatal(problems_of(tmp_path, arrays={"t2": np.ones((24, 24, 15), np.int16)}), "t2")
    assert "(24, 24, 15)" in p.problem and "t1" in p.problem and "one co-registered grid" in p.problem


def test_affine_mismatch(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    p = only_fatal(problems_of(tmp_path, affines={"flair": shifted}), "flair")
    assert "affine differs" in p.problem and "0.5" in p.problem


def test_affine_within_tolerance_is_accepted(tmp_path):
    nudged = AFFINE.copy()
    nudged[0, 3] += 1e-5
    assert problems_of(tmp_path, affines={"seg": nudged}) == []


def test_nan_voxel(tmp_path):
    images, _ = synthetic_arrays()
    t1 = images["t1"].astype(np.float32)
    t1[3, 4, 5] = np.nan
    p = only_fatal(problems_of(tmp_path, arrays={"t1": t1}), "t1")
    assert "1 non-finite" in p.problem


def test_empty_image(tmp_path):
    p = only_fatal(problems_of(tmp_path, arrays={"t1ce": np.zeros(SHAPE, np.int16)}), "t1ce")
    assert "every voxel is zero" in p.problem


def test_constant_image(tmp_path):
    p = only_fatal(problems_of(tmp_path, arrays={"flair": np.full(SHAPE, 7, np.int16)}), "flair")
    assert "equals 7" in p.problem and "constant" in p.problem


def test_label_outside_set(tmp_path):
    _, seg = synthetic_arrays()
    seg[0, 0, 0] = 3  # BraTS 2023 ET value in a 2021 case
    p = only_fatal(problems_of(tmp_path, arrays={"seg": seg}), "seg")
    assert "{0, 1, 2, 3, 4}" in p.problem and "include {3}" in p.problem and "{0, 1, 2, 4}" in p.problem


def test_non_integer_labels(tmp_path):
    _, seg = synthetic_arrays()
    seg = seg.astype(np.float32)
    seg[1, 1, 1] = 0.5
    p = only_fatal(problems_of(tmp_path, arrays={"seg": seg}), "seg")
    assert "non-integer" in p.problem and "0.5" in p.problem


def test_2d_image(tmp_path):
    p = only_fatal(problems_of(tmp_path, arrays={"t1": np.ones((24, 24), np.int16)}), "t1")
    assert "2D image" in p.problem and "expected a 3D volume" in p.problem


def test_4d_image(tmp_path):
    p = only_fatal(problems_of(tmp_path, arrays={"t2": np.ones((*SHAPE, 2), np.int16)}), "t2")
    assert "4D image" in p.problem


def test_4d_image_with_one_volume_is_accepted(tmp_path):
    images, _ = synthetic_arrays()
    assert problems_of(tmp_path, arrays={"t2": images["t2"][..., None]}) == []


def test_truncated_gzip_is_reported_not_raised(tmp_path):
    folder = write_case(tmp_path, CID)
    truncate(folder / f"{CID}_t1ce.nii.gz")
    p = only_fatal(check_case(find_case(folder)), "t1ce")
    assert "cannot read" in p.problem and "re-download" in p.problem


def test_not_a_nifti(tmp_path):
    folder = write_case(tmp_path, CID)
    (folder / f"{CID}_seg.nii.gz").write_bytes(b"this is not a nifti file at all")
    p = only_fatal(check_case(find_case(folder)), "seg")
    assert "cannot read" in p.problem


def test_stray_file_is_a_warning(tmp_path):
    write_case(tmp_path, CID, extra_files=("notes.txt",))
    report = check_root(tmp_path)
    assert [c.case_id for c in report.usable] == [CID]
    assert [(p.file, p.fatal) for p in report.problems] == [("notes.txt", False)]


def test_one_pass_reports_every_bad_file(tmp_path):
    folder = write_case(tmp_path, CID, arrays={"t1": np.zeros(SHAPE, np.int16)})
    truncate(folder / f"{CID}_t2.nii.gz")
    assert {p.file for p in check_case(find_case(folder))} == {f"{CID}_t1.nii.gz", f"{CID}_t2.nii.gz"}


def test_load_case_raises_case_error_naming_file(tmp_path):
    case = find_case(write_case(tmp_path, CID, arrays={"t1": np.zeros(SHAPE, np.int16)}))
    with pytest.raises(CaseError) as info:
        load_case(case)
    assert info.value.problems[0].file == f"{CID}_t1.nii.gz"
    assert CID in str(info.value) and "expected" in str(info.value)


def test_load_case_needs_seg_unless_told(tmp_path):
    case = find_case(write_case(tmp_path, CID, seg=False))
    with pytest.raises(CaseError, match="no segmentation"):
        load_case(case)
    volume = load_case(case, with_labels=False)
    assert volume.regions is None and volume.label_set == LABELS_2021
    assert [p.fatal for p in check_case(case)] == [False]  # usable for prediction: a warning only


@pytest.mark.parametrize(
    ("layout", "labels", "expected"),
    [
        ("brats2021", "brats2021", LABELS_2021),
        ("brats2023", "brats2023", LABELS_2023),
        ("brats2023", "brats2024", LABELS_2024),
    ],
)
def test_label_set_detected_per_case(tmp_path, layout, labels, expected):
    case = find_case(write_case(tmp_path, layout=layout, labels=labels))
    assert load_case(case).label_set == expected


def test_detect_label_set_rules():
    assert detect_label_set([0, 1, 2], BRATS2023, "c", "f") == LABELS_2023  # narrowest set that fits
    assert detect_label_set([0, 4], BRATS2023, "c", "f") == LABELS_2024
    with pytest.raises(CaseError, match=r"c/f: label values \{0, 5\} include \{5\}"):
        detect_label_set([0, 5], BRATS2023, "c", "f")
    with pytest.raises(CaseError, match=r"include \{3\}"):
        detect_label_set([0, 1, 3], BRATS2021, "c", "f")


def test_run_check_exit_codes(tmp_path, capsys):
    assert run_check(tmp_path / "absent", progress=False) == 2
    assert run_check(tmp_path, progress=False) == 1  # no cases
    for i in range(3):
        write_case(tmp_path, seed=i)
    assert run_check(tmp_path, progress=False) == 0
    assert "3 cases, all usable" in capsys.readouterr().out
    write_case(tmp_path, case_id_for(8), extra_files=("notes.txt",))
    assert run_check(tmp_path, progress=False) == 0  # warnings do not fail the check
    write_case(tmp_path, case_id_for(9), arrays={"t1": np.zeros(SHAPE, np.int16)})
    assert run_check(tmp_path, workers=2, progress=False) == 1
    out = capsys.readouterr().out
    assert case_id_for(9) in out and "unusable" in out


def test_format_report_columns(tmp_path):
    write_case(tmp_path, CID, missing=("t1",))
    table = format_report(check_root(tmp_path))
    assert [c.header for c in table.columns] == ["case", "file", "problem", "severity"]
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert CID in text and "missing t1" in text and "error" in text


def test_check_in_a_log_prints_one_unwrapped_line_per_problem(tmp_path, capsys):
    long_id = case_id_for(7) + "_" + "x" * 90  # a table would fold a name this long across lines
    write_case(tmp_path, long_id, missing=("t1",), extra_files=("notes.txt",))
    write_case(tmp_path, CID)
    assert run_check(tmp_path, progress=False, plain=True) == 1
    lines = capsys.readouterr().out.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {long_id}") and "t1" in errors[0]
    assert any(line.startswith(f"warning: {long_id}/notes.txt: ") for line in lines)
    assert lines[-1] == f"2 cases, 1 unusable: {long_id}"


def test_check_json_report(tmp_path, capsys):
    write_case(tmp_path, CID)
    write_case(tmp_path, case_id_for(2), missing=("flair",))
    assert run_check(tmp_path, progress=False, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 2 and report["usable"] == [CID] and report["unusable"] == [case_id_for(2)]
    assert report["ok"] is False
    (problem,) = [p for p in report["problems"] if p["severity"] == "error"]
    assert problem["case"] == case_id_for(2) and "flair" in problem["file"] + problem["problem"]
    assert run_check(tmp_path / "absent", as_json=True) == 2
    assert "is not a directory" in json.loads(capsys.readouterr().out)["error"]
