"""The run history: one JSON line per round, plus a few event lines (a resume with another configuration).

Each round is appended with a single ``write`` of one line followed by ``fsync``, so a crash can tear
only the LAST line: that round has no checkpoint yet, so resuming cuts the line and runs the round
again. A damaged line anywhere else is not a crash but a damaged file (disk, hand edit): it is kept
verbatim, every intact round around it is kept, and the reader says which line it is, so the round
can be repaired by hand instead of being dropped for good. Rewrites go through the atomic write.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbrats.shared.atomic import atomic_write_text

log = logging.getLogger("fedbrats.server")

#: The key that marks an event line (not a round): {"event": "resume-override", ...}.
EVENT = "event"
#: The event of a warm-started run: where its initial model came from (path, digest; server.app).
INITIAL_MODEL = "initial-model"


@dataclass
class HistoryScan:
    """What a history file holds: intact rounds, events, damaged lines and a torn last line."""

    path: Path
    lines: list[str] = field(default_factory=list)  # the raw non-empty lines, in file order
    numbers: list[int] = field(default_factory=list)  # their 1-based line numbers in the file
    parsed: list[dict[str, Any] | None] = field(default_factory=list)  # None where a line is damaged
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, why), torn tail excluded
    torn_tail: tuple[int, str] | None = None  # the last line, cut by a crash mid-append

    @property
    def records(self) -> list[dict[str, Any]]:
        return [p for p in self.parsed if p is not None and EVENT not in p]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [p for p in self.parsed if p is not None and EVENT in p]

    def damage_report(self) -> list[str]:
        """One sentence per damaged middle line: where it is and which round it probably held."""
        notes = []
        for number, why in self.damaged:
            before = [p["round"] for n, p in self._numbered() if p is not None and n < number and EVENT not in p]
            after = [p["round"] for n, p in self._numbered() if p is not None and n > number and EVENT not in p]
            where = f"after round {before[-1]}" if before else "before the first round"
            if after:
                where += f" and before round {after[0]}"
            notes.append(
                f"{self.path} line {number} is damaged ({why}); it lies {where}: that round's record is missing "
                "from reports until the line is repaired (every other round is kept)"
            )
        return notes

    def _numbered(self):
        return zip(self.numbers, self.parsed, strict=True)


def _parse(line: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON: {err.msg} at column {err.colno}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, found {type(value).__name__}"
    if EVENT not in value and not isinstance(value.get("round"), int):
        return None, "a round record without an integer 'round'"
    return value, None


def scan_history(path: Path) -> HistoryScan:
    """Read every line, never dropping anything silently: see `HistoryScan`."""
    scan = HistoryScan(Path(path))
    if not scan.path.is_file():
        return scan
    text = scan.path.read_text(encoding="utf-8", errors="replace")
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for index, (number, line) in enumerate(numbered):
        value, why = _parse(line)
        scan.lines.append(line)
        scan.parsed.append(value)
        scan.numbers.append(number)
        if why is None:
            continue
        if index == len(numbered) - 1:
            scan.torn_tail = (number, why)
        else:
            scan.damaged.append((number, why))
    return scan


def read_history(path: Path) -> list[dict[str, Any]]:
    """The intact round records in file order; damaged middle lines are logged (file and line), not hidden."""
    scan = scan_history(path)
    for note in scan.damage_report():
        log.warning(note)
    return scan.records


def read_events(path: Path) -> list[dict[str, Any]]:
    """Event lines (e.g. a resume with another configuration), in file order."""
    return scan_history(path).events


class RunHistory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def append_event(self, event: str, **details: Any) -> None:
        """Record something that is not a round (readers of rounds skip it)."""
        self.append({EVENT: event, **details})

    def records(self) -> list[dict[str, Any]]:
        return read_history(self.path)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.path)

    def replace_round(self, record: dict[str, Any]) -> None:
        """Rewrite the line of round ``record["round"]`` (its last one) in place, atomically: with
        evaluate-in-train a round's evaluation arrives with the next round's training. Other lines stay."""
        scan = scan_history(self.path)
        rounds = [i for i, p in enumerate(scan.parsed) if p is not None and EVENT not in p and p["round"] == record["round"]]
        if not rounds:
            raise ValueError(f"{self.path} holds no round {record['round']} to replace")
        lines = list(scan.lines)
        lines[rounds[-1]] = json.dumps(record, sort_keys=True, allow_nan=True)
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def truncate_after(self, last_round: int) -> HistoryScan:
        """Keep what precedes the first round later than `last_round` (the checkpoint's), used on resume.

        A torn last line is cut (its round is run again); damaged lines among the kept rounds stay as
        they are, with a warning naming them, so nothing is lost for good. Returns the scan it cut from.
        """
        scan = scan_history(self.path)
        keep = 0
        for index, value in enumerate(scan.parsed):
            if value is not None and EVENT not in value and value["round"] > last_round:
                break
            keep = index + 1
        while keep and scan.parsed[keep - 1] is None:  # damaged lines just before the cut belong to later rounds
            keep -= 1
        if scan.torn_tail:
            number, why = scan.torn_tail
            log.warning("%s line %d was cut by a crash mid-append (%s); that round runs again", self.path, number, why)
        kept_numbers = set(scan.numbers[:keep])
        for note, (number, _) in zip(scan.damage_report(), scan.damaged, strict=True):
            if number in kept_numbers:
                log.warning(note)
        if keep < len(scan.lines) or (scan.path.is_file() and not _ends_cleanly(scan.path)):
            atomic_write_text(self.path, "".join(line + "\n" for line in scan.lines[:keep]))
        return scan


def _ends_cleanly(path: Path) -> bool:
    """True when the file is empty or ends with a newline (an append will start a fresh line)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
