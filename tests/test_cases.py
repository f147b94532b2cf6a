"""Case discovery: both BraTS layouts, dataset-level files, stray and missing files."""

from __future__ import annotations

import gzip

import pytest

from fedbrats.shared.constants import BRATS2021, BRATS2023, MODALITIES
from fedbrats.shared.data.cases import discover_cases, find_case
from fedbrats.shared.data.problems import CaseError
from tests.data_fixtures import case_id_for, write_case


def test_discovers_both_layouts_per_case(tmp_path):
    write_case(tmp_path, layout="brats2021", seed=0)
    write_case(tmp_path, layout="brats2023", seed=1)
    cases, problems = discover_cases(tmp_path)
    assert problems == []
    by_id = {c.case_id: c for c in cases}
    assert by_id[case_id_for(1, "brats2021")].layout == BRATS2021
    c23 = by_id[case_id_for(2, "brats2023")]
    assert c23.layout == BRATS2023
    assert list(c23.files) == [*MODALITIES, "seg"]
    assert c23.files["t1ce"].name.endswith("-t1c.nii.gz") and c23.files["flair"].name.endswith("-t2f.nii.gz")


def test_root_dataset_files_and_hidden_entries_are_ignored(tmp_path):
    write_case(tmp_path)
    for name in ("partitioning_1.csv", "labels.csv", "sites.json", "name_mapping.csv", ".DS_Store"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".cache").mkdir()
    cases, problems = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == [case_id_for(1)]
    assert problems == []


def test_other_root_file_is_a_warning(tmp_path):
    write_case(tmp_path)
    (tmp_path / "stray.nii.gz").write_bytes(b"x")
    cases, problems = discover_cases(tmp_path)
    assert len(cases) == 1
    assert [(p.case_id, p.file, p.fatal) for p in problems] == [("", "stray.nii.gz", False)]


def test_stray_file_in_case_is_a_warning_and_case_stays_usable(tmp_path):
    folder = write_case(tmp_path, extra_files=("preview.png",))
    (folder / "._hidden").write_text("x")
    cases, problems = discover_cases(tmp_path)
    assert len(cases) == 1 and "preview.png" not in {p.name for p in cases[0].files.values()}
    assert len(problems) == 1
    assert problems[0].file == "preview.png" and not problems[0].fatal
    assert "expected only" in problems[0].problem


def test_missing_modality_is_fatal_and_names_expected_file(tmp_path):
    write_case(tmp_path, missing=("t1ce",))
    cases, problems = discover_cases(tmp_path)
    assert cases == []
    assert [p.file for p in problems] == [f"{case_id_for(1)}_t1ce.nii.gz"]
    assert problems[0].fatal and "t1ce" in problems[0].problem


def test_case_without_seg_is_discovered_without_labels(tmp_path):
    write_case(tmp_path, seg=False)
    (case,), problems = discover_cases(tmp_path)
    assert problems == [] and not case.has_labels and "seg" not in case.files


def test_folder_matching_no_layout_is_fatal_with_hint(tmp_path):
    write_case(tmp_path / "BraTS2021_Training", seed=0)  # the real root is one level deeper
    cases, problems = discover_cases(tmp_path)
    assert cases == []
    (p,) = problems
    assert p.fatal and p.case_id == "BraTS2021_Training" and "one level deeper" in p.problem


def test_files_named_for_another_case_are_not_taken(tmp_path):
    folder = write_case(tmp_path, case_id_for(1))
    renamed = folder.rename(tmp_path / "renamed")
    cases, problems = discover_cases(tmp_path)
    assert cases == [] and problems[0].case_id == "renamed" and problems[0].fatal
    assert renamed.exists()


def test_find_case_and_its_errors(tmp_path):
    folder = write_case(tmp_path, layout="brats2023")
    assert find_case(folder).layout == BRATS2023
    with pytest.raises(CaseError, match="missing flair"):
        find_case(write_case(tmp_path, case_id_for(7), missing=("flair",)))
    with pytest.raises(CaseError, match="not a directory"):
        find_case(tmp_path / "nope")


def test_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        discover_cases(tmp_path / "absent")


def test_uncompressed_nifti_is_accepted_and_duplicates_are_stray(tmp_path):
    folder = write_case(tmp_path)
    gz = folder / f"{case_id_for(1)}_t2.nii.gz"
    plain = folder / f"{case_id_for(1)}_t2.nii"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    (case,), problems = discover_cases(tmp_path)
    assert case.files["t2"] == gz  # .nii.gz, the BraTS format, wins over a duplicate
    assert [(p.file, p.fatal) for p in problems] == [(plain.name, False)]
    gz.unlink()
    (case,), problems = discover_cases(tmp_path)
    assert case.files["t2"] == plain and problems == []
