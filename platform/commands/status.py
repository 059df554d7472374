"""Progress of a study's trials, read from its study directory (no Ray, no actors).

Each trial's plan (platform/engine/trial_plan.py) is compared with what the study directory holds:
a record made by the same plan is done, a record made by another plan (the study, its data,
the model or the code changed) is stale and its trial runs again; the checkpoints and
evaluations whose keys the plans name and the cache lacks are what a run will compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from stageflow.core.config import StudySpec
from stageflow.core.expand import expand
from stageflow.core.study_dir import StudyDir
from stageflow.platform.engine.trial_plan import base_model_dir, study_planner


@dataclass
class StudyStatus:
    rows: list[list[object]]  # [trial id, ordering, seed, progress]
    done: int
    trainings_left: int  # distinct stage trainings a run will do
    evaluations_left: int  # distinct evaluation-set results a run will compute


def study_status(spec: StudySpec) -> StudyStatus:
    study = StudyDir.of(spec)
    cache, trials = study.cache(), expand(spec, study.searched_paths())
    base = base_model_dir(spec, study)
    if not base.is_dir():  # nothing ran yet (the tiny model is built by the first run)
        rows = [[t.trial_id, t.display, t.seed, "pending"] for t in trials]
        return StudyStatus(rows, 0, -1, -1)
    planner = study_planner(spec, study, base, write=False)
    rows, done, trainings, evaluations = [], 0, set(), set()
    for trial in trials:
        plan = planner.plan(trial)
        record = study.read_record(trial.trial_id)
        trained = plan.trained
        cached = 0
        for step in trained:
            if step.branch or not cache.is_done(step.key):
                break
            cached += 1
        if record is not None and record.get("fingerprint") == plan.fingerprint:
            progress = "done"
            done += 1
        else:
            trainings.update(s.key for s in trained if not cache.is_done(s.key))
            keys = [*plan.base_evals.values(), *(k for s in plan.steps for k in s.evals.values())]
            evaluations.update(k for k in keys if cache.read_eval(k) is None)
            progress = f"{cached}/{len(trained)} stages" if cached else "pending"
            if record is not None:
                progress = f"changed, runs again ({progress} still valid)"
        rows.append([trial.trial_id, trial.display, trial.seed, progress])
    return StudyStatus(rows, done, len(trainings), len(evaluations))
