"""Find BraTS cases on disk and tell which naming convention each one uses.

Only file names are looked at here (no volume is opened), so discovering a 1251-case root is instant.
Layout is detected per case, so a root mixing BraTS 2021 and 2023 cases works. A symlink is followed
only when it stays inside the data root: a site reads the data it was pointed at, nothing beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedbrats.shared.constants import LAYOUTS, MODALITIES, Layout
from fedbrats.shared.data.problems import CaseError, CaseProblem

log = logging.getLogger(__name__)

#: Dataset-level files that live next to the case folders (partition CSVs, labels, site maps, READMEs).
ROOT_FILE_SUFFIXES = (".csv", ".json", ".tsv", ".txt", ".md", ".yaml", ".yml", ".xlsx", ".toml")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One patient: its folder, naming convention and files (MODALITIES + "seg"; no "seg" without labels)."""

    case_id: str
    folder: Path
    layout: Layout
    files: dict[str, Path]

    @property
    def has_labels(self) -> bool:
        return "seg" in self.files


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")  # .DS_Store, ._AppleDouble, .ipynb_checkpoints


def _refusal(path: Path, root: Path) -> str | None:
    """Why `path` may not be read as data under `root` (a resolved path), or None when it may."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        return f"cannot resolve the symlink ({error}); expected a file or folder inside the data root {root}"
    if not target.is_relative_to(root):
        return (
            f"resolves to {target}, outside the data root {root}; expected only files and folders inside "
            "the data root (copy the data in, or make the data root a folder that holds it)"
        )
    if not target.exists():
        return f"broken symlink to {target}, which does not exist; expected an existing file or folder"
    return None


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _match(name: str, case_id: str, layout: Layout) -> str | None:
    """Our modality name ("t1".."flair", "seg") of a file of `case_id` in `layout`, else None."""
    stem = _strip_nifti(name)
    if stem is None or not stem.startswith(case_id + layout.separator):
        return None
    suffix = stem[len(case_id) + len(layout.separator) :]
    by_suffix = {v: k for k, v in layout.suffixes.items()} | {layout.seg_suffix: "seg"}
    return by_suffix.get(suffix)


def _expected_name(case_id: str, layout: Layout) -> str:
    suffixes = ",".join((*layout.suffixes.values(), layout.seg_suffix))
    return f"{case_id}{layout.separator}{{{suffixes}}}.nii.gz"


def _expected_names(case_id: str) -> str:
    return " or ".join(f"{_expected_name(case_id, lay)} ({lay.name})" for lay in LAYOUTS.values())


def _refused_entries(
    case_id: str, entries: list[Path], root: Path
) -> tuple[list[Path], list[CaseProblem], set[str]]:
    """Entries that may be read, a problem per refused one, and the modalities whose file was refused.

    A refused volume (a symlink out of the data root, a loop, a broken link) is fatal; a refused stray
    file is only reported, since it would be ignored anyway.
    """
    kept, problems, modalities = [], [], set()
    for entry in entries:
        reason = _refusal(entry, root)
        if reason is None:
            kept.append(entry)
            continue
        names = {m for lay in LAYOUTS.values() if (m := _match(entry.name, case_id, lay))}
        modalities |= names
        problems.append(CaseProblem(case_id, entry.name, reason, fatal=bool(names)))
    return kept, problems, modalities


def scan_case(folder: Path, root: Path | None = None) -> tuple[Case | None, list[CaseProblem]]:
    """Match the files of one case folder to a layout; the Case is None when a problem is fatal.

    Stray files are warnings (a README or a preview PNG next to complete volumes is harmless);
    a missing modality, a folder matching no layout, or a volume that is a symlink out of `root`
    (default: the case folder itself) is fatal.
    """
    folder = Path(folder)
    case_id = folder.name
    root = Path(root).resolve() if root is not None else folder.resolve()
    entries, refused, refused_modalities = _refused_entries(
        case_id, sorted(p for p in folder.iterdir() if not _hidden(p)), root
    )
    matches = {
        name: {p.name: m for p in entries if p.is_file() and (m := _match(p.name, case_id, lay))}
        for name, lay in LAYOUTS.items()
    }
    # the layout naming the most modalities wins; the seg suffix is shared, so it does not vote
    best = max(LAYOUTS, key=lambda n: sum(m != "seg" for m in matches[n].values()))
    if not any(m != "seg" for m in matches[best].values()):
        if any(p.fatal for p in refused):
            return None, refused
        nested = [p.name for p in entries if p.is_dir()]
        hint = f" (it holds folders {nested[:3]}: is the data root one level deeper?)" if nested else ""
        return None, [
            *refused,
            CaseProblem(
                case_id, "", f"no image file named for this case{hint}; expected {_expected_names(case_id)}"
            ),
        ]
    layout = LAYOUTS[best]
    files: dict[str, Path] = {}
    problems: list[CaseProblem] = list(refused)
    for entry in sorted(entries, key=lambda p: not p.name.endswith(".nii.gz")):  # .nii.gz beats a .nii twin
        modality = matches[best].get(entry.name)
        if modality is None or modality in files:  # a duplicate (.nii next to .nii.gz) counts as stray
            kind = "folder" if entry.is_dir() else "file"
            problems.append(
                CaseProblem(
                    case_id,
                    entry.name,
                    f"unexpected {kind}, ignored; expected only {_expected_name(case_id, layout)}",
                    fatal=False,
                )
            )
            continue
        files[modality] = entry
    for modality in MODALITIES:
        if modality not in files and modality not in refused_modalities:
            expected = layout.filename(case_id, modality)
            problems.append(CaseProblem(case_id, expected, f"missing {modality} image; expected {expected}"))
    if any(p.fatal for p in problems):
        return None, problems
    ordered = {m: files[m] for m in (*MODALITIES, "seg") if m in files}
    return Case(case_id, folder, layout, ordered), problems


def find_case(folder: Path) -> Case:
    """The Case in one folder; raises CaseError if it is unusable, logs non-fatal problems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseError(
            [CaseProblem(folder.name, "", f"{folder} is not a directory; expected a case folder")]
        )
    case, problems = scan_case(folder)  # the case folder is the root: its files may not point out of it
    if case is None:
        raise CaseError(problems)
    for p in problems:
        log.warning("%s", p)
    return case


