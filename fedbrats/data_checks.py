"""The check every command that reads a partition runs before any process starts: subjects vs. disk.

A 23-institution partition over a partial download would otherwise start 23 sites of which 21 have
nothing to train on. Only file names are read (`discover_cases`), so the check is instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from fedbrats.shared.data.cases import discover_cases
from fedbrats.shared.data.partition import Partition, PartitionError
from fedbrats.shared.data.site_cases import Discovered, check_partition, load_partition
from fedbrats.tables import partition_table


def checked_partition(
    data: Path,
    partition: Path | None,
    *,
    allow_missing: bool,
    sites: Sequence[str] | None = None,
    console: Console | None = None,
) -> tuple[Partition | None, Discovered, bool]:
    """(partition to use, discovered cases, narrowed): the partition checked against the cases under `data`.

    A subject without a usable case folder stops the command (naming the first and the count)
    unless `allow_missing`; then it is dropped, sites left empty are dropped too, and the sites that
    remain are printed with their case counts (`narrowed` is then True). Only `sites` are checked
    when given. Without a partition the partition is None.
    """
    discovered = discover_cases(Path(data))
    parts = load_partition(partition)
    if parts is None:
        return None, discovered, False
    check = check_partition(parts, discovered, sites=sites)
    if not check.missing:
        return parts, discovered, False
    checked = sum(len(parts.sites[s]) for s in (sites if sites is not None else parts.sites))
    first = check.missing[0]
    what = (f"{len(check.missing)} of {checked} subjects of partition {partition} have no usable case folder "
            f"under {data}; the first: {first} ({check.reasons[first]})")  # fmt: skip
    if not allow_missing:
        raise PartitionError(f"{what}. Complete the data, fix the partition, or pass --allow-missing to drop them")
    if check.kept is None:
        raise PartitionError(f"{what}; no site has a usable case left")
    console = console or Console()
    console.print(f"[yellow]--allow-missing:[/] {what}; they are dropped", highlight=False)
    if check.dropped_sites:
        console.print(f"[yellow]sites left without cases, not started:[/] {', '.join(check.dropped_sites)}")
    console.print(partition_table(check.kept, title="sites and their cases on disk"))
    return check.kept, discovered, True
