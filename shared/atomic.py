"""One way to write state that must survive a crash: a whole new file or the old one, never half.

Write to a unique temporary name in the same folder, fsync the file, rename it over the target,
fsync the folder (DESIGN section 10). Every place that writes state (checkpoints, server state,
history, site state, partition CSVs, caches, reports) goes through `atomic_write`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None, durable: bool = True) -> Path:
    """Replace `path` by `data` atomically and durably; the folder is created if missing.

    The file gets `mode` (e.g. 0o600 for keys) or, by default, what a plain `open` would give
    under the process umask (a temporary file alone would be private to its owner). `durable=False`
    skips the fsyncs, for records nothing reads back (a crash still leaves the old file or the new one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None, durable: bool = True) -> Path:
    return atomic_write(path, text.encode("utf-8"), mode=mode, durable=durable)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, mode: int | None = None, durable: bool = True
) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n", mode=mode, durable=durable)
