"""Running a study on Ray Tune: one Tune trial per (path, hyper-parameters, seed).

The driver prepares the study directory (resolved spec, base model, data), starts the shared
actors (the MLflow tracker; with `rollout.placement: shared`, the rollout pool) and runs the
Tune experiment stored under `<study dir>/tune`, which `resume` restores after an
interruption. Each trial's placement group holds the trial, its learner ranks and (per_trial)
its own engines. A trial that loses an actor — its node lost — is retried from its last
finished prefix (Tune's FailureConfig); the shared actors are restartable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray import tune
from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter

from stageflow.actors.dispatch import call_actor
from stageflow.actors.group import START_TIMEOUT_S, Placement
from stageflow.actors.rollout import RolloutGroup
from stageflow.actors.rollout_pool import start_rollout_pool
from stageflow.core.config import StudyError, StudySpec
from stageflow.core.expand import Trial, expand
from stageflow.core.files import read_json, write_atomic, write_json
from stageflow.core.keys import digest
from stageflow.core.models import ensure_tiny_model
from stageflow.core.registry import load_plugins
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import spec_to_dict, spec_to_yaml
from stageflow.platform.engine.pipeline import TrialContext, run_trial
from stageflow.platform.engine.progress import ProgressPrinter
from stageflow.platform.engine.provenance import provenance
from stageflow.platform.engine.search import (
    OrderingSearcher,
    PrefixStopper,
    SearchState,
    log_prefixes,
)
from stageflow.platform.engine.storage_cap import StorageCap
from stageflow.platform.engine.tracking import NAMESPACE, TRACKER_NAME, Tracker, start_tracker
from stageflow.platform.engine.trial_plan import needs_rollout, study_identity, study_planner
from stageflow.platform.engine.workers import Stopwatch, evaluator_bundle, trial_bundles
from stageflow.platform.results.report import (
    read_results,
    study_description,
    trials_table,
    write_analysis,
)

POOL_NAME = "stageflow-rollout"
TRIAL_RETRIES = 3  # a trial that lost an actor (or its node) runs again from its last prefix


def pool_cpus(spec: StudySpec) -> float:
    """CPUs of the shared rollout pool (placement: shared), outside every trial."""
    shared = spec.rollout.placement == "shared" and needs_rollout(spec)
    return spec.rollout.workers * spec.resources.cpus_per_actor if shared else 0.0


def init_ray(spec: StudySpec, verbose: bool = False) -> bool:
    """Connect to RAY_ADDRESS when set, else start an embedded local Ray (on 127.0.0.1 only)
    sized for the study; True when it started the embedded one. `verbose`: the actors' output
    and Ray's info lines reach the terminal."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {
        "namespace": NAMESPACE,
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "ERROR",
    }
    if address:
        problem = unreachable(address)
        if is_loopback(address):
            keep_loopback()
        if problem is None:
            try:
                ray.init(address=address, **options)
                return False
            except (ConnectionError, RuntimeError, ValueError) as err:
                problem = str(err).splitlines()[0]
        raise StudyError(
            "RAY_ADDRESS",
            address,
            f"cannot connect to a Ray cluster there ({problem}); expected the address of a running cluster, e.g. HEAD:6379",
        )
    keep_loopback()
    ray.init(
        address="local",  # a new instance even when another Ray runs on this machine
        num_cpus=embedded_cpus(spec),
        _node_ip_address="127.0.0.1",
        **options,
    )
    return True


