"""What `fedbrats data check` prints: a table on a terminal, one line per problem in a log, or JSON.

A table wraps long file names across lines, which is right on a terminal and wrong in a piped log
(grep finds half a name); so when stdout is not a terminal each problem is one unwrapped line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from fedbrats.shared.data.check import CheckReport, check_root
from fedbrats.shared.data.problems import CaseProblem


def _ordered(report: CheckReport) -> list[CaseProblem]:
    return sorted(report.problems, key=lambda p: (p.case_id, not p.fatal, p.file))


def format_report(report: CheckReport) -> Table:
    """A rich table with one row per problem: case, file, problem, severity."""
    table = Table(title=f"{len(report.usable)} of {report.n_cases} cases usable", show_lines=False)
    for name in ("case", "file", "problem", "severity"):
        table.add_column(name, overflow="fold")
    for p in _ordered(report):
        severity = "[red]error[/red]" if p.fatal else "[yellow]warning[/yellow]"
        table.add_row(p.case_id or "(root)", p.file or "(folder)", p.problem, severity)
    return table


def problem_lines(report: CheckReport) -> list[str]:
    """One line per problem, never wrapped: 'error: CASE/FILE: problem' (or 'warning: ...')."""
    return [f"{'error' if p.fatal else 'warning'}: {' '.join(str(p).splitlines())}" for p in _ordered(report)]


def report_json(report: CheckReport) -> dict[str, Any]:
    """The machine-readable report of `fedbrats data check --json`."""
    return {
        "root": str(report.root) if report.root is not None else None,
        "cases": report.n_cases,
        "usable": sorted(c.case_id for c in report.usable),
        "unusable": report.unusable_ids,
        "ok": report.ok,
        "problems": [
            {"case": p.case_id, "file": p.file, "problem": p.problem, "severity": "error" if p.fatal else "warning"}
            for p in _ordered(report)
        ],
    }


def _summary(report: CheckReport) -> str:
    if report.unusable_ids:
        return f"{report.n_cases} cases, {len(report.unusable_ids)} unusable: {', '.join(report.unusable_ids)}"
    n_warn = sum(not p.fatal for p in report.problems)
    return f"{report.n_cases} cases, all usable" + (f" ({n_warn} warnings)" if n_warn else "")


def run_check(
    root: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    as_json: bool = False,
    plain: bool | None = None,
) -> int:
    """Entry point of `fedbrats data check ROOT`: print the findings, return the exit code.

    0 = every case usable (warnings allowed); 1 = some case unusable or no case found; 2 = no such root.
    `workers=None` uses up to 8 processes. `plain` (default: stdout is not a terminal) prints one line
    per problem instead of a table; `as_json` prints only the JSON report.
    """
    from rich.console import Console

    root = Path(root)
    if plain is None:
        plain = not sys.stdout.isatty()
    console = Console()

    def fail(message: str, code: int) -> int:
        if as_json:
            print(json.dumps({"root": str(root), "error": message, "ok": False}, indent=2))
        else:
            print(f"fedbrats data check: error: {message}", file=sys.stderr)
        return code

    if not root.is_dir():
        return fail(f"data root {root} is not a directory; expected a folder of case folders", 2)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    report = check_root(root, workers=workers, progress=progress and not plain and not as_json)
    if as_json:
        print(json.dumps(report_json(report), indent=2))
        return 0 if report.ok else 1
    if report.n_cases == 0:
        return fail(
            f"no case folders under {root}; expected ROOT/<case>/<case>_t1.nii.gz "
            "(BraTS 2017-2021) or ROOT/<case>/<case>-t1n.nii.gz (BraTS 2023+)",
            1,
        )
    if report.problems:
        if plain:
            for line in problem_lines(report):
                print(line)
        else:
            console.print(format_report(report))
    if plain:
        print(_summary(report))
    else:
        console.print(_summary(report), markup=False)
    return 0 if report.ok else 1
