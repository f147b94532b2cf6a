"""The FeTS-shaped phantom federation: institution sizes, the fixed validation set, the unchanged default."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from fedbrats import cli
from fedbrats.shared.data.partition import read_partition
from fedbrats.shared.data.phantom import generate_phantom
from fedbrats.shared.data.phantom.institutions import (
    INSTITUTION_SIZES,
    MIN_VAL_CASES,
    allocate_val_cases,
    default_val_cases,
    institution_sizes,
    train_or_val,
    validation_cases,
)
from fedbrats.shared.data.site_cases import cases_of_sites

VOXEL = 6.0  # the coarsest grid the phantom makes quickly; sizes and splits do not depend on it


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_fets2022_sizes_are_the_challenges():
    """DESIGN section 8: 23 institutions, 1,251 subjects, 4 to 511 cases, median 13, two hold 511 and 382."""
    sizes = institution_sizes("fets2022")
    assert len(sizes) == 23 and sum(sizes) == 1251 and statistics.median(sizes) == 13
    assert min(sizes) == 4 and sorted(sizes)[-2:] == [382, 511] and (sizes[0], sizes[17]) == (511, 382)
    old = institution_sizes("fets2021", min_cases=1)
    assert (
        len(old) == 17
        and sum(old) == 341
        and statistics.median(old) == 9
        and (min(old), max(old)) == (3, 129)
    )


def test_scale_keeps_the_skew_and_the_minimum_applies():
    sizes = institution_sizes("fets2022", scale=0.2, min_cases=3)
    assert (sizes[0], sizes[17], min(sizes), sum(sizes)) == (102, 76, 3, 267)
    assert sorted(range(23), key=lambda i: -sizes[i])[:2] == [0, 17]  # the same two institutions dominate
    assert institution_sizes("fets2022", scale=0.01, min_cases=2) == [5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4,
                                                                   2, 2, 2, 2, 2]  # fmt: skip
    for bad, message in [
        ({"scale": 0}, "scale"),
        ({"min_cases": 0}, "minimum"),
        ({"name": "fets2030"}, "fets2022"),
    ]:
        with pytest.raises(ValueError, match=message):
            institution_sizes(**{"name": "fets2022", **bad})


def test_validation_cases_are_at_least_40_and_every_site_of_two_validates_and_trains():
    sizes = institution_sizes("fets2022", scale=0.2)
    total = default_val_cases(sum(sizes))
    assert total == 53 and default_val_cases(100) == MIN_VAL_CASES
    per_site = allocate_val_cases(sizes, total)
    assert sum(per_site) == total and all(1 <= v <= n - 1 for v, n in zip(per_site, sizes, strict=True))
    assert per_site[0] == max(per_site) and per_site[0] / sizes[0] == pytest.approx(0.2, abs=0.05)
    assert allocate_val_cases([1, 5], 2) == [0, 2]  # a one-case site only trains
    with pytest.raises(ValueError, match="cannot be drawn"):
        allocate_val_cases([3, 3], 5)
    with pytest.raises(ValueError, match="cannot be drawn"):
        allocate_val_cases([3, 3, 3], 2)


def test_the_split_is_a_function_of_the_seed_and_each_site_draws_its_own():
    split = train_or_val(0, [10, 3], 4)
    assert split == train_or_val(0, [10, 3], 4) and split != train_or_val(1, [10, 3], 4)
    assert sum(v == "val" for v in split.values()) == 4 and len(split) == 13
    assert validation_cases(0, 1, 10, 3) == [c for (s, c), v in split.items() if s == 1 and v == "val"]


@pytest.fixture(scope="module")
def tiny_fets(tmp_path_factory):
    """A phantom sized by a stand-in institution set of 5, 2 and 1 cases (the real one is too big for a test)."""
    patch = pytest.MonkeyPatch()
    patch.setitem(INSTITUTION_SIZES, "fets2022", (5, 2, 1))
    try:
        out = tmp_path_factory.mktemp("fets")
        yield generate_phantom(
            out, institutions="fets2022", min_cases=1, val_cases=3, voxel_size=VOXEL, seed=2, progress=False
        )
    finally:
        patch.undo()


@pytest.mark.slow  # 8 cases plus the template: 10-35 s on a loaded 2-core machine
def test_phantom_writes_trainorval_and_every_method_gets_the_same_validation_cases(tiny_fets):
    rows = _rows(tiny_fets / "partitioning_1.csv")
    assert rows[0] == ["Partition_ID", "Subject_ID", "TrainOrVal"] and len(rows) == 9
    assert [r[0] for r in rows[1:]] == ["1"] * 5 + ["2"] * 2 + ["3"]
    assert sum(r[2] == "val" for r in rows[1:]) == 3 and rows[-1][2] == "train"
    fixed = {r[1] for r in rows[1:] if r[2] == "val"}
    partition = read_partition(tiny_fets / "partitioning_1.csv")
    for seed, fraction in [(0, 0.2), (7, 0.5), (3, 0.0)]:  # any seed or val-fraction a method runs with
        sites = cases_of_sites(tiny_fets, partition, seed=seed, val_fraction=fraction)
        assert {c.case_id for s in sites.values() for c in s.val} == fixed
    manifest = json.loads((tiny_fets / "sites.json").read_text())
    assert (manifest["institutions"], manifest["scale"], manifest["min_cases"], manifest["val_cases"]) == (
        "fets2022", 1.0, 1, 3)  # fmt: skip
    assert [s["n_cases"] for s in manifest["sites"]] == [5, 2, 1]


def test_institutions_exclude_sites_and_cases_per_site(tmp_path, capsys):
    with pytest.raises(ValueError, match="leave sites and cases_per_site out"):
        generate_phantom(tmp_path / "x", institutions="fets2022", sites=4, progress=False)
    argv = [
        "data",
        "phantom",
        "--out",
        str(tmp_path / "y"),
        "--institutions",
        "fets2022",
        "--cases-per-site",
        "2",
    ]
    assert cli.main(argv) == 2 and "leave sites and cases_per_site out" in capsys.readouterr().err
    parser = cli.build_parser()
    for name in INSTITUTION_SIZES:  # the CLI offers every institution set
        assert (
            parser.parse_args(["data", "phantom", "--out", "x", "--institutions", name]).institutions == name
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "phantom", "--out", "x", "--institutions", "fets2030"])


def test_default_phantom_keeps_its_files_and_a_val_cases_run_is_not_reused(tmp_path):
    out = generate_phantom(
        tmp_path / "p", sites=1, cases_per_site=2, voxel_size=VOXEL, seed=3, progress=False
    )
    assert (
        out / "partitioning_1.csv"
    ).read_text() == "Partition_ID,Subject_ID\n1,Phantom_001_0001\n1,Phantom_001_0002\n"
    keys = set(json.loads((out / "sites.json").read_text()))
    assert not keys & {"institutions", "scale", "min_cases", "val_cases"}
    generate_phantom(out, sites=1, cases_per_site=2, voxel_size=VOXEL, seed=3, val_cases=1, progress=False)
    assert _rows(out / "partitioning_1.csv")[0][-1] == "TrainOrVal"
    generate_phantom(out, sites=1, cases_per_site=2, voxel_size=VOXEL, seed=3, progress=False)
    assert _rows(out / "partitioning_1.csv")[0] == ["Partition_ID", "Subject_ID"]