def actor_threads(spec: StudySpec, concurrent: int, embedded: bool) -> int | None:
    """Threads per learner rank and engine: `resources.threads_per_actor`; unset, on the
    embedded one-machine Ray the machine's cores shared among the ranks of the trials that run
    at once (a trial's phases take turns: its engine waits while its learner trains), and on a
    cluster None (Ray's default: the actor's CPUs)."""
    if spec.resources.threads_per_actor or not embedded:
        return spec.resources.threads_per_actor
    return max(1, len(os.sched_getaffinity(0)) // (concurrent * spec.learner.ranks))


def keep_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this node's address: by default it rewrites a loopback address
    to the host's network IP (`resolve_ip_for_localhost`), so an embedded Ray would listen on
    the network and a cluster bound to 127.0.0.1 could not be reached."""
    ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rpartition(":")[0]
    return host in ("127.0.0.1", "localhost", "::1")


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


def embedded_cpus(spec: StudySpec) -> int:
    """The CPUs of the embedded local Ray started for a study: the machine's, or what one trial
    and the shared pool need when that is more."""
    need = sum(b["CPU"] for b in trial_bundles(spec)) + pool_cpus(spec)
    return max(os.cpu_count() or 1, int(need + 0.999))


def with_threads(spec: StudySpec, threads: int | None) -> StudySpec:
    return dataclasses.replace(
        spec, resources=dataclasses.replace(spec.resources, threads_per_actor=threads)
    )


def embedded_spec(spec: StudySpec) -> StudySpec:
    """The spec as a run on the embedded local Ray will make its keys (the threads it will
    give each actor), known without starting Ray."""
    concurrent = check_fits_cluster(spec, "", {"CPU": float(embedded_cpus(spec))})
    return with_threads(spec, actor_threads(spec, concurrent, embedded=True))


def check_fits_cluster(spec: StudySpec, source: str, resources: dict | None = None) -> int:
    """How many trials can run at once; a StudyError when not even one fits the cluster
    (`resources`: the cluster's, default the connected Ray's)."""
    if resources is None:
        resources = ray.cluster_resources()
    if spec.rollout.placement == "colocated" and resources.get("GPU", 0) < 1:
        raise StudyError(
            source,
            "rollout.placement",
            "colocated shares a GPU between a learner and its vLLM engine (sleep mode), but the "
            "cluster has no GPU; expected shared or per_trial",
        )
    have = float(resources.get("CPU", 0))
    if pool_cpus(spec) and pool_cpus(spec) >= have:
        raise StudyError(
            source,
            "rollout.workers",
            f"the shared pool's {spec.rollout.workers} engines take {pool_cpus(spec):g} of the cluster's {have:g} CPUs and leave none for a trial; expected fewer engines or a larger cluster",
        )
    per_trial = sum(b["CPU"] for b in trial_bundles(spec))
    free = have - pool_cpus(spec)
    if per_trial > free:
        own = spec.rollout.placement == "per_trial"
        engines = f" + rollout.workers={spec.rollout.workers} own engines" if own else ""
        if evaluator_bundle(spec):
            engines += " + 1 evaluator"
        raise StudyError(
            source,
            "rollout.placement"
            if own and per_trial - spec.rollout.workers <= free
            else "resources",
            f"one trial needs {per_trial:g} CPUs (learner.ranks={spec.learner.ranks}{engines} x resources.cpus_per_actor={spec.resources.cpus_per_actor:g} + 1 for the trial) besides {pool_cpus(spec):g} for shared rollout workers, but the cluster has {have:g}; expected fewer ranks or a larger cluster"
            + (" (or rollout.placement: shared)" if own else ""),
        )
    gpus = sum(b.get("GPU", 0) for b in trial_bundles(spec))
    if gpus > resources.get("GPU", 0):
        raise StudyError(
            source,
            "resources.device",
            f"one trial needs {gpus:g} GPUs (its learner ranks and own engines) but the cluster has {resources.get('GPU', 0):g}; expected fewer ranks or engines, or a larger cluster",
        )
    fit = int(free // per_trial)
    if gpus:
        fit = min(fit, int(resources.get("GPU", 0) // gpus))
    return max(1, min(fit, spec.resources.max_concurrent_trials or fit))


def prepare(spec: StudySpec) -> tuple[StudyDir, Path]:
    """The study directory with the resolved spec, and the base model directory."""
    study = study_directory(spec)
    return study, base_model_dir(spec, study)


def study_directory(spec: StudySpec) -> StudyDir:
    """The study directory, made, with the resolved spec written to it."""
    study = StudyDir.of(spec)
    study.root.mkdir(parents=True, exist_ok=True)
    write_atomic(
        study.spec_file, spec_to_yaml(dataclasses.replace(spec, storage_dir=str(study.root)))
    )
    return study


def base_model_dir(spec: StudySpec, study: StudyDir) -> Path:
    """The model directory the study starts from (the tiny model is built once per study)."""
    if spec.model.path:
        return Path(spec.model.path).absolute()
    return ensure_tiny_model(study.models, spec.model.tiny)


def trainable(config: dict, shared: dict) -> None:
    """Tune's function trainable: one trial's pipeline, results reported after every stage."""
    load_plugins()
    trial = Trial.from_dict(config["trial"])
    study, base_model = StudyDir(Path(shared["storage"])), Path(shared["base_model"])
    planner = study_planner(shared["spec"], study, base_model, identity=shared["identity"])
    record = study.read_record(trial.trial_id)
    if record is not None and record.get("fingerprint") == planner.plan(trial).fingerprint:
        tune.report(record["metrics"])  # finished before an interruption: never re-run
        return
    ctx = TrialContext(
        spec=shared["spec"],
        study=study,
        base_model=base_model,
        planner=planner,
        tracker=ray.get_actor(shared["tracker"], namespace=NAMESPACE),
        study_run_id=shared["study_run_id"],
        pool=ray.get_actor(shared["pool"], namespace=NAMESPACE) if shared["pool"] else None,
    )
    result = run_trial(ctx, trial, report=tune.report)
    study.write_record(trial.trial_id, result)
    tune.report({**result["metrics"], "done": True})


def study_digest(spec: StudySpec, study: StudyDir) -> str:
    """The study's configuration as `study.yaml` holds it (resume reads the same): its MLflow
    study run is one per configuration, the latest holding every current trial."""
    return digest(spec_to_dict(dataclasses.replace(spec, storage_dir=str(study.root))))


def shared_actor_suffix(experiment: str, storage: Path) -> str:
    """The suffix of a study's shared actor names: two studies never share an actor, even
    with the same experiment name on one cluster."""
    return f"{experiment}-{digest(str(storage))[:8]}"


class SharedActors:
    """The study's shared actors, started by the driver and ended with the study."""

    def __init__(self, spec: StudySpec, study: StudyDir):
        """Starts the tracker (its process imports MLflow and opens the store meanwhile)."""
        self.spec, self.suffix = spec, shared_actor_suffix(spec.experiment, study.root)
        self.names = {"tracker": f"{TRACKER_NAME}-{self.suffix}", "pool": None}
        # the driver holds every shared actor's handle (a named actor without one is collected)
        uri = spec.tracking.uri or study.tracking_uri
        self.tracker = start_tracker(
            uri,
            spec.experiment,
            str(study.artifacts),
            self.names["tracker"],
            dict(spec.resources.shared_actor_resources),
        )
        self.engines = self.pool = None
        self.tagged = False  # the engines' backend is on the study run

    def start_engines(self, base_model: Path) -> None:
        """The shared rollout engines on `base_model` and their pool, when the study needs them."""
        spec, pinned = self.spec, dict(self.spec.resources.shared_actor_resources)
        if pool_cpus(spec):
            self.names["pool"] = f"{POOL_NAME}-{self.suffix}"
            resources = spec.resources
            placement = Placement(
                resources.device,
                resources.cpus_per_actor,
                resources=pinned,
                threads=resources.threads_per_actor,
            )
            engine_names = (NAMESPACE, f"{self.names['pool']}-engine")
            # the engines start while the first trials start their learners (EnginesStarted)
            self.engines = RolloutGroup(
                base_model, spec.rollout, placement, 0, engine_names, wait=False
            )
            self.pool = start_rollout_pool(self.engines, self.names["pool"], pinned)

    def tag_engines(self, study_run: str) -> None:
        """Once the shared engines have started: their backend and count on the study run
        (waits for them; a failed start raises its error). Done once."""
        if self.tagged or self.engines is None:
            return
        self.engines.group.started(timeout_s=START_TIMEOUT_S)
        info = self.engines.info()
        tags = {"stageflow.rollout.backend": info[0]["backend"]}
        tags["stageflow.rollout.workers"] = len(info)
        call_actor(self.tracker, Tracker.set_tags, study_run, tags)
        self.tagged = True

    def stop(self) -> None:
        """End the shared actors (the engines shut their engine processes down first)."""
        if self.engines is not None:
            self.engines.shutdown()
        for actor in (self.pool, self.tracker):
            if actor is not None:
                ray.kill(actor, no_restart=True)


class EnginesStarted(Callback):
    """Watches the shared engines start beside the first trials: an engine that fails to
    start ends the study with its error; their backend is tagged on the study run once up.
    Tune saves its callbacks with the experiment: a restored copy holds no handles."""

    def __init__(self, actors: SharedActors, study_run: str):
        self.actors: SharedActors | None = actors
        self.study_run = study_run

    def __getstate__(self) -> dict:
        return {"actors": None, "study_run": self.study_run}

    def on_step_begin(self, iteration, trials, **info):
        actors = self.actors
        if actors is not None and actors.engines is not None and not actors.tagged:
            if actors.engines.group.started():
                actors.tag_engines(self.study_run)


def run_study(
    spec: StudySpec, source: str, resume: bool = False, verbose: bool = False
) -> list[tuple[Trial, dict[str, float]]]:
    """Run (or resume) every trial of a validated study; returns (trial, final metrics) pairs."""

    trials = expand(spec, StudyDir.of(spec).searched_paths())  # a search: those asked so far
    clock = Stopwatch()  # where the driver's time goes: study/timing.json, the study run
    with clock("ray_start"):
        embedded = init_ray(spec, verbose)
    concurrent = check_fits_cluster(spec, source)
    threads = actor_threads(spec, concurrent, embedded)
    spec = with_threads(spec, threads)  # study.yaml holds the threads the keys are made with
    with clock("prepare"):
        study = study_directory(spec)
    running = study.mark_running()  # `stageflow prune` refuses a running study
    study.cache().clear_claims()  # no trial runs now: every claim is stale
    with clock("shared_actors"):
        actors = SharedActors(spec, study)  # the tracker starts while the base model is built
    # the actors end explicitly when the study ends, also when it fails: a traceback kept by
    # the caller would otherwise keep the handles, the engines and their CPUs alive
    try:
        with clock("prepare"):
            base_model = base_model_dir(spec, study)
        with clock("plan"):
            identity = study_identity(study, base_model)
            planner = study_planner(spec, study, base_model, identity=identity)
            plans = {t.trial_id: planner.plan(t) for t in trials}
            current = {trial_id: plan.fingerprint for trial_id, plan in plans.items()}
        stale = study.stale_records(trials, current)
        if stale:
            print(
                f"{len(stale)} finished trials were made by another configuration (study, data, "
                f"model or code); they run again, reusing every checkpoint and evaluation that "
                f"still applies"
            )
        write_json(study.provenance, provenance(threads))
        with clock("shared_actors"):
            actors.start_engines(base_model)
        tracker = actors.tracker
        study_run = call_actor(
            tracker,
            Tracker.start_run,
            spec.name,
            key=f"study:{study.root}:{study_digest(spec, study)}",
            tags={"stageflow.kind": "study", "stageflow.storage_dir": study.root},
            params=spec_to_dict(spec),
        )
        finished = [record["run_id"] for _, record in study.records(trials, current)]
        call_actor(tracker, Tracker.adopt, study_run, finished, str(study.root))
        call_actor(tracker, Tracker.log_text, study_run, spec_to_yaml(spec), "study.yaml")
        made = read_json(study.provenance)
        call_actor(
            tracker, Tracker.log_text, study_run, json.dumps(made, indent=1), "provenance.json"
        )
        git = made.get("git") or {}
        tags = {
            "stageflow.code_version": made["code_version"],
            "stageflow.commit": git.get("commit", "unknown"),
            "stageflow.rollout.placement": spec.rollout.placement,
        }
        call_actor(tracker, Tracker.set_tags, study_run, tags)
        shared = {
            "spec": spec,
            "storage": str(study.root),
            "base_model": str(base_model),
            "identity": identity,
            "current": current,
            **actors.names,
            "study_run_id": study_run,
        }
        progress = ProgressPrinter(trials, search=spec.orderings.search is not None)
        callbacks: list[Callback] = [progress, EnginesStarted(actors, study_run)]
        if spec.storage.max_gb is not None:
            callbacks.append(StorageCap(study, plans, spec.storage.max_gb * 1e9))
        return fit_and_report(spec, trials, shared, concurrent, resume, actors, callbacks, clock)
    finally:
        with clock("shutdown"):
            actors.stop()
        write_json(study.timing, clock.breakdown())
        if running is not None:
            running.close()


def fit_and_report(
    spec: StudySpec,
    trials: list[Trial],
    shared: dict,
    concurrent: int,
    resume: bool,
    actors: SharedActors,
    callbacks: list[Callback],
    clock: Stopwatch,
) -> list[tuple[Trial, dict[str, float]]]:
    """Run the Tune experiment (`callbacks`: the driver's, on every trial result), then log
    the engines' backend, the table, analysis, report and the driver's time breakdown to the
    study run."""
    study, study_run = StudyDir(Path(shared["storage"])), shared["study_run_id"]
    resources = tune.PlacementGroupFactory(trial_bundles(spec))
    fn = tune.with_resources(tune.with_parameters(trainable, shared=shared), resources)
    search = None
    if spec.orderings.search is not None:
        planner = study_planner(
            spec, study, Path(shared["base_model"]), identity=shared["identity"]
        )
        search = SearchState(spec, study, lambda t: planner.plan(t).fingerprint, actors.tracker)
    run_config = tune.RunConfig(
        name=study.tune.name,
        storage_path=str(study.root),
        failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
        callbacks=callbacks,
        stop=PrefixStopper(search) if search else None,
        verbose=0,
    )
    stale = study.stale_records(trials, shared["current"])
    if search is not None:  # a new experiment whose searcher goes on from search.json
        limited = ConcurrencyLimiter(OrderingSearcher(search), max_concurrent=concurrent)
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=limited, num_samples=-1, reuse_actors=True),
            run_config=run_config,
        )
    elif resume and not stale and tune.Tuner.can_restore(str(study.tune)):
        tuner = tune.Tuner.restore(
            str(study.tune), trainable=fn, resume_errored=True, restart_errored=False
        )
    else:
        tuner = tune.Tuner(
            fn,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
            # reused trial actors keep their placement group and learner (platform/engine/workers.py)
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
            run_config=run_config,
        )
    with clock("tune"):
        tuner.fit()
    actors.tag_engines(study_run)  # where no trial's step saw them up (a restored experiment)
    current = shared["current"]
    if search is not None:  # the trials the search ran, without the paths it stopped
        trials = expand(spec, study.searched_paths())
        current = {t.trial_id: search.fingerprint(t) for t in trials}
    with clock("report"):
        if search is not None:
            log_prefixes(study, study.records(trials, current), actors.tracker, study_run)
            call_actor(
                actors.tracker,
                Tracker.log_text,
                study_run,
                study.search_log.read_text(),
                "search/search.json",
            )
        return log_results(spec, trials, study, study_run, actors.tracker, clock, current)


