"""Running a study on Ray Tune: one Tune trial per (path, hyper-parameters, seed).

The driver prepares the study directory (resolved spec, base model, data), starts the
shared actors (MLflow tracker, evaluator, rollout service) and runs the Tune experiment
stored under `<study dir>/tune`, which `resume` restores after an interruption.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from stageflow.actors.rollout_service import SERVICE_NAME, start_rollout_service
from stageflow.platform.config import StudySpec
from stageflow.platform.expand import Trial, expand
from stageflow.platform.models import ensure_tiny_model
from stageflow.platform.prefix_cache import PrefixCache, digest, model_identity
from stageflow.platform.registry import METRICS, load_plugins
from stageflow.platform.study_file import StudyError, spec_to_dict, spec_to_yaml
from stageflow.platform.tracking import NAMESPACE, TRACKER_NAME, default_tracking_uri, start_tracker
from stageflow.platform.validate import default_storage_dir

TUNE_DIR = "tune"
STUDY_FILE = "study.yaml"
EVALUATOR_NAME = "stageflow-evaluator"


def needs_rollout(spec: StudySpec) -> bool:
    generation = any(
        METRICS[m].meta["needs"] == "generation"
        for s in spec.evaluation.sets.values()
        for m in s.metrics
    )
    from stageflow.platform.rl import runs_rl_loop

    return generation or any(runs_rl_loop(s) for s in spec.stages.values())


def trial_cpus(spec: StudySpec) -> list[dict[str, float]]:
    """The trial's placement group: bundle 0 runs the trial, one bundle per learner rank."""
    cpus = spec.resources.cpus_per_actor
    return [{"CPU": cpus}] + [{"CPU": cpus} for _ in range(spec.learner.ranks)]


def shared_cpus(spec: StudySpec) -> float:
    return spec.rollout.workers * spec.resources.cpus_per_actor if needs_rollout(spec) else 0.0


def init_ray(spec: StudySpec, source: str) -> None:
    """Connect to RAY_ADDRESS when set, else start an embedded local Ray sized for the study."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {
        "namespace": NAMESPACE,
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": "ERROR",
    }
    if address:
        problem = unreachable(address)
        if problem is None:
            try:
                ray.init(address=address, **options)
                return
            except (ConnectionError, RuntimeError, ValueError) as err:
                problem = str(err).splitlines()[0]
        raise StudyError(
            "RAY_ADDRESS",
            address,
            f"cannot connect to a Ray cluster there ({problem}); expected the address of a running cluster, e.g. HEAD:6379",
        )
    need = sum(b["CPU"] for b in trial_cpus(spec)) + shared_cpus(spec)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), **options)


def unreachable(address: str) -> str | None:
    """Why nothing listens at a Ray address (checked in seconds, before Ray retries for minutes)."""
    if address == "auto":
        return None
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def check_fits_cluster(spec: StudySpec, source: str) -> int:
    """How many trials can run at once; a StudyError when not even one fits the cluster."""
    import ray

    have = float(ray.cluster_resources().get("CPU", 0))
    per_trial = sum(b["CPU"] for b in trial_cpus(spec))
    free = have - shared_cpus(spec)
    if per_trial > free:
        raise StudyError(
            source,
            "resources",
            f"one trial needs {per_trial:g} CPUs (learner.ranks={spec.learner.ranks} x resources.cpus_per_actor={spec.resources.cpus_per_actor:g} + 1 for the trial) besides {shared_cpus(spec):g} for rollout workers, but the cluster has {have:g}; expected fewer ranks or a larger cluster",
        )
    fit = int(free // per_trial)
    return max(1, min(fit, spec.resources.max_concurrent_trials or fit))


def prepare(spec: StudySpec) -> tuple[Path, Path]:
    """The study directory with the resolved spec, and the base model directory."""
    storage = default_storage_dir(spec).absolute()
    storage.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(spec, storage_dir=str(storage))
    (storage / STUDY_FILE).write_text(spec_to_yaml(resolved))
    base = (
        Path(spec.model.path).absolute()
        if spec.model.path
        else ensure_tiny_model(storage / "models", spec.model.tiny)
    )
    return storage, base


def trial_record(storage: Path, trial_id: str) -> Path:
    return storage / "trials" / f"{trial_id}.json"


def read_records(storage: Path, trials: list[Trial]) -> list[tuple[Trial, dict]]:
    """The records of the finished trials, in the study's trial order."""
    out = []
    for trial in trials:
        path = trial_record(storage, trial.trial_id)
        if path.is_file():
            out.append((trial, json.loads(path.read_text())))
    return out


