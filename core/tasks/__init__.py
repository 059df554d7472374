"""Synthetic tasks, seeded and deterministic, written as JSONL splits.

Each task is a generator registered in `TASKS` with its splits, parameters and an
answer checker; a stage can point at a user's own data file instead (core/data_files.py).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from stageflow.core.files import staged_dir
from stageflow.core.registry import CHECKS, TASKS

REQUIRED_FIELDS = ("prompt", "answer")


def generate(task: str, seed: int, size: int, params: dict[str, Any] | None = None) -> dict:
    """All splits of `task` as {split: [row, ...]}; the same arguments give the same rows."""
    return TASKS[task].rows(seed, size, params)


@lru_cache(maxsize=1)
def generators_version() -> str:
    """The generators' source: data written by other generator code is never reused."""
    sources = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
    return hashlib.sha256(sources).hexdigest()[:12]


def task_dir(cache_dir: str | Path, task: str, seed: int, size: int, params: dict | None) -> Path:
    key = json.dumps(
        [task, seed, size, sorted((params or {}).items()), generators_version()], default=str
    )
    return Path(cache_dir) / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def write_task(cache_dir: str | Path, task: str, seed: int, size: int, params=None) -> Path:
    """Write every split of a task as `<split>.jsonl` once (atomically) and return the folder."""
    out = task_dir(cache_dir, task, seed, size, params)
    if out.is_dir():
        return out
    with staged_dir(out) as staging:  # written concurrently elsewhere: theirs is identical
        for split, rows in generate(task, seed, size, params).items():
            (staging / f"{split}.jsonl").write_text("".join(dumps(row) + "\n" for row in rows))
    return out


def dumps(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=True)


def check_jsonl(path: str | Path, required: tuple[str, ...] = REQUIRED_FIELDS) -> str | None:
    """Why `path` is not a usable examples file (with the line number), or None when it is;
    `required`: the string fields every line must have."""
    path = Path(path)
    if not path.is_file():
        return "an existing JSONL file"
    count = 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"valid JSON on every line (line {number}: {err.msg})"
            if not isinstance(row, dict):
                return f"a JSON object on every line (line {number} is not one)"
            for name in required:
                if not isinstance(row.get(name), str):
                    return f"a string field '{name}' on every line (line {number} has none)"
            count += 1
    return None if count else "at least one example (the file is empty)"


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def check_answer(task: str | None, row: dict, completion: str) -> bool:
    """Whether `completion` answers `row` correctly: by the row's `check` (a checker its data
    set names), else by its task's rule, else by the `exact` checker (a user's data)."""
    if row.get("check"):
        return CHECKS[row["check"]].fn(row, completion)
    if task is not None:
        return TASKS[task].check(row, completion)
    return CHECKS["exact"].fn(row, completion)


# The generators register themselves on import.
from stageflow.core.tasks import facts, inst, math, mixture, refusal  # noqa: E402, F401
