"""`stageflow prune`: remove prefix checkpoints a study no longer needs and say what it freed.

`--keep final` keeps the model at the end of each finished trial's path and of each of its
unlearning branches (what `export-model` copies out); `--keep reported` keeps no checkpoint
(the report, `status` and `export` read trial records and evaluations, which stay); `--keep
all` removes nothing. A pruned study resumes: a trial that needs a removed prefix trains it
again. A running study is refused.
"""

from __future__ import annotations

from pathlib import Path

from stageflow.core.config import StudyError
from stageflow.core.study_dir import StudyDir, tree_bytes

KEEP = ("final", "reported", "all")


def final_keys(study: StudyDir) -> set[str]:
    """The checkpoints each finished trial ends with: its path's end and its branches."""
    keys = set()
    for record_file in sorted(study.trials.glob("*.json")) if study.trials.is_dir() else []:
        history = study.read_record(record_file.stem)["history"]
        path = [entry for entry in history if entry["index"] and not entry.get("branch")]
        keys |= {entry["key"] for entry in history if entry.get("branch")}
        keys |= {path[-1]["key"]} if path else set()
    return keys


def prune(run_dir: str | Path, keep: str, dry_run: bool = False) -> tuple[list[Path], int]:
    """The checkpoint folders removed (or that would be, with `dry_run`) and their bytes."""
    study = StudyDir.existing(run_dir)
    if keep not in KEEP:
        raise StudyError(
            str(run_dir), "--keep", f"unknown '{keep}'; expected one of {', '.join(KEEP)}"
        )
    if study.running():
        raise StudyError(
            str(run_dir),
            "study_dir",
            "a driver is running this study; expected a finished or interrupted study",
        )
    cache = study.cache()
    kept = set() if keep == "reported" else final_keys(study)
    removed = [] if keep == "all" else [k for k in cache.checkpoints() if k not in kept]
    freed = sum(tree_bytes(cache.entry(key)) for key in removed)
    if not dry_run:
        for key in removed:
            cache.remove(key)
    return [cache.entry(key) for key in removed], freed
