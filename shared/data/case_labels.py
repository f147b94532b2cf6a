"""Case-level labels (tumor grade, MGMT status, any class per patient) read from a CSV (DESIGN section 9).

The classification model learns one label per case. Known files are found beside the case folders:
the phantom's `labels.csv` (`Subject_ID`, `Grade`), BraTS 2020's `name_mapping.csv`
(`BraTS_2020_subject_ID`, `Grade`) and the BraTS 2021 task 2 / RSNA-MICCAI `train_labels.csv`
(`BraTS21ID` as a number, `MGMT_value` 0/1), whose ids are turned into case names like
`BraTS2021_00012`. Any other CSV is read with its column names given.

Class names come from the data, sorted (numerically when every name is an integer, so "2" < "10"),
unless an explicit order is given: class index i is `classes[i]`, and binary metrics treat index 1
as positive. Errors name the file, the line and what was expected, as the partition reader's do.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Cells read as a missing label.
MISSING = frozenset({"", "na", "n/a", "nan", "none", "null"})
#: How many unlabelled cases an error lists before it only counts the rest.
_LISTED = 20


class CaseLabelError(ValueError):
    """A labels file, or cases and labels, that cannot be used as they are."""


def _brats21_case(cell: str) -> str:
    """RSNA-MICCAI `BraTS21ID` (12, "00012") -> the BraTS 2021 case name `BraTS2021_00012`."""
    if not cell.isdigit():
        raise ValueError(f"expected a case number such as 12 or 00012, got {cell!r}")
    return f"BraTS2021_{int(cell):05d}"


@dataclass(frozen=True)
class LabelFormat:
    """A labels CSV we know by name: where the subject id and the class are."""

    filename: str
    id_column: str
    label_column: str
    case_name: Callable[[str], str] | None = None  # id cell -> case folder name, when they differ


#: Looked for in this order by `find_label_file`.
KNOWN_FORMATS = (
    LabelFormat("labels.csv", "Subject_ID", "Grade"),  # the phantom (and our own convention)
    LabelFormat("name_mapping.csv", "BraTS_2020_subject_ID", "Grade"),  # BraTS 2020
    LabelFormat("train_labels.csv", "BraTS21ID", "MGMT_value", _brats21_case),  # BraTS 2021 task 2
)


def _sort_classes(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


@dataclass(frozen=True)
class CaseLabels:
    """Class name per subject, and the class order (index i = `classes[i]`)."""

    path: Path
    label_column: str
    classes: tuple[str, ...]
    labels: dict[str, str]  # subject -> class name, in file order

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, subject: object) -> bool:
        return subject in self.labels

    def index(self, subject: str) -> int:
        """Class index of `subject`; an unlabelled subject is an error naming the file."""
        self.require([subject])
        return self.classes.index(self.labels[subject])

    def indices(self, subjects: Sequence[str]) -> list[int]:
        """Class indices of `subjects`, in their order (all must be labelled)."""
        self.require(subjects)
        return [self.classes.index(self.labels[s]) for s in subjects]

    def require(self, subjects: Iterable[str], where: str = "") -> None:
        """Raise CaseLabelError listing the subjects that have no label in this file."""
        missing = [s for s in subjects if s not in self.labels]
        if missing:
            more = len(missing) - _LISTED
            listed = ", ".join(missing[:_LISTED]) + (f" and {more} more" if more > 0 else "")
            place = f" of {where}" if where else ""
            raise CaseLabelError(
                f"{self.path}: no {self.label_column} label for {len(missing)} case(s){place}: {listed}; "
                "expected one row per case (add the rows, or drop the cases from the partition)"
            )

    def counts(self, subjects: Iterable[str] | None = None) -> dict[str, int]:
        """Cases per class (every class listed, zeros included), over `subjects` or the whole file."""
        subjects = list(self.labels) if subjects is None else list(subjects)
        self.require(subjects)
        counts = dict.fromkeys(self.classes, 0)
        for s in subjects:
            counts[self.labels[s]] += 1
        return counts


def _header_index(header: list[str], column: str) -> int | None:
    lowered = [h.lower() for h in header]
    return lowered.index(column.lower()) if column.lower() in lowered else None


def read_case_labels(
    path: Path | str,
    label_column: str = "Grade",
    id_column: str = "Subject_ID",
    *,
    classes: Sequence[str] | None = None,
    case_name: Callable[[str], str] | None = None,
) -> CaseLabels:
    """Read one label per subject. Column names match case-insensitively; extra columns are ignored.

    `classes` fixes the class order (e.g. ("LGG", "HGG") to make HGG the positive class) and
    refuses other values; `case_name` turns an id cell into a case folder name (the MGMT ids).
    """
    path = Path(path)
    if case_name is None:
        case_name = next(
            (f.case_name for f in KNOWN_FORMATS if f.id_column.lower() == id_column.lower() and f.case_name),
            None,
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CaseLabelError(f"{path}: labels file not found") from None
    except UnicodeDecodeError as err:
        raise CaseLabelError(f"{path}: not UTF-8 text ({err}); expected a CSV file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next((row for row in reader if any(c.strip() for c in row)), None)
    if header is None:
        raise CaseLabelError(f"{path}: empty file; expected a header with {id_column!r} and {label_column!r}")
    header = [h.strip() for h in header]
    id_col, label_col = _header_index(header, id_column), _header_index(header, label_column)
    missing = [c for c, i in ((id_column, id_col), (label_column, label_col)) if i is None]
    if missing:
        known = next((f for f in KNOWN_FORMATS if f.filename == path.name), None)
        hint = (
            f" ({known.filename} usually has {known.id_column!r} and {known.label_column!r})" if known else ""
        )
        raise CaseLabelError(
            f"{path}, line {reader.line_num}: no column {', '.join(map(repr, missing))}; "
            f"columns found: {header}{hint}"
        )
    allowed = None if classes is None else [str(c) for c in classes]
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        raw_id = cells[id_col] if id_col < len(cells) else ""
        value = cells[label_col] if label_col < len(cells) else ""
        if not raw_id:
            raise CaseLabelError(f"{path}, line {line}: empty {header[id_col]}; expected a subject id")
        try:
            subject = case_name(raw_id) if case_name else raw_id
        except ValueError as err:
            raise CaseLabelError(f"{path}, line {line}: {header[id_col]} {err}") from None
        if value.lower() in MISSING:
            raise CaseLabelError(
                f"{path}, line {line}: subject {subject!r} has no {header[label_col]} ({value!r}); "
                "expected a class name on every row"
            )
        if allowed is not None and value not in allowed:
            raise CaseLabelError(
                f"{path}, line {line}: subject {subject!r} has {header[label_col]} {value!r}; expected one of {allowed}"
            )
        if subject in labels:
            raise CaseLabelError(
                f"{path}, line {line}: subject {subject!r} already listed on line {first_line[subject]}; "
                "expected each subject once"
            )
        labels[subject] = value
        first_line[subject] = line
    if not labels:
        raise CaseLabelError(f"{path}: no rows after the header; expected one row per case")
    ordered = tuple(allowed) if allowed is not None else _sort_classes(labels.values())
    return CaseLabels(path, header[label_col], ordered, labels)


def _columns(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return []


def find_label_file(root: Path | str, label_column: str | None = None) -> tuple[Path, LabelFormat] | None:
    """The first known labels file in `root` (KNOWN_FORMATS order) that has its columns, and its format.

    With `label_column` (e.g. "MGMT_value"), only a file of a format with that column is returned.
    None when `root` holds none (a file of a known name but other columns is skipped).
    """
    root = Path(root)
    for fmt in KNOWN_FORMATS:
        path = root / fmt.filename
        if not path.is_file():
            continue
        if label_column is not None and label_column.lower() != fmt.label_column.lower():
            continue
        columns = {c.lower() for c in _columns(path)}
        if {fmt.id_column.lower(), fmt.label_column.lower()} <= columns:
            return path, fmt
    return None


def load_case_labels(
    root: Path | str, label_column: str | None = None, *, classes: Sequence[str] | None = None
) -> CaseLabels | None:
    """Labels of the dataset in `root` from a known file (`find_label_file`), or None when it has none."""
    found = find_label_file(root, label_column)
    if found is None:
        return None
    path, fmt = found
    return read_case_labels(path, fmt.label_column, fmt.id_column, classes=classes, case_name=fmt.case_name)


@dataclass(frozen=True)
class SiteClasses:
    """Which classes one site holds. A single-class site still trains; its own AUC is undefined."""

    site: str
    counts: dict[str, int]  # class name -> cases at the site (every class listed)

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(c for c, n in self.counts.items() if n)

    @property
    def single_class(self) -> str | None:
        """The only class the site holds, or None when it holds several (or none)."""
        return self.present[0] if len(self.present) == 1 else None

    @property
    def auc_reason(self) -> str | None:
        """Why the site's own AUC is undefined, or None when it is defined."""
        if not self.present:
            return f"site {self.site} has no labelled cases: its AUC is undefined"
        if len(self.present) == 1:
            c = self.present[0]
            return (
                f"site {self.site} holds only {c} cases ({self.counts[c]}): its AUC is undefined "
                "(it still trains and counts in the pooled AUC)"
            )
        return None


def site_classes(labels: CaseLabels, sites: Mapping[str, Iterable[str]]) -> dict[str, SiteClasses]:
    """Per site (e.g. `Partition.sites`), the class counts; unlabelled cases are an error naming the site."""
    report = {}
    for site, subjects in sites.items():
        subjects = list(subjects)
        labels.require(subjects, where=f"site {site}")
        report[str(site)] = SiteClasses(str(site), labels.counts(subjects))
    return report
