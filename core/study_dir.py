"""The study directory: the one thing every node of a cluster shares.

Layout under `StudyDir.root` (spec.storage_dir, default runs/<name>):

    study.yaml     the resolved spec the study runs with (`stageflow resume` reads it)
    models/        the locally built base model
    data/          generated task data, one folder of JSONL splits per (task, seed, size)
    prefixes/      the prefix cache: <key>/{model/, meta.json}, <key>.eval.json, <key>.claim/
    trials/        one record per finished trial: <trial id>.json (with its plan's fingerprint)
    tune/          the Ray Tune experiment (what resume restores)
    report/        report.md, report.html, figures/
    export/        results.csv, results.parquet (`stageflow export`)
    artifacts/     MLflow artifacts of the default store
    mlflow.db      the default MLflow store
    provenance.json  stageflow's version and commit, library versions, CPU, threads
    driver.lock    locked while a driver runs the study (`stageflow prune` refuses it then)
    identity-memo.json  the base model's file digests by size, mtime and inode

Writes go through core/files.py (atomic: a reader sees all of a file or nothing).
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stageflow.core.config import StudyError
from stageflow.core.files import read_json, write_json
from stageflow.core.prefix_cache import PrefixCache


@dataclass(frozen=True)
class StudyDir:
    """Where each part of a study lives; the only place that spells the layout out."""

    root: Path

    @classmethod
    def of(cls, spec: Any) -> StudyDir:
        return cls(Path(spec.storage_dir or f"runs/{spec.name}").absolute())

    @classmethod
    def existing(cls, run_dir: str | Path, key: str = "study_dir") -> StudyDir:
        """The directory of a study that ran; a StudyError at `key` when it holds no study.yaml."""
        study = cls(Path(run_dir).absolute())
        if not study.spec_file.is_file():
            raise StudyError(
                str(run_dir), key, "no study.yaml here; expected the directory of a study that ran"
            )
        return study

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
    driver_lock = property(lambda self: self.root / "driver.lock")  # locked while a driver runs
    search_log = property(lambda self: self.root / "search.json")  # an ordering search's state

    def searched_paths(self) -> list[tuple[str, ...]]:
        """The paths an ordering search has asked for, in order ([] before it starts), but
        those it stopped early (their trials have no result, by design)."""
        state = read_json(self.search_log) or {"asked": []}
        stopped = {tuple(p) for p in state.get("pruned", [])}
        return [tuple(p) for p in state["asked"] if tuple(p) not in stopped]

    @property
    def tracking_uri(self) -> str:
        """The default MLflow store of the study."""
        return f"sqlite:///{self.mlflow_db}"

    def mark_running(self) -> IO[str] | None:
        """Mark the study as running while the returned file stays open (an flock on
        driver.lock: the system drops it when the driver ends, however it ends); None when
        another driver holds it already."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = self.driver_lock.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def running(self) -> bool:
        """Whether a driver runs the study now (on this host; `mark_running`)."""
        if not self.driver_lock.is_file():
            return False
        handle = self.mark_running()
        if handle is None:
            return True
        handle.close()
        return False

    def disk_use(self) -> dict[str, tuple[int, int]]:
        """{part: (bytes, files or checkpoints)} of checkpoints, evaluations, data, the base
        model and MLflow (store and artifacts)."""
        cache = self.cache()
        entries = [cache.entry(key) for key in cache.checkpoints()]
        evals = list(self.prefixes.glob("*.eval.json"))
        mlflow = [self.mlflow_db, self.artifacts]
        return {
            "checkpoints": (sum(map(tree_bytes, entries)), len(entries)),
            "evaluations": (sum(map(tree_bytes, evals)), len(evals)),
            "data": (tree_bytes(self.data), 0),
            "base model": (tree_bytes(self.models), 0),
            "MLflow": (sum(map(tree_bytes, mlflow)), 0),
        }

    def cache(self) -> PrefixCache:
        """The study's prefix cache (checkpoints and evaluations of stage prefixes)."""
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


def tree_bytes(path: Path) -> int:
    """The bytes of a file, or of every file under a folder (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
