"""Run a probe in a fresh interpreter: what a new site process imports and does is only visible there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def fresh_python(code: str, cwd: Path) -> Any:
    """Run `code` with this interpreter in a new process; return the JSON its last stdout line holds."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
