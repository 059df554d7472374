"""Running a study: validated spec → storage, model and data → Ray actors → trials → MLflow."""

from __future__ import annotations

import os
from pathlib import Path

from stageflow.platform.config import StudySpec
from stageflow.platform.expand import Trial, expand
from stageflow.platform.models import ensure_tiny_model
from stageflow.platform.pipeline import EXECUTORS, TrialContext, run_trial
from stageflow.platform.study_file import StudyError, spec_to_dict, spec_to_yaml
from stageflow.platform.tracking import default_tracking_uri, start_tracker
from stageflow.platform.validate import default_storage_dir


def check_runnable(spec: StudySpec, source: str) -> None:
    """Every stage on a path has an executor (checked before any work starts)."""
    for name in {n for trial in expand(spec) for n in (*trial.path, *trial.unlearning)}:
        kind = spec.stages[name].kind
        if kind not in EXECUTORS:
            raise StudyError(
                source,
                f"stages.{name}.kind",
                f"stage kind '{kind}' cannot run yet; runnable kinds: {', '.join(EXECUTORS)}",
            )


def init_ray() -> None:
    """Connect to RAY_ADDRESS when set, else start an embedded local Ray (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="ERROR",
    )


def run_study(spec: StudySpec, source: str) -> list[tuple[Trial, dict[str, float]]]:
    """Run every trial of a validated study; returns (trial, final metrics) pairs."""
    import ray

    from stageflow.actors.evaluator import Evaluator

    check_runnable(spec, source)
    storage = default_storage_dir(spec).absolute()
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "study.yaml").write_text(spec_to_yaml(spec))
    base_model = (
        Path(spec.model.path).absolute()
        if spec.model.path
        else ensure_tiny_model(storage / "models", spec.model.tiny)
    )

    init_ray()
    uri = spec.tracking.uri or default_tracking_uri(storage)
    tracker = start_tracker(uri, spec.tracking.experiment or spec.name, str(storage / "artifacts"))
    study_run = ray.get(
        tracker.start_run.remote(
            spec.name,
            tags={"stageflow.kind": "study", "stageflow.storage_dir": storage},
            params=spec_to_dict(spec),
        )
    )
    ray.get(tracker.log_text.remote(study_run, spec_to_yaml(spec), "study.yaml"))
    evaluator = ray.remote(num_cpus=spec.resources.cpus_per_actor)(Evaluator).remote()
    ctx = TrialContext(
        spec=spec,
        storage=storage,
        base_model=base_model,
        tracker=tracker,
        study_run_id=study_run,
        evaluator=evaluator,
    )
    results = []
    for trial in expand(spec):
        results.append((trial, run_trial(ctx, trial)))
        print(f"  trial {trial.trial_id}  {trial.ordering}  seed={trial.seed}  done", flush=True)
    ray.get(tracker.end_run.remote(study_run))
    return results
