"""Progress of a study's trials, read from its study directory (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

from stageflow.platform.config import StudySpec
from stageflow.platform.expand import expand, trial_spec
from stageflow.platform.pipeline import child_key
from stageflow.platform.prefix_cache import PrefixCache, digest, model_identity
from stageflow.platform.runner import trial_record
from stageflow.platform.validate import default_storage_dir


def base_model_dir(spec: StudySpec, storage: Path) -> Path:
    return (
        Path(spec.model.path)
        if spec.model.path
        else storage / "models" / f"tiny-{spec.model.tiny.digest()}"
    )


def trial_progress(spec: StudySpec) -> list[list[object]]:
    """[trial id, ordering, seed, 'done' | 'k/n stages' | 'pending'] for every trial."""
    storage = default_storage_dir(spec).absolute()
    cache = PrefixCache(storage / "prefixes")
    base = base_model_dir(spec, storage)
    rows = []
    for trial in expand(spec):
        label = ("oracle " if trial.oracle else "") + trial.ordering
        tspec = trial_spec(spec, trial)
        trained = [n for n in trial.path if tspec.stages[n].kind != "eval"]
        done, key = 0, digest(model_identity(base), trial.seed) if base.is_dir() else None
        for name in trained:
            key = key and child_key(key, tspec.stages[name], tspec)
            if not (key and cache.is_done(key)):
                break
            done += 1
        if trial_record(storage, trial.trial_id).is_file():
            progress = "done"
        else:
            progress = (
                f"{done}/{len(trained) + len(trial.unlearning)} stages" if done else "pending"
            )
        rows.append([trial.trial_id, label, trial.seed, progress])
    return rows
