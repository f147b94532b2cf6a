"""The run history: one JSON line per round, appended atomically so a crash cannot corrupt it.

Each record is written with a single ``write`` of one line followed by ``fsync``; a torn last
line (power loss mid-write) is detected and ignored on reading, and a resumed run truncates
rounds later than its checkpoint so history and weights always agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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

    def records(self) -> list[dict[str, Any]]:
        return read_history(self.path)

    def truncate_after(self, last_round: int) -> None:
        """Keep records of rounds <= last_round (used on resume)."""
        kept = [r for r in self.records() if r.get("round", 0) <= last_round]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def read_history(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a crash: the round was not completed
    return records
