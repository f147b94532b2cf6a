"""FeTS partition CSVs: which site holds which subject, and each site's train/validation split.

The server and every client read the same file, so the format is the FeTS one, read as the
challenge ships it (`Partition_ID,Subject_ID`, integer ids, optional `TrainOrVal`, extra columns
ignored; BOM, CRLF and stray whitespace tolerated). Errors name the file, the line and what was
expected, because the person reading them is usually editing that file by hand.
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedbrats.shared.atomic import atomic_write_text

PARTITION_COLUMN = "Partition_ID"
SUBJECT_COLUMN = "Subject_ID"
SPLIT_COLUMN = "TrainOrVal"
SPLITS = ("train", "val")
#: How many missing subjects an error lists before it only counts the rest.
_LISTED = 20
#: Largest partition file read (FeTS 2022's 1251 rows take 30 KB): a site input may not exhaust memory.
MAX_PARTITION_BYTES = 64 * 2**20


class PartitionError(ValueError):
    """A partition file or a partition that cannot be used as it is."""


#: A site id names the site's folder (cache, privacy ledger), so it may not be a path: FeTS's integers,
#: or names such as "hospital-A_2".
SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def safe_site_id(value: object, where: str) -> str:
    """`value` as a site id, or a PartitionError naming `where` (file and line, or config key) and the value."""
    text = str(value)
    if SITE_ID.fullmatch(text) and ".." not in text:
        return text
    raise PartitionError(
        f"{where} {text!r} is not a safe site id; expected 1 to 64 characters from A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit, without '..' (a site id names the site's folder)"
    )


@dataclass(frozen=True)
class Partition:
    """Sites and their subjects (partition id as str -> subjects in file order), plus fixed splits.

    `train_or_val` maps a subject to "train" or "val" only where the CSV fixes it; other subjects are
    split by `split_train_val`.
    """

    sites: dict[str, list[str]]
    train_or_val: dict[str, str]

    def __post_init__(self) -> None:
        owner: dict[str, str] = {}
        for site, subjects in self.sites.items():
            safe_site_id(site, "partition site")
            if not subjects:
                raise PartitionError(f"site {site!r} has no subjects; every site needs at least one")
            for subject in subjects:
                if subject in owner:
                    raise PartitionError(
                        f"subject {subject!r} is in site {owner[subject]!r} and site {site!r}; "
                        "expected each subject in exactly one site"
                    )
                owner[subject] = site
        for subject, split in self.train_or_val.items():
            if subject not in owner:
                raise PartitionError(f"TrainOrVal given for {subject!r}, which is in no site")
            if split not in SPLITS:
                raise PartitionError(f"TrainOrVal of {subject!r} is {split!r}; expected one of {SPLITS}")

    @property
    def subjects(self) -> list[str]:
        """Every subject, site by site, in file order."""
        return [s for subjects in self.sites.values() for s in subjects]


def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""


def _csv_rows(reader, path: Path):
    """The reader's rows; a CSV syntax error (e.g. a field over the csv module's limit) names the line."""
    try:
        yield from reader
    except csv.Error as err:
        raise PartitionError(f"{path}, line {reader.line_num}: {err}; expected CSV text") from None


def read_partition(csv_path: Path) -> Partition:
    """Read a FeTS partition CSV (partitioning_1.csv / partitioning_2.csv unchanged, or ours)."""
    path = Path(csv_path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PARTITION_BYTES + 1)
        if len(raw) > MAX_PARTITION_BYTES:
            raise PartitionError(
                f"{path}: larger than {MAX_PARTITION_BYTES:,} bytes; expected a partition CSV (one short row per subject)"
            )
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise PartitionError(f"{path}: partition file not found") from None
    except UnicodeDecodeError as err:
        raise PartitionError(f"{path}: not UTF-8 text ({err}); expected a CSV file") from None
    except OSError as err:
        raise PartitionError(f"{path}: cannot read ({err}); expected a CSV file") from None

    reader = csv.reader(io.StringIO(text, newline=""))
    rows = _csv_rows(reader, path)
    header: list[str] | None = None
    for row in rows:
        if any(cell.strip() for cell in row):
            header = [cell.strip() for cell in row]
            break
    if header is None:
        raise PartitionError(
            f"{path}: empty file; expected a header line '{PARTITION_COLUMN},{SUBJECT_COLUMN}' and one row per subject"
        )
    lowered = [name.lower() for name in header]
    missing = [c for c in (PARTITION_COLUMN, SUBJECT_COLUMN) if c.lower() not in lowered]
    if missing:
        raise PartitionError(
            f"{path}, line {reader.line_num}: header {','.join(header)!r} lacks column(s) {', '.join(missing)}; "
            f"expected at least '{PARTITION_COLUMN},{SUBJECT_COLUMN}' (optional '{SPLIT_COLUMN}')"
        )
    part_col = lowered.index(PARTITION_COLUMN.lower())
    subj_col = lowered.index(SUBJECT_COLUMN.lower())
    split_col = lowered.index(SPLIT_COLUMN.lower()) if SPLIT_COLUMN.lower() in lowered else None

    sites: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    seen: dict[str, tuple[int, str]] = {}  # subject -> (line, site)
    for row in rows:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        site, subject = _cell(row, part_col), _cell(row, subj_col)
        if not site:
            raise PartitionError(f"{path}, line {line}: empty {PARTITION_COLUMN}; expected a partition id")
        safe_site_id(site, f"{path}, line {line}: {PARTITION_COLUMN}")
        if not subject:
            raise PartitionError(f"{path}, line {line}: empty {SUBJECT_COLUMN}; expected a subject id")
        if subject in seen:
            first_line, first_site = seen[subject]
            raise PartitionError(
                f"{path}, line {line}: subject {subject!r} (partition {site}) already listed on line "
                f"{first_line} (partition {first_site}); expected each subject exactly once"
            )
        seen[subject] = (line, site)
        sites.setdefault(site, []).append(subject)
        split = _cell(row, split_col).lower()
        if split:
            if split not in SPLITS:
                raise PartitionError(
                    f"{path}, line {line}: {SPLIT_COLUMN} of {subject!r} is {_cell(row, split_col)!r}; "
                    f"expected 'train', 'val' or empty"
                )
            splits[subject] = split
    if not sites:
        raise PartitionError(f"{path}: header only, no subjects; expected one row per subject")
    return Partition(sites, splits)


def _site_order(sites: Iterable[str]) -> list[str]:
    """Numeric order when every id is an integer (FeTS), otherwise as given."""
    ids = list(sites)
    try:
        return sorted(ids, key=int)
    except ValueError:
        return ids


def write_partition(partition: Partition, csv_path: Path) -> Path:
    """Write `partition` in the FeTS format, atomically (a reader never sees half a file)."""
    with_split = bool(partition.train_or_val)
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow([PARTITION_COLUMN, SUBJECT_COLUMN] + ([SPLIT_COLUMN] if with_split else []))
    for site in _site_order(partition.sites):
        for subject in partition.sites[site]:
            extra = [partition.train_or_val.get(subject, "")] if with_split else []
            writer.writerow([site, subject, *extra])
    return atomic_write_text(Path(csv_path), handle.getvalue())


def name_list(names: Sequence[str]) -> str:
    """Names for an error message: the first 20, then how many more."""
    shown = ", ".join(names[:_LISTED])
    more = len(names) - _LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def check_on_disk(partition: Partition, case_ids: Iterable[str]) -> None:
    """Raise listing every subject of `partition` that is not among `case_ids` (first 20 + count)."""
    available = set(case_ids)
    missing = [s for s in partition.subjects if s not in available]
    if missing:
        raise PartitionError(
            f"{len(missing)} of {len(partition.subjects)} subjects in the partition have no case folder: "
            f"{name_list(missing)}; expected every Subject_ID to be a case folder name"
        )


def site_cases(partition: Partition, site_id: str | int) -> list[str]:
    """Subjects of one site; an unknown site is an error listing the known ones."""
    key = str(site_id).strip()
    if key not in partition.sites:
        known = ", ".join(_site_order(partition.sites))
        raise PartitionError(f"unknown site {key!r}; the partition has sites: {known}")
    return list(partition.sites[key])


def split_train_val(
    subjects: Sequence[str],
    *,
    seed: int,
    val_fraction: float = 0.2,
    fixed: dict[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split one site's subjects into (train, val), both in input order.

    Subjects in `fixed` (a TrainOrVal map, may cover other sites too) keep their split; the rest are
    drawn with `seed` so that val holds round(val_fraction * n) cases, at least one when the site has
    two or more and val_fraction > 0, and train keeps at least one. The draw depends on the set of
    subjects, not on their order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction is {val_fraction}; expected 0 <= val_fraction < 1")
    fixed = fixed or {}
    if len(set(subjects)) != len(subjects):
        raise PartitionError("duplicate subjects in one site; expected each subject once")
    n = len(subjects)
    target = int(n * val_fraction + 0.5)
    if n >= 2 and val_fraction > 0:
        target = min(max(target, 1), n - 1)
    pinned = {s: fixed[s].strip().lower() for s in subjects if s in fixed}
    for subject, split in pinned.items():
        if split not in SPLITS:
            raise PartitionError(
                f"TrainOrVal of {subject!r} is {fixed[subject]!r}; expected 'train' or 'val'"
            )
    free = sorted(s for s in subjects if s not in pinned)
    n_free_val = min(max(target - sum(v == "val" for v in pinned.values()), 0), len(free))
    chosen = set(random.Random(seed).sample(free, n_free_val))
    val = [s for s in subjects if pinned.get(s) == "val" or s in chosen]
    val_set = set(val)
    train = [s for s in subjects if s not in val_set]
    return train, val
