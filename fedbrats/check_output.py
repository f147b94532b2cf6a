"""What `fedbrats data check` prints: the check runner's findings as a table or one line per problem."""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from fedbrats.shared.data.check import CheckReport, check_root


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
