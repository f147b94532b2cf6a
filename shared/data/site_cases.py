"""The cases of a site: discover -> partition -> train/val split, one path for every caller.

The federated client, `fedbrats train`, `fedbrats evaluate` and the checks the command line runs
before a federation starts all come here, so a site trains and is scored on the same cases whoever
asks. Only file names are looked at (`discover_cases`), so this is instant even on 1251 cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedbrats.shared.data.cases import Case, discover_cases
from fedbrats.shared.data.partition import (
    Partition,
    PartitionError,
    read_partition,
    site_cases,
    split_train_val,
)
from fedbrats.shared.data.problems import CaseProblem

#: The one site of a dataset used without a partition.
ALL_SITES = "all"
SPLITS = ("all", "train", "val")
NOT_ON_DISK = "listed in the partition but no case folder of that name was found"

Discovered = tuple[list[Case], list[CaseProblem]]


@dataclass(frozen=True)
class SiteCases:
    """One site's usable cases split into training and validation, and why its other subjects are left out.

    `problems` holds, for each subject of the site without a usable case folder, the reason(s)
    (not on disk, or what is wrong with its folder).
    """

    site: str
    train: list[Case]
    val: list[Case]
    problems: list[CaseProblem] = field(default_factory=list)

    @property
    def cases(self) -> list[Case]:
        return self.train + self.val

    @property
    def missing(self) -> list[str]:
        """Subjects of the site that cannot be used, in order of first problem."""
        return list(dict.fromkeys(p.case_id for p in self.problems if p.fatal))

    def select(self, split: str) -> list[Case]:
        """The cases of one split: "train", "val" or "all"."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {', '.join(SPLITS)}")
        return {"all": self.cases, "train": self.train, "val": self.val}[split]


@dataclass(frozen=True)
class PartitionCheck:
    """A partition against the usable case folders on disk: what is missing and what is left."""

    partition: Partition
    missing: list[str]  # subjects without a usable case folder, in file order
    reasons: dict[str, str]  # subject -> why it cannot be used (first problem)
    kept: Partition | None  # the partition without the missing subjects; None when nothing is left

    @property
    def dropped_sites(self) -> list[str]:
        """Sites that hold no usable subject at all (they would have nothing to train on)."""
        left = self.kept.sites if self.kept is not None else {}
        return [s for s in self.partition.sites if s not in left]


def load_partition(partition: Partition | str | Path | None) -> Partition | None:
    """A Partition from a CSV path, a Partition as it is, or None ("" or None: no partition)."""
    if partition is None or isinstance(partition, Partition):
        return partition
    if not str(partition):
        return None
    return read_partition(Path(partition))


def _discovered(data_dir: str | Path, discovered: Discovered | None) -> Discovered:
    return discovered if discovered is not None else discover_cases(Path(data_dir))


def _reasons(problems: Iterable[CaseProblem]) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for p in problems:
        if p.fatal and p.case_id:
            reasons.setdefault(p.case_id, f"{p.file}: {p.problem}" if p.file else p.problem)
    return reasons


def check_partition(
    partition: Partition, discovered: Discovered, *, sites: Sequence[str] | None = None
) -> PartitionCheck:
    """Which subjects of `partition` (only `sites`, when given) have no usable case folder.

    `discovered` is what `discover_cases(root)` returned. The result's `kept` partition holds the
    checked sites with their usable subjects; sites left empty are dropped from it.
    """
    cases, problems = discovered
    on_disk = {c.case_id for c in cases}
    wanted = {s: site_cases(partition, s) for s in (sites if sites is not None else partition.sites)}
    reasons = _reasons(problems)
    missing = [subject for subjects in wanted.values() for subject in subjects if subject not in on_disk]
    kept_sites = {s: [x for x in subjects if x in on_disk] for s, subjects in wanted.items()}
    kept_sites = {s: subjects for s, subjects in kept_sites.items() if subjects}
    fixed = {k: v for k, v in partition.train_or_val.items() if k in on_disk}
    kept_subjects = {x for subjects in kept_sites.values() for x in subjects}
    kept = Partition(kept_sites, {k: v for k, v in fixed.items() if k in kept_subjects}) if kept_sites else None
    return PartitionCheck(partition, missing, {m: reasons.get(m, NOT_ON_DISK) for m in missing}, kept)


def cases_of_site(
    data_dir: str | Path,
    partition: Partition | str | Path | None,
    site: str | None,
    *,
    seed: int,
    val_fraction: float,
    discovered: Discovered | None = None,
) -> SiteCases:
    """The cases of one site of `partition` (all cases as site "all" without a partition), split train/val.

    The split is `split_train_val(seed, val_fraction)` with the partition's TrainOrVal column, the
    same for the federated client, `fedbrats train` and `fedbrats evaluate`. Subjects without a usable
    case folder are left out and listed in `problems`; an unknown site is a PartitionError naming the
    known ones. `discovered` reuses one `discover_cases(data_dir)` for several sites.
    """
    cases, problems = _discovered(data_dir, discovered)
    by_id = {c.case_id: c for c in cases}
    parts = load_partition(partition)
    if parts is None:
        if site not in (None, ALL_SITES):
            raise PartitionError(f"site {site!r} needs a partition, the CSV that says which cases belong to it")
        train, val = split_train_val(sorted(by_id), seed=seed, val_fraction=val_fraction)
        return SiteCases(ALL_SITES, [by_id[i] for i in train], [by_id[i] for i in val], [])
    if site is None:
        raise PartitionError(f"which site? the partition has sites: {', '.join(parts.sites)}")
    wanted = site_cases(parts, site)
    name = str(site).strip()
    subjects = set(wanted)
    site_problems = [p for p in problems if p.case_id in subjects]
    explained = {p.case_id for p in site_problems if p.fatal}
    site_problems += [CaseProblem(s, "", NOT_ON_DISK) for s in wanted if s not in by_id and s not in explained]
    present = [s for s in wanted if s in by_id]
    train, val = split_train_val(present, seed=seed, val_fraction=val_fraction, fixed=parts.train_or_val)
    return SiteCases(name, [by_id[i] for i in train], [by_id[i] for i in val], site_problems)


def cases_of_sites(
    data_dir: str | Path,
    partition: Partition | str | Path | None,
    *,
    sites: Sequence[str] | None = None,
    seed: int,
    val_fraction: float,
    discovered: Discovered | None = None,
) -> dict[str, SiteCases]:
    """`cases_of_site` for every site of `partition` (or only `sites`), discovering the cases once."""
    discovered = _discovered(data_dir, discovered)
    parts = load_partition(partition)
    names: Sequence[str | None] = [ALL_SITES] if parts is None else (sites if sites is not None else list(parts.sites))
    found = [cases_of_site(data_dir, parts, s, seed=seed, val_fraction=val_fraction, discovered=discovered)
             for s in names]  # fmt: skip
    return {sc.site: sc for sc in found}
