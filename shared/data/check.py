"""The check runner: which cases under a root are usable and why not, before any training starts.

The rules live in `rules`, the file reading in `volumes`, so that a full check and `load_case` share
one pass over each volume. `fedbrats data check ROOT` prints what `check_root` returns.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from fedbrats.shared.data.cases import Case, discover_cases
from fedbrats.shared.data.problems import CaseProblem
from fedbrats.shared.data.volumes import inspect_case


def check_case(case: Case, *, with_labels: bool = True) -> list[CaseProblem]:
    """All data-level problems of one discovered case, reading each file once."""
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
