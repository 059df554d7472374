"""The study directory: the one thing every node of a cluster shares, and its atomic writes.

Layout under `StudyDir.root` (spec.storage_dir, default runs/<name>):

    study.yaml     the resolved spec the study runs with (`stageflow resume` reads it)
    models/        the locally built base model
    data/          generated task data, one folder of JSONL splits per (task, seed, size)
    prefixes/      the prefix cache: <key>/{model/, meta.json}, <key>.eval.json, <key>.claim/
    trials/        one record per finished trial: <trial id>.json (with its plan's fingerprint)
    tune/          the Ray Tune experiment (what resume restores)
    report/        report.md, report.html, figures/
    artifacts/     MLflow artifacts of the default store
    mlflow.db      the default MLflow store
    provenance.json  stageflow's version and commit, library versions, CPU, threads
    identity-memo.json  the base model's file digests by size, mtime and inode

Every file another process may read while it is written goes through `write_atomic` or
`staged_dir` (write beside, then rename into place), so a reader sees all of it or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StudyDir:
    """Where each part of a study lives; the only place that spells the layout out."""

    root: Path

    @classmethod
    def of(cls, spec: Any) -> StudyDir:
        return cls(Path(spec.storage_dir or f"runs/{spec.name}").absolute())

    spec_file = property(lambda self: self.root / "study.yaml")
    models = property(lambda self: self.root / "models")
    data = property(lambda self: self.root / "data")
    prefixes = property(lambda self: self.root / "prefixes")
    trials = property(lambda self: self.root / "trials")
    tune = property(lambda self: self.root / "tune")
    report = property(lambda self: self.root / "report")
    artifacts = property(lambda self: self.root / "artifacts")
    mlflow_db = property(lambda self: self.root / "mlflow.db")
    timing = property(lambda self: self.root / "timing.json")  # the driver's time breakdown
    provenance = property(lambda self: self.root / "provenance.json")  # versions, CPU, commit

    @property
    def tracking_uri(self) -> str:
        """The default MLflow store of the study."""
        return f"sqlite:///{self.mlflow_db}"

    def cache(self):
        """The study's prefix cache (checkpoints and evaluations of stage prefixes)."""
        from stageflow.platform.prefix_cache import PrefixCache

        return PrefixCache(self.prefixes)

    def trial_record(self, trial_id: str) -> Path:
        return self.trials / f"{trial_id}.json"

    def read_record(self, trial_id: str) -> dict | None:
        return read_json(self.trial_record(trial_id))

    def write_record(self, trial_id: str, record: dict) -> None:
        write_json(self.trial_record(trial_id), record)

    def records(self, trials: list, fingerprints: dict[str, str] | None) -> list[tuple[Any, dict]]:
        """(trial, record) of the finished trials, in the study's trial order: those whose
        record was made by the trial's current plan (`fingerprints`: trial id -> its plan's
        fingerprint; a stale record, of a study, data or code that changed since, is not
        one), or every record when `fingerprints` is None (a report of what was run)."""
        found = [(trial, self.read_record(trial.trial_id)) for trial in trials]
        return [
            (trial, record)
            for trial, record in found
            if record is not None
            and (
                fingerprints is None
                or record.get("fingerprint") == fingerprints.get(trial.trial_id)
            )
        ]

    def stale_records(self, trials: list, fingerprints: dict[str, str]) -> list[Any]:
        """The trials whose record another plan made (they run again)."""
        found = [(trial, self.read_record(trial.trial_id)) for trial in trials]
        return [
            trial
            for trial, record in found
            if record is not None and record.get("fingerprint") != fingerprints.get(trial.trial_id)
        ]