def discover_cases(root: Path) -> tuple[list[Case], list[CaseProblem]]:
    """Every case folder under `root` (sorted by id) and the folder-level problems found.

    Only cases without fatal folder problems are returned. Hidden entries and dataset-level files
    (partitioning_1.csv, labels.csv, sites.json, name_mapping.csv, ...) at the root are ignored;
    any other file at the root is reported as a warning with case_id "". A case folder or volume that
    is a symlink resolving outside the root is a fatal problem naming it (symlinks inside are fine).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a directory; expected a folder of case folders")
    real_root = root.resolve()
    cases: list[Case] = []
    problems: list[CaseProblem] = []
    for entry in sorted(root.iterdir()):
        if _hidden(entry):
            continue
        if entry.is_symlink() and (reason := _refusal(entry, real_root)) is not None:
            if entry.is_dir() or not entry.name.lower().endswith(ROOT_FILE_SUFFIXES):
                problems.append(CaseProblem(entry.name, "", reason))
            continue
        if entry.is_dir():
            case, found = scan_case(entry, real_root)
            problems.extend(found)
            if case is not None:
                cases.append(case)
        elif not entry.name.lower().endswith(ROOT_FILE_SUFFIXES):
            problems.append(
                CaseProblem(
                    "",
                    entry.name,
                    "unexpected file at the data root, ignored; expected case "
                    "folders and dataset files (CSV/JSON)",
                    fatal=False,
                )
            )
    return cases, problems
