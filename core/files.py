"""Atomic files: every file another process may read while it is written goes through
`write_atomic` or `staged_dir` (write beside, then rename into place), so a reader sees all of
it or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when there is no such file (yet)."""
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def staged_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it becomes `target`.

    If `target` appeared meanwhile (another process wrote the same content), the staging
    folder is dropped, unless `replace`, which swaps the old folder out. On error the
    staging folder is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:  # written meanwhile by another process
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
