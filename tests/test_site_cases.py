"""The cases of a site (discover -> partition -> split) and the partition check before a command starts."""

from __future__ import annotations

import pytest
from rich.console import Console

from fedbrats.data_checks import checked_partition
from fedbrats.shared.config import RunConfig
from fedbrats.shared.data.cases import discover_cases
from fedbrats.shared.data.partition import Partition, PartitionError, split_train_val, write_partition
from fedbrats.shared.data.site_cases import (
    ALL_SITES,
    NOT_ON_DISK,
    cases_of_site,
    cases_of_sites,
    check_partition,
)
from tests.data_fixtures import case_id_for, write_case

IDS = [case_id_for(i) for i in range(1, 8)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Five good cases, one folder missing its t1 (unusable); IDS[6] is never written (not on disk)."""
    root = tmp_path_factory.mktemp("cases")
    for i in range(5):
        write_case(root, IDS[i], seed=i)
    write_case(root, IDS[5], missing=("t1",))
    return root


def _partition(*, fixed: dict[str, str] | None = None) -> Partition:
    return Partition({"1": IDS[0:3], "2": IDS[3:5], "3": IDS[5:7]}, fixed or {})


def test_site_cases_are_split_as_split_train_val(root):
    found = cases_of_site(root, _partition(), "1", seed=3, val_fraction=0.34)
    train, val = split_train_val(IDS[0:3], seed=3, val_fraction=0.34)
    assert [c.case_id for c in found.train] == train and [c.case_id for c in found.val] == val
    assert found.site == "1" and found.problems == [] and len(found.cases) == 3
    assert [c.case_id for c in found.select("val")] == val
    with pytest.raises(ValueError, match="split='test'"):
        found.select("test")


def test_fixed_train_or_val_is_kept(root):
    found = cases_of_site(root, _partition(fixed={IDS[0]: "val"}), "1", seed=0, val_fraction=0.0)
    assert [c.case_id for c in found.val] == [IDS[0]]


def test_unusable_and_absent_subjects_are_left_out_with_a_reason(root):
    found = cases_of_site(root, _partition(), "3", seed=0, val_fraction=0.2)
    assert found.cases == [] and found.missing == [IDS[5], IDS[6]]
    reasons = {p.case_id: p.problem for p in found.problems}
    assert "t1" in reasons[IDS[5]] and reasons[IDS[6]] == NOT_ON_DISK


def test_without_partition_all_cases_are_one_site(root):
    sites = cases_of_sites(root, None, seed=0, val_fraction=0.2)
    assert list(sites) == [ALL_SITES]
    assert sorted(c.case_id for c in sites[ALL_SITES].cases) == IDS[:5]
    with pytest.raises(PartitionError, match="needs a partition"):
        cases_of_site(root, None, "2", seed=0, val_fraction=0.2)


def test_partition_from_csv_and_unknown_site(root, tmp_path):
    csv = write_partition(_partition(), tmp_path / "p.csv")
    sites = cases_of_sites(root, csv, seed=0, val_fraction=0.2, discovered=discover_cases(root))
    assert list(sites) == ["1", "2", "3"] and len(sites["2"].cases) == 2
    with pytest.raises(PartitionError, match="unknown site '9'.*1, 2, 3"):
        cases_of_site(root, csv, "9", seed=0, val_fraction=0.2)


def test_client_site_and_training_take_the_same_cases(root, tmp_path):
    from fedbrats.client.site import resolve_site_cases
    from fedbrats.client.training_run import training_cases

    csv = write_partition(_partition(), tmp_path / "p.csv")
    config = RunConfig(seed=1, val_fraction=0.5)
    at_site = resolve_site_cases(root, str(csv), "1", config)
    train, val = training_cases(config, root, csv, "1")
    assert [c.case_id for c in at_site.train] == [c.case_id for c in train]
    assert [c.case_id for c in at_site.val] == [c.case_id for c in val]


def test_check_partition_names_missing_subjects_and_drops_empty_sites(root):
    check = check_partition(_partition(), discover_cases(root))
    assert check.missing == [IDS[5], IDS[6]]
    assert check.reasons[IDS[6]] == NOT_ON_DISK and "t1" in check.reasons[IDS[5]]
    assert check.dropped_sites == ["3"] and list(check.kept.sites) == ["1", "2"]
    only_one = check_partition(_partition(), discover_cases(root), sites=["1"])
    assert only_one.missing == [] and list(only_one.kept.sites) == ["1"]


def test_command_start_stops_on_missing_subjects_unless_allowed(root, tmp_path):
    csv = write_partition(_partition(), tmp_path / "p.csv")
    with pytest.raises(PartitionError, match=rf"2 of 7 subjects .* the first: {IDS[5]} .*--allow-missing"):
        checked_partition(root, csv, allow_missing=False)
    console = Console(record=True, width=120)
    kept, discovered, narrowed = checked_partition(root, csv, allow_missing=True, console=console)
    assert narrowed and list(kept.sites) == ["1", "2"] and len(discovered[0]) == 5
    text = console.export_text()
    assert "not started: 3" in text and "total" in text
    same, _, narrowed = checked_partition(root, csv, allow_missing=False, sites=["2"])
    assert not narrowed and list(same.sites) == ["1", "2", "3"]  # the file as it is: site 2 is complete
    nothing = write_partition(Partition({"1": ["ghost"]}, {}), tmp_path / "ghost.csv")
    with pytest.raises(PartitionError, match="no site has a usable case left"):
        checked_partition(root, nothing, allow_missing=True, console=console)
