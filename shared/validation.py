"""Checks that tell a user, before any training starts, which cases are unusable and why.

The rules live here; the file reading lives in `shared.volumes` so that a full check and
`load_case` share one pass over each volume. `fedbrats data check ROOT` calls `run_check`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

    from shared.cases import Case

log = logging.getLogger(__name__)

#: Largest element-wise difference tolerated between the affines of one case (mm / cosines).
AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CaseProblem:
    """One thing wrong with one case: `file` is a file name, or "" for the case folder itself."""

    case_id: str
    file: str
    problem: str  # what is wrong AND what was expected
    fatal: bool = True

    def __str__(self) -> str:
        where = f"{self.case_id}/{self.file}" if self.file else self.case_id
        return f"{where}: {self.problem}"


class CaseError(ValueError):
    """A case cannot be used; `.problems` lists every reason found, fatal ones first."""

    def __init__(self, problems: Sequence[CaseProblem]):
        self.problems = sorted(problems, key=lambda p: not p.fatal)
        super().__init__("; ".join(str(p) for p in self.problems) or "unusable case")


# --------------------------------------------------------------------------- rules on arrays


def image_problems(
    case_id: str, file: str, shape: tuple[int, ...], data: np.ndarray | None
) -> list[CaseProblem]:
    """Dimensionality, finiteness and contrast of one modality (`data=None`: shape only)."""
    dims = len(shape)
    if dims < 3 or (dims == 3 and min(shape) == 1):
        return [
            CaseProblem(case_id, file, f"2D image of shape {shape}; expected a 3D volume (e.g. 240x240x155)")
        ]
    if dims > 3 and any(s != 1 for s in shape[3:]):
        return [
            CaseProblem(
                case_id, file, f"{dims}D image of shape {shape}; expected a 3D volume, one file per modality"
            )
        ]
    if data is None:
        return []
    lo, hi = float(data.min()), float(data.max())  # NaN/Inf propagate, so two passes cover finiteness too
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        return [CaseProblem(case_id, file, f"{bad} non-finite voxels (NaN/Inf); expected finite intensities")]
    if lo == hi == 0.0:
        return [
            CaseProblem(
                case_id, file, "every voxel is zero (empty image); expected a brain with non-zero intensities"
            )
        ]
    if lo == hi:
        return [
            CaseProblem(
                case_id, file, f"every voxel equals {lo:g} (constant image); expected varying intensities"
            )
        ]
    return []


def grid_problems(
    case_id: str,
    file: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    ref_file: str,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
) -> list[CaseProblem]:
    """Every modality and the seg must share one voxel grid (shape and affine) with the first modality."""
    if shape[:3] != ref_shape[:3]:
        return [
            CaseProblem(
                case_id,
                file,
                f"shape {shape[:3]} differs from {ref_file} {ref_shape[:3]}; "
                "expected all modalities and seg on one co-registered grid",
            )
        ]
    diff = float(np.abs(np.asarray(affine) - np.asarray(ref_affine)).max())
    if not diff <= AFFINE_TOLERANCE:
        return [
            CaseProblem(
                case_id,
                file,
                f"affine differs from {ref_file} by up to {diff:.4g} (tolerance "
                f"{AFFINE_TOLERANCE:g}); expected co-registered volumes with one affine",
            )
        ]
    return []


def unreadable_problem(case_id: str, file: str, error: BaseException) -> CaseProblem:
    """A file nibabel or gzip could not read (not a NIfTI, truncated download, bad gzip stream)."""
    detail = str(error).strip() or "no detail"
    return CaseProblem(
        case_id,
        file,
        f"cannot read ({type(error).__name__}: {detail}); expected a complete "
        "NIfTI file (.nii.gz): re-copy or re-download it",
    )


# --------------------------------------------------------------------------- whole cases and roots


def check_case(case: Case, *, with_labels: bool = True) -> list[CaseProblem]:
    """All data-level problems of one discovered case, reading each file once."""
    from shared.volumes import inspect_case  # volumes imports this module

    _, problems = inspect_case(case, with_labels=with_labels, keep=False)
    return problems


@dataclass
class CheckReport:
    """Result of checking a data root: which cases can be used, and everything found wrong."""

    usable: list[Case]
    problems: list[CaseProblem]
    n_cases: int = 0  # case folders seen, usable or not
    root: Path | None = field(default=None)

    @property
    def unusable_ids(self) -> list[str]:
        return sorted({p.case_id for p in self.problems if p.fatal})

    @property
    def ok(self) -> bool:
        return not self.unusable_ids and self.n_cases > 0


def _check_one(case: Case) -> list[CaseProblem]:
    return check_case(case)


def check_root(root: Path, *, workers: int = 1, progress: bool = False) -> CheckReport:
    """Discover every case under `root` and check its files; each volume is read once.

    `workers > 1` checks cases in parallel processes (decompression dominates; it scales per core).
    """
    from rich.progress import track

    from shared.cases import discover_cases

    cases, problems = discover_cases(Path(root))
    n_cases = len(cases) + len({p.case_id for p in problems if p.fatal} - {c.case_id for c in cases})
    problems = list(problems)
    if workers > 1 and len(cases) >= 2 * workers:
        # fork: children only run numpy/nibabel/gzip (no OpenMP), and spawn cannot re-import a stdin __main__
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
            found = pool.map(_check_one, cases, chunksize=4)
            per_case = list(
                track(found, total=len(cases), description="checking cases", disable=not progress)
            )
    else:
        per_case = [_check_one(c) for c in track(cases, description="checking cases", disable=not progress)]
    for case_problems in per_case:
        problems.extend(case_problems)
    bad = {p.case_id for p in problems if p.fatal}
    usable = [c for c in cases if c.case_id not in bad]
    return CheckReport(usable=usable, problems=problems, n_cases=n_cases, root=Path(root))


def format_report(report: CheckReport) -> Table:
    """A rich table with one row per problem: case, file, problem, severity."""
    from rich.table import Table

    table = Table(title=f"{len(report.usable)} of {report.n_cases} cases usable", show_lines=False)
    for name in ("case", "file", "problem", "severity"):
        table.add_column(name, overflow="fold")
    for p in sorted(report.problems, key=lambda p: (p.case_id, not p.fatal, p.file)):
        severity = "[red]error[/red]" if p.fatal else "[yellow]warning[/yellow]"
        table.add_row(p.case_id or "(root)", p.file or "(folder)", p.problem, severity)
    return table


def run_check(root: Path, *, workers: int | None = None, progress: bool = True) -> int:
    """Entry point of `fedbrats data check ROOT`: print the findings, return the exit code.

    0 = every case usable (warnings allowed); 1 = some case unusable or no case found; 2 = no such root.
    `workers=None` uses up to 8 processes.
    """
    from rich.console import Console

    console = Console()
    root = Path(root)
    if not root.is_dir():
        console.print(
            f"[red]error:[/red] data root {root} is not a directory; expected a folder of case folders"
        )
        return 2
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    report = check_root(root, workers=workers, progress=progress)
    if report.n_cases == 0:
        console.print(
            f"[red]error:[/red] no case folders under {root}; expected ROOT/<case>/<case>_t1.nii.gz "
            "(BraTS 2017-2021) or ROOT/<case>/<case>-t1n.nii.gz (BraTS 2023+)"
        )
        return 1
    if report.problems:
        console.print(format_report(report))
    n_warn = sum(not p.fatal for p in report.problems)
    if report.unusable_ids:
        console.print(
            f"{report.n_cases} cases, {len(report.unusable_ids)} unusable: {', '.join(report.unusable_ids)}"
        )
        return 1
    suffix = f" ({n_warn} warnings)" if n_warn else ""
    console.print(f"{report.n_cases} cases, all usable{suffix}")
    return 0
