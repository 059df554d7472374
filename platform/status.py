"""Progress of a study's trials, read from its study directory (no Ray, no actors)."""

from __future__ import annotations

from pathlib import Path

from stageflow.platform.config import StudySpec
from stageflow.platform.expand import expand, trial_spec
from stageflow.platform.prefix_cache import base_key, child_key, model_identity
from stageflow.platform.study_dir import StudyDir


def base_model_dir(spec: StudySpec, study: StudyDir) -> Path:
    if spec.model.path:
        return Path(spec.model.path)
    return study.models / f"tiny-{spec.model.tiny.digest()}"


def trial_progress(spec: StudySpec) -> list[list[object]]:
    """[trial id, ordering, seed, 'done' | 'k/n stages' | 'pending'] for every trial."""
    study = StudyDir.of(spec)
    cache = study.cache()
    base = base_model_dir(spec, study)
    identity = model_identity(base) if base.is_dir() else None
    rows = []
    for trial in expand(spec):
        tspec = trial_spec(spec, trial)
        trained = [n for n in trial.path if tspec.stages[n].kind != "eval"]
        done, key = 0, base_key(identity, trial.seed) if identity else None
        for name in trained:
            key = key and child_key(key, tspec.stages[name], tspec)
            if not (key and cache.is_done(key)):
                break
            done += 1
        if study.trial_record(trial.trial_id).is_file():
            progress = "done"
        else:
            progress = (
                f"{done}/{len(trained) + len(trial.unlearning)} stages" if done else "pending"
            )
        rows.append([trial.trial_id, trial.display, trial.seed, progress])
    return rows
