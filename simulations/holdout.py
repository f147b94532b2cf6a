"""Leave one institution out: the federation trains without one hospital, which then scores the global
model as an external site would (every one of its cases, none seen in training).

Quality at the training sites' own validation cases says how well the federation fits its members; a
consortium admitting a new hospital wants to know how the model does at a site it never saw. The
partition is split into the training sites' CSV and the external site's CSV inside the run folder, so a
resumed run trains on the same sites.
"""

from __future__ import annotations

from pathlib import Path

from fedbrats.shared.data.partition import Partition, name_list, read_partition, write_partition

TRAIN_CSV, EXTERNAL_CSV = "partition_train.csv", "partition_external.csv"


def split_holdout(partition_csv: Path, site: str, run_dir: Path) -> tuple[Path, Path]:
    """Write (training sites' partition, the held-out site's partition) into `run_dir`; the site must be
    one of the partition's and at least one other site must remain to train."""
    partition = read_partition(Path(partition_csv))
    if site not in partition.sites:
        raise ValueError(
            f"holdout-site {site!r} is not a site of {partition_csv}; its sites are {name_list(list(partition.sites))}"
        )
    if len(partition.sites) < 2:
        raise ValueError(f"holdout-site {site!r}: {partition_csv} has no other site to train the federation")
    held = set(partition.sites[site])
    train = Partition(
        {s: cases for s, cases in partition.sites.items() if s != site},
        {case: split for case, split in partition.train_or_val.items() if case not in held},
    )
    external = Partition({site: list(partition.sites[site])}, {})
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_partition(train, run_dir / TRAIN_CSV), write_partition(external, run_dir / EXTERNAL_CSV)