def log_results(
    spec: StudySpec,
    trials: list[Trial],
    study: StudyDir,
    study_run: str,
    tracker: Any,
    clock: Stopwatch,
    current: dict[str, str],
) -> list[tuple[Trial, dict[str, float]]]:
    """The finished trials' table, analysis and report, and the driver's time breakdown so
    far, on the study run; the run ends FINISHED when every trial finished. `current`: each
    trial's plan fingerprint (a record of another plan is not a result of this study)."""

    results = read_results(study, trials, current)
    write_json(study.timing, clock.breakdown())  # until the report (rewritten at the end)
    call_actor(tracker, Tracker.log_text, study_run, trials_table(results) + "\n", "results.md")
    analysis, files = write_analysis(spec, study, trials, current)
    for name, path in files.items():
        folder = str(Path("report", name).parent)
        call_actor(tracker, Tracker.log_artifact, study_run, str(path), folder)
    summary = {
        f"{r['score']}/{r['method']}/{k}": r[k]
        for r in analysis.summary()
        for k in ("spread", "seed_std", "eta2", "p", "p_adjusted")
        if r[k] is not None
    }
    call_actor(tracker, Tracker.log_metrics, study_run, {**summary, **clock.breakdown()})
    description = study_description(analysis, results, files)
    call_actor(tracker, Tracker.set_tags, study_run, {"mlflow.note.content": description})
    status = "FINISHED" if len(results) == len(trials) else "FAILED"
    call_actor(tracker, Tracker.end_run, study_run, status)
    if len(results) != len(trials):
        failed = len(trials) - len(results)
        print(
            f"{failed} of {len(trials)} trials did not finish; see {study.tune} and `stageflow resume {study.root}`"
        )
    return results
