"""Case-level labels: the known files (phantom, BraTS 2020 grade, BraTS 2021 MGMT), class order, errors, sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbrats.shared.data.case_labels import (
    CaseLabelError,
    find_label_file,
    load_case_labels,
    read_case_labels,
    site_classes,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_phantom_labels_file(tmp_path: Path):
    write(
        tmp_path / "labels.csv",
        "Subject_ID,Partition_ID,Grade\nPhantom_001_0001,1,LGG\nPhantom_001_0002,1,HGG\nPhantom_002_0001,2,HGG\n",
    )
    labels = load_case_labels(tmp_path)
    assert labels is not None and labels.path == tmp_path / "labels.csv"
    assert labels.classes == ("HGG", "LGG")  # sorted: index 1 (LGG) is the positive class
    assert labels.labels == {"Phantom_001_0001": "LGG", "Phantom_001_0002": "HGG", "Phantom_002_0001": "HGG"}
    assert labels.indices(["Phantom_001_0001", "Phantom_002_0001"]) == [1, 0]
    assert labels.counts() == {"HGG": 2, "LGG": 1}
    assert labels.counts(["Phantom_001_0001"]) == {"HGG": 0, "LGG": 1}
    assert len(labels) == 3 and "Phantom_001_0002" in labels
    swapped = load_case_labels(tmp_path, classes=("LGG", "HGG"))  # make HGG the positive class
    assert swapped.classes == ("LGG", "HGG") and swapped.index("Phantom_001_0002") == 1


def test_brats2020_name_mapping(tmp_path: Path):
    write(
        tmp_path / "name_mapping.csv",
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID\n"
        "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
        "LGG,NA,NA,TCGA-CS-4941,BraTS19_TCIA09_141_1,BraTS20_Training_260\n",
    )
    path, fmt = find_label_file(tmp_path)
    assert path.name == "name_mapping.csv" and (fmt.id_column, fmt.label_column) == (
        "BraTS_2020_subject_ID",
        "Grade",
    )
    labels = load_case_labels(tmp_path)
    assert labels.labels == {"BraTS20_Training_001": "HGG", "BraTS20_Training_260": "LGG"}
    with pytest.raises(CaseLabelError, match=r"no column 'Subject_ID'.*usually has 'BraTS_2020_subject_ID'"):
        read_case_labels(tmp_path / "name_mapping.csv")  # the default columns are the phantom's
    assert labels.label_column == "Grade"


def test_mgmt_ids_become_brats2021_case_names(tmp_path: Path):
    write(tmp_path / "train_labels.csv", "BraTS21ID,MGMT_value\n00000,1\n2,1\n00012,0\n1010,0\n")
    assert find_label_file(tmp_path, label_column="Grade") is None  # only MGMT here
    labels = load_case_labels(tmp_path, label_column="MGMT_value")
    assert labels.labels == {
        "BraTS2021_00000": "1", "BraTS2021_00002": "1", "BraTS2021_00012": "0", "BraTS2021_01010": "0",
    }  # fmt: skip
    assert labels.classes == ("0", "1") and labels.index("BraTS2021_00012") == 0
    same = read_case_labels(
        tmp_path / "train_labels.csv", "MGMT_value", "BraTS21ID"
    )  # mapping from the column
    assert same.labels == labels.labels
    write(tmp_path / "train_labels.csv", "BraTS21ID,MGMT_value\n12,0\n00012,1\n")
    with pytest.raises(CaseLabelError, match=r"line 3: subject 'BraTS2021_00012' already listed on line 2"):
        load_case_labels(tmp_path)
    write(tmp_path / "train_labels.csv", "BraTS21ID,MGMT_value\nabc,0\n")
    with pytest.raises(CaseLabelError, match=r"line 2: BraTS21ID expected a case number.*'abc'"):
        load_case_labels(tmp_path)


def test_multiclass_names_sorted_numerically_and_bom_crlf_whitespace(tmp_path: Path):
    text = "\ufeffSubject_ID , WHO_grade\r\n a ,10\r\nb,2\r\n\r\nc, 3 \r\nd,2\r\n"
    path = write(tmp_path / "who.csv", text)
    labels = read_case_labels(path, label_column="who_grade")  # column names match case-insensitively
    assert labels.classes == ("2", "3", "10")  # not "10" < "2"
    assert labels.labels == {"a": "10", "b": "2", "c": "3", "d": "2"}
    assert labels.label_column == "WHO_grade"
    text_classes = read_case_labels(write(tmp_path / "t.csv", "Subject_ID,Grade\nx,b\ny,a\nz,c\n"))
    assert text_classes.classes == ("a", "b", "c")


def test_found_in_a_fixed_order_and_skips_foreign_files(tmp_path: Path):
    assert find_label_file(tmp_path) is None and load_case_labels(tmp_path) is None
    write(tmp_path / "labels.csv", "case,site\nx,1\n")  # a labels.csv of someone else: not ours
    write(tmp_path / "name_mapping.csv", "Grade,BraTS_2020_subject_ID\nHGG,BraTS20_Training_001\n")
    assert find_label_file(tmp_path)[0].name == "name_mapping.csv"
    write(tmp_path / "labels.csv", "Subject_ID,Grade\nx,LGG\n")
    assert find_label_file(tmp_path)[0].name == "labels.csv"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "Subject_ID,Partition_ID\na,1\n",
            r"x\.csv, line 1: no column 'Grade'; columns found: \['Subject_ID', 'Partition_ID'\]",
        ),
        ("Case,Grade\na,HGG\n", r"no column 'Subject_ID'; columns found: \['Case', 'Grade'\]"),
        ("Subject_ID,Grade\na,HGG\nb,\n", r"x\.csv, line 3: subject 'b' has no Grade \(''\)"),
        ("Subject_ID,Grade\na,HGG\nb,NA\n", r"line 3: subject 'b' has no Grade \('NA'\)"),
        ("Subject_ID,Grade\na,HGG\nb\n", r"line 3: subject 'b' has no Grade"),
        ("Subject_ID,Grade\na,HGG\n,LGG\n", r"line 3: empty Subject_ID"),
        ("Subject_ID,Grade\na,HGG\nb,LGG\na,LGG\n", r"line 4: subject 'a' already listed on line 2"),
        ("Subject_ID,Grade\n", r"no rows after the header"),
        ("", r"empty file"),
    ],
)
def test_errors_name_the_file_the_line_and_what_was_expected(tmp_path: Path, text: str, error: str):
    with pytest.raises(CaseLabelError, match=error):
        read_case_labels(write(tmp_path / "x.csv", text))


def test_unexpected_class_and_missing_file(tmp_path: Path):
    path = write(tmp_path / "x.csv", "Subject_ID,Grade\na,HGG\nb,GBM\n")
    with pytest.raises(
        CaseLabelError, match=r"line 3: subject 'b' has Grade 'GBM'; expected one of \['LGG', 'HGG'\]"
    ):
        read_case_labels(path, classes=("LGG", "HGG"))
    with pytest.raises(CaseLabelError, match=r"nope\.csv: labels file not found"):
        read_case_labels(tmp_path / "nope.csv")


def test_a_case_without_a_label_is_an_error_naming_the_file_and_the_case(tmp_path: Path):
    labels = read_case_labels(write(tmp_path / "x.csv", "Subject_ID,Grade\na,HGG\nb,LGG\n"))
    labels.require(["a", "b"])
    with pytest.raises(CaseLabelError, match=r"x\.csv: no Grade label for 2 case\(s\) of site 3: c, d"):
        labels.require(["a", "c", "d"], where="site 3")
    with pytest.raises(CaseLabelError, match="no Grade label for 1 case"):
        labels.index("zz")
    many = [f"case{i}" for i in range(25)]
    with pytest.raises(CaseLabelError, match="case19 and 5 more"):
        labels.require(many)


def test_site_classes_flags_single_class_sites(tmp_path: Path):
    labels = read_case_labels(write(tmp_path / "x.csv", "Subject_ID,Grade\na,HGG\nb,LGG\nc,HGG\nd,HGG\n"))
    report = site_classes(labels, {"1": ["a", "b"], "2": ["c", "d"]})
    assert report["1"].counts == {"HGG": 1, "LGG": 1} and report["1"].single_class is None
    assert report["1"].auc_reason is None
    assert report["2"].counts == {"HGG": 2, "LGG": 0} and report["2"].single_class == "HGG"
    assert report["2"].present == ("HGG",)
    assert "site 2 holds only HGG cases (2): its AUC is undefined" in report["2"].auc_reason
    assert "still trains" in report["2"].auc_reason
    assert "no labelled cases" in site_classes(labels, {"9": []})["9"].auc_reason
    with pytest.raises(CaseLabelError, match="of site 4: e"):
        site_classes(labels, {"4": ["a", "e"]})