def read_results(storage: Path, trials: list[Trial]) -> list[tuple[Trial, dict[str, float]]]:
    return [(trial, record["metrics"]) for trial, record in read_records(storage, trials)]


def write_analysis(spec: StudySpec, storage: Path, trials: list[Trial]):
    """The path-dependence analysis and its report files under `<study dir>/report`."""
    from stageflow.platform.analysis import Analysis
    from stageflow.platform.report import study_report

    analysis = Analysis(spec, storage, read_records(storage, trials))
    return analysis, study_report(analysis, storage / "report")


def trainable(config: dict) -> None:
    """Tune's function trainable: one trial's pipeline, results reported after every stage."""
    import ray
    from ray import tune

    from stageflow.platform.pipeline import TrialContext, run_trial

    load_plugins()
    shared, trial = config["shared"], Trial.from_dict(config["trial"])
    storage = Path(shared["storage"])
    record = trial_record(storage, trial.trial_id)
    if record.is_file():  # finished before an interruption: report, never re-run
        tune.report(json.loads(record.read_text())["metrics"])
        return
    spec = shared["spec"]
    ctx = TrialContext(
        spec=spec,
        storage=storage,
        base_model=Path(shared["base_model"]),
        base_key=shared["base_key"],
        tracker=ray.get_actor(shared["tracker"], namespace=NAMESPACE),
        study_run_id=shared["study_run_id"],
        evaluator=ray.get_actor(shared["evaluator"], namespace=NAMESPACE),
        rollout=ray.get_actor(shared["rollout"], namespace=NAMESPACE)
        if shared["rollout"]
        else None,
    )
    result = run_trial(ctx, trial, report=tune.report)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, sort_keys=True))
    tmp.replace(record)
    tune.report({**result["metrics"], "done": True})


def shared_actor_suffix(experiment: str, storage: Path) -> str:
    """The suffix of a study's shared actor names: two studies never share an actor, even
    with the same experiment name on one cluster."""
    return f"{experiment}-{digest(str(storage))[:8]}"


