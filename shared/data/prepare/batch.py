"""A site's whole batch: one case per patient folder, a failed case reported and the batch going on.

The source root holds one folder per patient. Case ids are the folder names, or, with an id prefix,
`<prefix>_<10 hex digits>` derived from the folder name (stable across runs, so a patient added
later does not renumber the others, and a folder named after a patient does not name the case).
`prepare_report.json` at the output root lists every case with its status and, for a failure, why.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedbrats.shared.atomic import atomic_write_text
from fedbrats.shared.data.prepare.atlas import Atlas
from fedbrats.shared.data.prepare.pipeline import PIPELINE_VERSION, PrepareSettings, prepare_case
from fedbrats.shared.data.prepare.provenance import already_prepared, provenance, run_key, write_provenance
from fedbrats.shared.data.prepare.rules import SeriesRules

REPORT = "prepare_report.json"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class CaseOutcome:
    """One patient folder's fate: prepared, skipped (already prepared identically) or failed (with why)."""

    source: str  # the patient folder's name (stays at the site, in prepare_report.json only)
    case_id: str
    status: str
    seconds: float = 0.0
    error: str = ""


@dataclass
class BatchReport:
    out: Path
    outcomes: list[CaseOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and not self.failed


def patient_folders(source: Path) -> list[Path]:
    """The patient folders under `source` (hidden ones skipped), sorted by name."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(
            f"source {source} is not a folder; expected a folder holding one folder per patient"
        )
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(
            f"source {source} holds no patient folder; expected one folder per patient (DICOM or NIfTI)"
        )
    return folders


def case_id_for(folder: Path, prefix: str | None) -> str:
    """The case id of a patient folder: its name, or `<prefix>_<hash of the name>` (see the module doc)."""
    if prefix is None:
        name = folder.name
        if not _CASE_ID.match(name):
            raise ValueError(
                f"patient folder name {name!r} cannot be a case id (letters, digits, '_', '-', '.' only); "
                "rename it or pass an id prefix"
            )
        return name
    if not _CASE_ID.match(prefix):
        raise ValueError(f"id prefix {prefix!r}: expected letters, digits, '_', '-', '.' only")
    return f"{prefix}_{hashlib.sha256(folder.name.encode()).hexdigest()[:10]}"


def prepare_batch(
    source: Path,
    out: Path,
    atlas: Atlas,
    rules: SeriesRules | None = None,
    settings: PrepareSettings | None = None,
    *,
    id_prefix: str | None = None,
    force: bool = False,
    progress: bool = True,
    on_case: Callable[[CaseOutcome], None] | None = None,
) -> BatchReport:
    """Prepare every patient folder under `source` into `out`; never stops at a failed case."""
    rules = rules or SeriesRules()
    settings = settings or PrepareSettings()
    folders = patient_folders(source)
    ids = [case_id_for(f, id_prefix) for f in folders]
    twins = sorted({i for i in ids if ids.count(i) > 1})
    if twins:
        raise ValueError(
            f"several patient folders give the case id(s) {twins}; expected one folder per case id"
        )
    out = Path(out)
    if out.resolve() == Path(source).resolve() or Path(source).resolve() in out.resolve().parents:
        raise ValueError(f"output {out} lies inside the source {source}; expected a separate folder")
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(atlas, rules, settings)
    report = BatchReport(out)
    with _Progress(progress, len(folders)) as bar:
        for folder, case_id in zip(folders, ids, strict=True):
            bar.case(case_id)
            if not force and already_prepared(out, case_id, key, settings.layout):
                outcome = CaseOutcome(folder.name, case_id, "skipped")
            else:
                outcome = _one(folder, out, case_id, atlas, rules, settings, bar.stage)
            report.outcomes.append(outcome)
            _write_report(report, key)
            bar.done(outcome)
            if on_case is not None:
                on_case(outcome)
    return report


def _one(folder, out, case_id, atlas, rules, settings, stage) -> CaseOutcome:
    start = time.perf_counter()
    try:
        case = prepare_case(folder, out, case_id, atlas, rules, settings, stage=stage)
        write_provenance(out, provenance(case, atlas, rules, settings))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - one patient's problem must not stop the site's batch
        text = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, ValueError | OSError):
            text = f"{type(error).__name__}: {text}"
        return CaseOutcome(folder.name, case_id, "failed", time.perf_counter() - start, text)
    return CaseOutcome(folder.name, case_id, "prepared", time.perf_counter() - start)


def _write_report(report: BatchReport, key: dict) -> None:
    counts = {s: sum(o.status == s for o in report.outcomes) for s in ("prepared", "skipped", "failed")}
    body = {"pipeline_version": PIPELINE_VERSION, "settings": key["settings"], "atlas": key["atlas"], **counts,
            "cases": [asdict(o) for o in report.outcomes]}  # fmt: skip
    atomic_write_text(report.out / REPORT, json.dumps(body, indent=2) + "\n")


class _Progress:
    """A rich progress bar over cases, showing the current case and its stage; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._bar = None
        self._task = None
        self._case = ""

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self._bar.start()
            self._task = self._bar.add_task("preparing", total=self.total)
        return self

    def case(self, case_id: str) -> None:
        self._case = case_id
        self.stage("starting")

    def stage(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self._case}: {text}")

    def done(self, outcome: CaseOutcome) -> None:
        if self._bar is None:
            return
        if outcome.status == "failed":
            self._bar.console.print(f"[red]failed[/red] {outcome.case_id}: {outcome.error}", highlight=False)
        self._bar.update(self._task, advance=1)
        if self._bar.tasks[0].finished:
            self._bar.update(self._task, description="prepared")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
