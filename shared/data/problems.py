"""What can be wrong with a case: one problem, and the error that carries a case's problems.

No reading and no rules here, so every other data module can import it (no cycles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