def run_study(
    spec: StudySpec, source: str, resume: bool = False
) -> list[tuple[Trial, dict[str, float]]]:
    """Run (or resume) every trial of a validated study; returns (trial, final metrics) pairs."""
    import ray

    from stageflow.actors.evaluator import Evaluator

    trials = expand(spec)
    init_ray(spec, source)
    concurrent = check_fits_cluster(spec, source)
    storage, base_model = prepare(spec)
    PrefixCache(storage / "prefixes").clear_claims()  # no trial runs now: every claim is stale

    experiment = spec.tracking.experiment or spec.name
    uri = spec.tracking.uri or default_tracking_uri(storage)
    suffix = shared_actor_suffix(experiment, storage)
    names = {
        "tracker": f"{TRACKER_NAME}-{suffix}",
        "evaluator": f"{EVALUATOR_NAME}-{suffix}",
        "rollout": f"{SERVICE_NAME}-{suffix}" if needs_rollout(spec) else None,
    }
    # the driver holds every shared actor's handle (a named actor without one is collected)
    # and ends them explicitly when the study ends, also when it fails: a traceback kept by
    # the caller would otherwise keep the handles, the engines and their CPUs alive
    tracker = start_tracker(uri, experiment, str(storage / "artifacts"), names["tracker"])
    evaluator = ray.remote(num_cpus=0)(Evaluator)
    evaluator = evaluator.options(
        name=names["evaluator"], namespace=NAMESPACE, get_if_exists=True
    ).remote()
    service = None
    try:
        study_run = ray.get(
            tracker.find_run.remote(kind="study", storage_dir=str(storage))
        ) or ray.get(
            tracker.start_run.remote(
                spec.name,
                tags={"stageflow.kind": "study", "stageflow.storage_dir": storage},
                params=spec_to_dict(spec),
            )
        )
        ray.get(tracker.log_text.remote(study_run, spec_to_yaml(spec), "study.yaml"))
        if names["rollout"]:
            service = start_rollout_service(
                base_model,
                spec.rollout,
                spec.resources.device,
                spec.resources.cpus_per_actor,
                names["rollout"],
            )
            info = ray.get(service.info.remote())
            tags = {
                "stageflow.rollout.backend": info[0].get("backend"),
                "stageflow.rollout.workers": len(info),
            }
            ray.get(tracker.set_tags.remote(study_run, tags))
        shared = {
            "spec": spec,
            "storage": str(storage),
            "base_model": str(base_model),
            "base_key": model_identity(base_model),
            **names,
            "study_run_id": study_run,
        }
        return fit_and_report(spec, trials, shared, concurrent, resume, tracker)
    finally:
        stop_shared_actors(tracker, evaluator, service)


def fit_and_report(
    spec: StudySpec, trials: list[Trial], shared: dict, concurrent: int, resume: bool, tracker
) -> list[tuple[Trial, dict[str, float]]]:
    """Run the Tune experiment, then log the table, analysis and report to the study run."""
    import ray
    from ray import tune

    from stageflow.platform.progress import ProgressPrinter
    from stageflow.platform.report import trials_table

    storage, study_run = Path(shared["storage"]), shared["study_run_id"]
    resources = tune.PlacementGroupFactory(trial_cpus(spec))
    fn = tune.with_resources(tune.with_parameters(trainable_entry, shared=shared), resources)
    tune_path = storage / TUNE_DIR
    run_config = tune.RunConfig(
        name=TUNE_DIR,
        storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=2),
        callbacks=[ProgressPrinter(len(trials))],
        verbose=0,
    )
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(
            str(tune_path), trainable=fn, resume_errored=True, restart_errored=False
        )
    else:
        tuner = tune.Tuner(
            fn,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=run_config,
        )
    tuner.fit()
    results = read_results(storage, trials)
    ray.get(tracker.log_text.remote(study_run, trials_table(results) + "\n", "results.md"))
    analysis, files = write_analysis(spec, storage, trials)
    for name, path in files.items():
        folder = str(Path("report", name).parent)
        ray.get(tracker.log_artifact.remote(study_run, str(path), folder))
    summary = {
        f"{r['score']}/{r['method']}/{k}": r[k]
        for r in analysis.summary()
        for k in ("spread", "seed_std")
    }
    ray.get(tracker.log_metrics.remote(study_run, summary))
    status = "FINISHED" if len(results) == len(trials) else "FAILED"
    ray.get(tracker.end_run.remote(study_run, status))
    if len(results) != len(trials):
        failed = len(trials) - len(results)
        print(
            f"{failed} of {len(trials)} trials did not finish; see {tune_path} and `stageflow resume {storage}`"
        )
    return results


def stop_shared_actors(tracker, evaluator, service) -> None:
    """End the study's shared actors; the rollout service first shuts its engines down."""
    import ray

    if service is not None:
        try:
            ray.get(service.shutdown.remote(), timeout=120)
        except Exception:  # the actors are killed below either way
            pass
    for actor in (service, evaluator, tracker):
        if actor is not None:
            ray.kill(actor, no_restart=True)


def trainable_entry(config: dict, shared: dict) -> None:
    trainable({**config, "shared": shared})
