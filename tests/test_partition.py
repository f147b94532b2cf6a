"""Partition CSV IO (fedbrats.shared.data.partition) and partition schemes (fedbrats.simulations.partitioning)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from fedbrats.shared.data.partition import (
    Partition,
    PartitionError,
    check_on_disk,
    read_partition,
    site_cases,
    split_train_val,
    write_partition,
)
from fedbrats.simulations.partitioning import (
    SCHEMES,
    make_partition,
    run_partition,
    tumor_sizes_from_disk,
)
from fedbrats.tables import partition_table

# Head of a FeTS 2022 partitioning_1.csv: integer institution ids, FeTS2022_ subject ids.
FETS_SAMPLE = (
    "Partition_ID,Subject_ID\n1,FeTS2022_01341\n1,FeTS2022_01333\n2,FeTS2022_00036\n"
    "2,FeTS2022_00030\n2,FeTS2022_00031\n10,FeTS2022_00511\n"
)
FETS_SITES = {
    "1": ["FeTS2022_01341", "FeTS2022_01333"],
    "2": ["FeTS2022_00036", "FeTS2022_00030", "FeTS2022_00031"],
    "10": ["FeTS2022_00511"],
}


def _write(tmp_path: Path, text: str, *, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path = tmp_path / "partitioning_1.csv"
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


# ---------------------------------------------------------------- reading and writing


@pytest.mark.parametrize(
    ("encoding", "newline"), [("utf-8", "\n"), ("utf-8", "\r\n"), ("utf-8-sig", "\r\n"), ("utf-8-sig", "\n")]
)
def test_reads_fets_sample_with_bom_and_crlf(tmp_path, encoding, newline):
    p = read_partition(_write(tmp_path, FETS_SAMPLE, encoding=encoding, newline=newline))
    assert p.sites == FETS_SITES
    assert list(p.sites) == ["1", "2", "10"]
    assert p.train_or_val == {}


def test_reads_whitespace_extra_columns_blank_lines(tmp_path):
    text = " Partition_ID , Subject_ID ,Measurement_ID\n 1 , FeTS2022_01341 ,0\n\n2,FeTS2022_00036,0\n  \n"
    p = read_partition(_write(tmp_path, text))
    assert p.sites == {"1": ["FeTS2022_01341"], "2": ["FeTS2022_00036"]}


def test_train_or_val_is_case_insensitive_and_may_be_empty(tmp_path):
    text = "Partition_ID,Subject_ID,TrainOrVal\n1,a,Train\n1,b,VAL\n1,c,\n2,d,val\n2,e, train \n"
    p = read_partition(_write(tmp_path, text))
    assert p.train_or_val == {"a": "train", "b": "val", "d": "val", "e": "train"}
    assert "c" not in p.train_or_val


def test_round_trip_sorts_integer_ids_numerically(tmp_path):
    p = Partition({"10": ["x", "y"], "2": ["b", "a"], "1": ["c"]}, {"x": "val", "a": "train"})
    out = write_partition(p, tmp_path / "sub" / "split.csv")
    assert read_partition(out) == p
    lines = out.read_text().splitlines()
    assert lines[0] == "Partition_ID,Subject_ID,TrainOrVal"
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "2", "10", "10"]
    assert lines[2:4] == ["2,b,", "2,a,train"]  # subjects keep their order
    assert [f.name for f in out.parent.iterdir()] == ["split.csv"]  # no temporary file left


def test_round_trip_without_train_or_val_has_two_columns(tmp_path):
    p = read_partition(_write(tmp_path, FETS_SAMPLE))
    out = write_partition(p, tmp_path / "again.csv")
    assert out.read_text() == FETS_SAMPLE
    assert read_partition(out) == p


def test_write_replaces_existing_file(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("old content that is not a partition\n")
    write_partition(Partition({"a": ["s1"], "b": ["s2"]}, {}), out)  # non-integer ids: order kept
    assert out.read_text() == "Partition_ID,Subject_ID\na,s1\nb,s2\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["empty file", "Partition_ID,Subject_ID"]),
        ("\n \n", ["empty file"]),
        ("Partition_ID,Subject_ID\n", ["no subjects"]),
        ("Partition,Subject_ID\n1,a\n", ["line 1", "lacks column(s) Partition_ID"]),
        ("Partition_ID,Case\n1,a\n", ["line 1", "Subject_ID"]),
        (
            "Partition_ID,Subject_ID\n1,a\n1,b\n2,a\n",
            ["line 4", "'a'", "line 2", "partition 1", "exactly once"],
        ),
        ("Partition_ID,Subject_ID\n1,a\n1,a\n", ["line 3", "already listed on line 2"]),
        ("Partition_ID,Subject_ID\n1,a\n2,  \n", ["line 3", "empty Subject_ID"]),
        ("Partition_ID,Subject_ID\n1,a\n2\n", ["line 3", "empty Subject_ID"]),
        ("Partition_ID,Subject_ID\n,a\n", ["line 2", "empty Partition_ID"]),
        ("Partition_ID,Subject_ID,TrainOrVal\n1,a,train\n1,b,test\n", ["line 3", "'test'", "'train', 'val'"]),
    ],
)
def test_read_errors_name_file_line_and_expectation(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(PartitionError) as err:
        read_partition(path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_file_and_invalid_partitions(tmp_path):
    with pytest.raises(PartitionError, match="not found"):
        read_partition(tmp_path / "nope.csv")
    with pytest.raises(PartitionError, match="'a' is in site '1' and site '2'"):
        Partition({"1": ["a"], "2": ["a"]}, {})
    with pytest.raises(PartitionError, match="no subjects"):
        Partition({"1": []}, {})
    with pytest.raises(PartitionError, match="expected one of"):
        Partition({"1": ["a"]}, {"a": "test"})


def test_check_on_disk_lists_every_missing_subject(tmp_path):
    p = Partition({"1": [f"case{i:03d}" for i in range(30)]}, {})
    check_on_disk(p, [f"case{i:03d}" for i in range(30)])  # all present: no error
    with pytest.raises(PartitionError) as err:
        check_on_disk(p, [f"case{i:03d}" for i in range(5)])
    message = str(err.value)
    assert "25 of 30" in message
    assert "case005" in message and "case024" in message  # the first 20 missing are named
    assert "case025" not in message and "and 5 more" in message


def test_site_cases_unknown_site_lists_known():
    p = Partition({"2": ["b"], "10": ["c"], "1": ["a"]}, {})
    assert site_cases(p, 10) == ["c"]
    assert site_cases(p, " 1 ") == ["a"]
    with pytest.raises(PartitionError, match=r"unknown site '3'.*sites: 1, 2, 10"):
        site_cases(p, "3")


# ---------------------------------------------------------------- train / val split


def test_split_is_deterministic_covering_and_order_independent():
    subjects = [f"s{i:02d}" for i in range(20)]
    train, val = split_train_val(subjects, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert sorted(train + val) == subjects
    assert (train, val) == split_train_val(subjects, seed=3)
    assert train == sorted(train)  # input order kept
    reversed_train, reversed_val = split_train_val(subjects[::-1], seed=3)
    assert set(reversed_val) == set(val)
    assert any(split_train_val(subjects, seed=s)[1] != val for s in range(4, 10))


@pytest.mark.parametrize(("n", "n_val"), [(1, 0), (2, 1), (3, 1), (5, 1), (8, 2), (10, 2)])
def test_split_sizes(n, n_val):
    train, val = split_train_val([f"s{i}" for i in range(n)], seed=0)
    assert len(val) == n_val and len(train) == n - n_val


def test_split_val_fraction_bounds_and_zero():
    subjects = ["a", "b", "c"]
    assert split_train_val(subjects, seed=0, val_fraction=0.0) == (subjects, [])
    assert len(split_train_val(subjects, seed=0, val_fraction=0.9)[0]) == 1  # train keeps one case
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            split_train_val(subjects, seed=0, val_fraction=bad)


def test_split_respects_fixed_train_or_val():
    subjects = [f"s{i}" for i in range(10)]
    fixed = {"s0": "val", "s1": "val", "s2": "val", "s3": "train", "other_site_case": "val"}
    for seed in range(5):
        train, val = split_train_val(subjects, seed=seed, fixed=fixed)
        assert {"s0", "s1", "s2"} <= set(val) and "s3" in train
        assert len(val) == 3  # 20% of 10 = 2 already exceeded by the fixed ones: nothing drawn
    train, val = split_train_val(subjects, seed=0, fixed={"s5": "val"})
    assert "s5" in val and len(val) == 2
    all_fixed = {s: "train" for s in subjects}
    assert split_train_val(subjects, seed=0, fixed=all_fixed) == (subjects, [])
    with pytest.raises(PartitionError, match="'s1' is 'test'"):
        split_train_val(subjects, seed=0, fixed={"s1": "test"})


# ---------------------------------------------------------------- schemes


CASES = [f"BraTS2021_{i:05d}" for i in range(120)]
SIZES = {c: float(1000 + 137 * i) for i, c in enumerate(CASES)}


def _make(scheme: str, **kwargs) -> Partition:
    kwargs.setdefault("sites", 5)
    return make_partition(CASES, scheme, tumor_sizes=SIZES, **kwargs)


def _site_mean_spread(p: Partition) -> float:
    return float(np.std([np.mean([SIZES[c] for c in cases]) for cases in p.sites.values()]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_every_case_assigned_once(scheme, alpha):
    p = _make(scheme, alpha=alpha, seed=1)
    assert sorted(p.subjects) == CASES
    assert list(p.sites) == ["1", "2", "3", "4", "5"]
    assert min(len(c) for c in p.sites.values()) >= 2
    assert p == make_partition(CASES[::-1], scheme, sites=5, alpha=alpha, seed=1, tumor_sizes=SIZES)


def test_iid_sizes_equal_within_one():
    for sites in (3, 7, 11):
        sizes = [len(c) for c in _make("iid", sites=sites).sites.values()]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(CASES)
    assert _make("iid", seed=0) != _make("iid", seed=1)


def test_dirichlet_small_alpha_skews_tumour_size_more():
    skewed = np.mean([_site_mean_spread(_make("dirichlet", alpha=0.1, seed=s)) for s in range(8)])
    balanced = np.mean([_site_mean_spread(_make("dirichlet", alpha=100.0, seed=s)) for s in range(8)])
    iid = np.mean([_site_mean_spread(_make("iid", seed=s)) for s in range(8)])
    assert skewed > 3 * balanced
    assert skewed > 3 * iid


def test_dirichlet_deterministic_and_rebalanced():
    assert _make("dirichlet", alpha=0.3, seed=7) == _make("dirichlet", alpha=0.3, seed=7)
    assert _make("dirichlet", alpha=0.3, seed=7) != _make("dirichlet", alpha=0.3, seed=8)
    # 12 cases, 6 sites, tiny alpha: most sites get nothing from the draw and must be rebalanced.
    cases = CASES[:12]
    p = make_partition(cases, "dirichlet", sites=6, alpha=0.01, seed=0, tumor_sizes=SIZES)
    assert sorted(len(c) for c in p.sites.values()) == [2] * 6
    assert sorted(p.subjects) == cases


def test_quantity_skew_sizes_differ_with_minimum():
    small = [sorted(len(c) for c in _make("quantity", alpha=0.2, seed=s).sites.values()) for s in range(5)]
    large = [sorted(len(c) for c in _make("quantity", alpha=1000, seed=s).sites.values()) for s in range(5)]
    assert all(sizes[0] >= 2 for sizes in small)
    assert np.mean([s[-1] - s[0] for s in small]) > 20
    assert all(s[-1] - s[0] <= 3 for s in large)


def test_scheme_errors(tmp_path):
    with pytest.raises(ValueError, match="expected one of institution, iid, dirichlet, quantity"):
        make_partition(CASES, "random", sites=3)
    with pytest.raises(ValueError, match="at most 60 sites"):
        make_partition(CASES, "iid", sites=61)
    with pytest.raises(ValueError, match="number of sites"):
        make_partition(CASES, "quantity")
    with pytest.raises(ValueError, match="alpha"):
        make_partition(CASES, "quantity", sites=3, alpha=0)
    with pytest.raises(ValueError, match="tumour sizes"):
        make_partition(CASES, "dirichlet", sites=3)
    with pytest.raises(ValueError, match="no tumour size for 1 cases: BraTS2021_00000"):
        make_partition(CASES, "dirichlet", sites=3, tumor_sizes={c: 1.0 for c in CASES[1:]})
    with pytest.raises(ValueError, match="listed twice: a"):
        make_partition(["a", "b", "a", "c"], "iid", sites=1)


def test_institution_scheme_reads_csv_as_is(tmp_path):
    csv_path = _write(tmp_path, FETS_SAMPLE)
    on_disk = [s for cases in FETS_SITES.values() for s in cases] + ["FeTS2022_99999"]
    assert make_partition(on_disk, "institution", institution_csv=csv_path).sites == FETS_SITES
    assert make_partition(on_disk, "institution", sites=3, institution_csv=csv_path).sites == FETS_SITES
    with pytest.raises(ValueError, match="has 3 institutions but 4 sites"):
        make_partition(on_disk, "institution", sites=4, institution_csv=csv_path)
    with pytest.raises(PartitionError, match="FeTS2022_00511"):
        make_partition(on_disk[:3], "institution", institution_csv=csv_path)
    with pytest.raises(ValueError, match="needs an institution CSV"):
        make_partition(on_disk, "institution")


# ---------------------------------------------------------------- from disk


def _fake_root(tmp_path: Path, n: int = 12) -> tuple[Path, dict[str, float]]:
    """Cases with 4x4x4 label maps only, tumour size i+1 voxels; half in each BraTS layout."""
    root = tmp_path / "data"
    sizes = {}
    for i in range(n):
        case, sep, tumour_label = (
            (f"BraTS2021_{i:05d}", "_", 4) if i % 2 else (f"BraTS-GLI-{i:05d}-000", "-", 3)
        )
        seg = np.zeros(64, dtype=np.uint8)
        seg[: i + 1] = tumour_label
        if sep == "-":
            seg[-1] = 4  # resection cavity: not tumour in the 2023+ label set
        (root / case).mkdir(parents=True)
        nib.save(nib.Nifti1Image(seg.reshape(4, 4, 4), np.eye(4)), root / case / f"{case}{sep}seg.nii.gz")
        sizes[case] = float(i + 1)
    (root / ".cache").mkdir()  # hidden: not a case
    return root, sizes


def test_tumor_sizes_from_disk(tmp_path):
    root, expected = _fake_root(tmp_path)
    assert tumor_sizes_from_disk(root, sorted(expected), progress=False) == expected
    (root / "no_labels").mkdir()
    with pytest.raises(ValueError, match=r"1 cases .* no segmentation: no_labels"):
        tumor_sizes_from_disk(root, [*expected, "no_labels"], progress=False)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_run_partition_writes_readable_csv(tmp_path, capsys, scheme):
    root, sizes = _fake_root(tmp_path)
    if scheme == "institution":  # default CSV: ROOT/partitioning_1.csv
        cases = sorted(sizes)
        write_partition(Partition({"1": cases[:5], "2": cases[5:]}, {}), root / "partitioning_1.csv")
    out = tmp_path / "out" / "split.csv"
    partition, measured = run_partition(root, scheme, None if scheme == "institution" else 3, 0.5, 0, out)
    assert "total" not in capsys.readouterr().out  # the module returns data; the command prints the table
    p = read_partition(out)
    assert p == partition and sorted(p.subjects) == sorted(sizes)
    assert len(p.sites) == (2 if scheme == "institution" else 3)
    assert (measured == sizes) if scheme == "dirichlet" else measured is None
    console = Console(record=True, width=120)
    console.print(partition_table(partition, measured))
    printed = console.export_text()
    assert "total" in printed and ("mean tumour" in printed) == (scheme == "dirichlet")


def test_run_partition_errors(tmp_path):
    root, sizes = _fake_root(tmp_path)
    out = tmp_path / "split.csv"
    with pytest.raises(ValueError, match="needs --institution-csv"):
        run_partition(root, "institution", None, 0.5, 0, out)
    bad = tmp_path / "inst.csv"
    write_partition(Partition({"1": ["ghost_1", "ghost_2"], "2": sorted(sizes)}, {}), bad)
    with pytest.raises(PartitionError, match="2 of 14 .*ghost_1, ghost_2"):
        run_partition(root, "institution", None, 0.5, 0, out, institution_csv=bad)
    with pytest.raises(ValueError, match="not a directory"):
        run_partition(tmp_path / "absent", "iid", 2, 0.5, 0, out)
    assert not out.exists()
