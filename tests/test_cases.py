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


# ------------------------------------------------------------------ symlinks and the data root


def test_case_folder_symlinked_out_of_the_root_is_refused(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    write_case(root, seed=0)
    outside = write_case(elsewhere, seed=1)
    (root / outside.name).symlink_to(outside, target_is_directory=True)
    cases, problems = discover_cases(root)
    assert [c.case_id for c in cases] == [case_id_for(1)]
    (problem,) = problems
    assert problem.case_id == outside.name and problem.fatal
    assert f"resolves to {outside.resolve()}, outside the data root {root.resolve()}" in problem.problem


def test_volume_symlinked_out_of_the_root_is_refused_by_name(tmp_path):
    root = tmp_path / "root"
    folder = write_case(root)
    t1 = folder / f"{case_id_for(1)}_t1.nii.gz"
    secret = tmp_path / "other_patient.nii.gz"
    t1.rename(secret)
    t1.symlink_to(secret)
    cases, problems = discover_cases(root)
    assert cases == []
    (problem,) = problems  # no second "missing t1" problem for the same file
    assert problem.file == t1.name and problem.fatal
    assert f"resolves to {secret.resolve()}, outside the data root" in problem.problem
    with pytest.raises(CaseError, match="outside the data root"):
        find_case(folder)


def test_symlinks_inside_the_root_are_followed(tmp_path):
    root = tmp_path / "root"
    store = write_case(root / ".store", seed=1)  # hidden: not itself a case folder
    (root / store.name).symlink_to(store, target_is_directory=True)
    folder = write_case(root, seed=0)
    t1 = folder / f"{case_id_for(1)}_t1.nii.gz"
    kept = root / ".store" / "t1_copy.nii.gz"
    t1.rename(kept)
    t1.symlink_to(kept)
    cases, problems = discover_cases(root)
    assert problems == []
    assert [c.case_id for c in cases] == [case_id_for(1), case_id_for(2)]


def test_root_given_through_a_symlink_is_its_target(tmp_path):
    write_case(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    cases, problems = discover_cases(tmp_path / "link")
    assert [c.case_id for c in cases] == [case_id_for(1)] and problems == []


def test_symlink_loops_and_broken_links_are_problems_not_crashes(tmp_path):
    root = tmp_path / "root"
    folder = write_case(root)
    (root / "loop").symlink_to(root / "loop")
    flair = folder / f"{case_id_for(1)}_flair.nii.gz"
    flair.unlink()
    flair.symlink_to(folder / "gone.nii.gz")
    cases, problems = discover_cases(root)
    assert cases == []
    by_case = {(p.case_id, p.file): p for p in problems}
    assert "cannot resolve the symlink" in by_case[("loop", "")].problem
    assert "broken symlink" in by_case[(case_id_for(1), flair.name)].problem
