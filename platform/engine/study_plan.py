"""What a study will do, take and cost before it runs (`stageflow plan`).

**Work**: the trials' plans (platform/engine/trial_plan.py), each distinct stage training and
evaluation once, as the prefix cache will share them. A study not yet run has no base model
to digest, so its keys are made with a stand-in identity: other keys than a run's, the same
sharing (every key of a study descends from the one identity).

**Time**: unit costs measured on a finished study (`measured_costs`): the driver's fixed time
(Ray, the shared engines and tracker, the report), each training's fixed part and its step
time (per stage signature: objective, batch, data, model, learner; an RL stage's rollout
too), evaluation seconds per example scored and per token generated, and each trial's own
overhead (the first trial's learner start apart: later trials keep it). The costs come from
an earlier study in the same storage that trained every stage signature the study has, else
from a calibration run (`calibrate`): two trials of the study with at most
`CALIBRATION_STEPS` steps a stage, in a temporary directory.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray

from stageflow.actors.batch_plan import stage_steps
from stageflow.core.config import OrderingSpec, StageSpec, StorageSpec, StudySpec, TrackingSpec
from stageflow.core.expand import Trial, apply_hparams, expand, trial_spec
from stageflow.core.files import read_json
from stageflow.core.keys import digest
from stageflow.core.models import has_chat_template
from stageflow.core.registry import METRICS, OBJECTIVES, objective_of, stage_objective
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import load_study
from stageflow.platform.engine.runner import check_fits_cluster, embedded_cpus, run_study
from stageflow.platform.engine.search import budget_paths
from stageflow.platform.engine.storage_cap import kept_keys
from stageflow.platform.engine.trial_plan import (
    PlannedStep,
    Planner,
    in_memory_rows,
)

STAND_IN = "planned"  # the model and code identity of a study's keys before it runs
CALIBRATION_STEPS = 4


def planned_steps(stage: StageSpec, rows: int) -> int:
    """The optimizer steps a stage takes over `rows` examples (as the learner and RL loop count)."""
    loop = stage_objective(stage).loop
    per_step = stage.batch_size
    if loop is not None:
        per_step = loop.prompts_per_step or stage.batch_size
    return stage_steps(stage.steps, stage.epochs, per_step, rows)


def signature(spec: StudySpec, stage: StageSpec) -> str:
    """What a stage's step time depends on: objective, batch, data, model, learner (and for an
    RL stage its parameters and the engines); not its steps, rate or seed."""
    entry = OBJECTIVES[objective_of(stage)]
    data = stage.data.file or stage.data.task
    retain = stage.retain.file or stage.retain.task if stage.retain is not None else None
    rl = (stage.params, dataclasses.asdict(spec.rollout)) if entry.rl_loop else None
    parts = (objective_of(stage), stage.batch_size, stage.max_len, data, retain, rl)
    return digest(parts, dataclasses.asdict(spec.model), dataclasses.asdict(spec.learner))


@dataclass(frozen=True)
class Work:
    """A study's trials and the distinct work they do."""

    trials: list[Trial]
    trainings: dict[str, PlannedStep]  # checkpoint key -> the step that trains it first
    steps: dict[str, int]  # checkpoint key -> its optimizer steps
    signatures: dict[str, str]  # checkpoint key -> its stage signature
    evaluations: dict[str, str]  # evaluation key -> the set it scores
    stage_runs: int  # trained stages over every trial, before sharing
    kept: set[str]  # path ends and unlearning branches (`prune --keep final`)
    units: dict[str, tuple[int, int]]  # set -> (examples scored, tokens generated)


def stand_in_planner(spec: StudySpec) -> Planner:
    """A planner whose keys are made with the stand-in identity (rows read in memory)."""
    chat = spec.model.path is not None and has_chat_template(spec.model.path)
    return Planner(spec, in_memory_rows, STAND_IN, STAND_IN, chat)


def planned_work(spec: StudySpec) -> Work:
    """The work of a study that may not have run (keys made with a stand-in identity)."""
    planner = stand_in_planner(spec)
    trials = expand(spec, budget_paths(spec) if spec.orderings.search else None)
    plans = [planner.plan(trial) for trial in trials]
    trainings, steps, signatures, evaluations, runs = {}, {}, {}, {}, 0
    for plan in plans:
        evaluations.update({key: name for name, key in plan.base_evals.items()})
        for step in plan.steps:
            evaluations.update({key: name for name, key in step.evals.items()})
            if not step.trains:
                continue
            runs += 1
            if step.key not in trainings:
                trainings[step.key] = step
                rows = len(planner.rows(step.stage.data))
                steps[step.key] = planned_steps(step.stage, rows)
                signatures[step.key] = signature(plan.spec, step.stage)
    units = eval_units(spec, planner)
    return Work(trials, trainings, steps, signatures, evaluations, runs, kept_keys(plans), units)


def eval_units(spec: StudySpec, planner: Planner) -> dict[str, tuple[int, int]]:
    """{set: (examples scored, tokens generated)} of one evaluation of each set."""
    units = {}
    for name, eval_set in spec.evaluation.sets.items():
        examples = len(planner.rows(eval_set.data)[: eval_set.max_examples])
        needs = {METRICS[m].needs for m in eval_set.metrics}
        tokens = examples * eval_set.samples * eval_set.max_new_tokens
        units[name] = (examples if "loglik" in needs else 0, tokens if "generation" in needs else 0)
    return units


def concurrency(spec: StudySpec) -> int:
    """The trials that run at once on this machine's embedded Ray."""
    return check_fits_cluster(spec, "", {"CPU": float(embedded_cpus(spec))})


@dataclass(frozen=True)
class Estimate:
    fixed_s: float  # the driver: Ray, shared engines and tracker, report, shutdown
    first_trial_s: float  # the first trial's extra start (its learner)
    trials_s: float  # every trial's own overhead
    training_s: float
    evaluation_s: float
    concurrent: int

    @property
    def wall_s(self) -> float:
        work = self.trials_s + self.training_s + self.evaluation_s
        return self.fixed_s + self.first_trial_s + work / self.concurrent


@dataclass(frozen=True)
class UnitCosts:
    source: str  # where the costs were measured, in words
    fixed_s: float
    first_trial_s: float
    per_trial_s: float
    per_training_s: dict[str, float]  # signature -> a training's fixed part
    per_step_s: dict[str, float]  # signature -> one more step
    per_example_s: float | None  # log-likelihood evaluation, per example scored
    per_token_s: float | None  # generation evaluation, per token generated

    def missing(self, work: Work) -> str | None:
        """What `work` needs that these costs lack, in words; None when they cover it."""
        stages = {work.trainings[k].name for k, s in work.signatures.items()
                  if s not in self.per_step_s}  # fmt: skip
        if stages:
            return f"no timing of a stage like {', '.join(sorted(stages))}"
        if self.per_example_s is None and any(u[0] for u in work.units.values()):
            return "no timing of a log-likelihood evaluation"
        if self.per_token_s is None and any(u[1] for u in work.units.values()):
            return "no timing of a generation evaluation"
        return None

    def estimate(self, work: Work, concurrent: int) -> Estimate:
        training = sum(
            self.per_training_s[sig] + (work.steps[key] - 1) * self.per_step_s[sig]
            for key, sig in work.signatures.items()
        )
        examples = sum(work.units[name][0] for name in work.evaluations.values())
        tokens = sum(work.units[name][1] for name in work.evaluations.values())
        evaluation = examples * (self.per_example_s or 0) + tokens * (self.per_token_s or 0)
        trials = len(work.trials) * self.per_trial_s
        return Estimate(self.fixed_s, self.first_trial_s, trials, training, evaluation, concurrent)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def measured_costs(root: Path, source: str | None = None) -> UnitCosts | None:
    """The unit costs of the finished study in `root`, or None when it holds no timed run.
    Read from its trial records (which checkpoint and evaluation each stage made) and the
    checkpoints' metas, so a study made by another code version serves as well."""
    study = StudyDir(root)
    timing = read_json(study.timing) or {}
    if "time/tune_s" not in timing or not study.spec_file.is_file():
        return None
    spec = load_study(study.spec_file)
    found = [
        (t, r)
        for t, r in study.records(expand(spec, study.searched_paths()), None)
        if "timing" in r
    ]
    if not found:
        return None
    records = [r for _, r in found]
    cache = study.cache()
    per_sig: dict[str, list[tuple[float, list[float]]]] = {}
    trained, evaluated = set(), {}
    for trial, record in found:
        own_spec = trial_spec(spec, trial)
        for entry in record["history"]:
            evaluated.update({key: name for name, key in entry.get("evals", {}).items()})
            stage = own_spec.stages.get(entry["stage"])
            key = entry["key"]
            if stage is None or stage.kind == "eval" or key in trained or not cache.is_done(key):
                continue
            trained.add(key)
            meta = cache.meta(key)
            seconds = (meta["train_end_ms"] - meta["train_start_ms"]) / 1000
            per_sig.setdefault(signature(own_spec, stage), []).append(
                (seconds, [s["step_time_s"] for s in meta["step_metrics"]])
            )
    units = eval_units(spec, stand_in_planner(spec))
    computed = [name for key, name in evaluated.items() if cache.read_eval(key) is not None]
    examples = sum(units[name][0] for name in computed)
    tokens = sum(units[name][1] for name in computed)
    per_step, per_training = {}, {}
    for sig, runs in per_sig.items():
        per_step[sig] = mean([t for _, times in runs for t in times[1:]] or [runs[0][0]])
        per_training[sig] = mean([s - (len(t) - 1) * per_step[sig] for s, t in runs])

    def total(phase: str) -> float:
        return sum(r["timing"].get(f"time/{phase}_s", 0.0) for r in records)

    overheads = [  # each trial's time outside training, evaluation and waiting
        r["timing"]["time/wall_s"]
        - sum(r["timing"].get(f"time/{p}_s", 0.0)
              for p in ("train", "rl_stage", "eval_loglik", "eval_generation", "wait_prefix"))
        for r in records
    ]  # fmt: skip
    overheads.sort()  # the largest: the first trial's, which started the learner
    later = median(overheads[:-1]) if len(overheads) > 1 else overheads[0]
    tune_own = max(0.0, timing["time/tune_s"] - total("wall") / concurrency(spec)) / len(records)
    return UnitCosts(
        source=source or f"the timings of the study in {root}",
        fixed_s=timing["time/wall_s"] - timing["time/tune_s"],
        first_trial_s=overheads[-1] - later,
        per_trial_s=later + tune_own,
        per_training_s=per_training,
        per_step_s=per_step,
        per_example_s=total("eval_loglik") / examples if examples else None,
        per_token_s=total("eval_generation") / tokens if tokens else None,
    )


def earlier_costs(spec: StudySpec, work: Work) -> UnitCosts | None:
    """The costs of the most recent finished study in the same storage (the study's own
    directory first, then its siblings) that covers every stage of `work`."""
    root = StudyDir.of(spec).root
    siblings = (
        [p for p in root.parent.iterdir() if p.is_dir() and p != root]
        if root.parent.is_dir()
        else []
    )
    candidates = [root] + sorted(
        (p for p in siblings if StudyDir(p).timing.is_file()),
        key=lambda p: StudyDir(p).timing.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        costs = measured_costs(candidate)
        if costs is not None and costs.missing(work) is None:
            return costs
    return None


def calibration_spec(spec: StudySpec, storage: Path) -> StudySpec:
    """Two trials of the study (two orderings of its first seed, else two seeds of its first
    ordering), every stage cut to at most CALIBRATION_STEPS steps, stored in `storage`."""
    trials = [t for t in expand(spec) if not t.oracle]
    first = trials[0]
    alike = [t for t in trials if t.hparams == first.hparams]
    picked = [t for t in alike if t.seed == first.seed][:2]
    if len(picked) < 2:
        picked = [t for t in alike if t.path == first.path][:2]
    spec = apply_hparams(spec, first.hparams)
    rows = stand_in_planner(spec)
    stages = {
        name: stage if stage.kind == "eval" else dataclasses.replace(
            stage, epochs=None, warmup_steps=0,
            steps=min(CALIBRATION_STEPS, planned_steps(stage, len(rows.rows(stage.data)))),
        )
        for name, stage in spec.stages.items()
    }  # fmt: skip
    paths = list(dict.fromkeys(">".join(t.path) for t in picked))
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-calibration",
        storage_dir=str(storage),
        storage=StorageSpec(),
        stages=stages,
        orderings=OrderingSpec(explicit=paths),
        seeds=sorted({t.seed for t in picked}),
        grid={},
        oracle=False,
        tracking=TrackingSpec(),
    )


def calibrate(spec: StudySpec, source: str) -> UnitCosts:
    """Unit costs measured by running `calibration_spec` (on this machine's embedded Ray, or
    the cluster at RAY_ADDRESS) in a temporary directory, removed after."""
    storage = Path(tempfile.mkdtemp(prefix="stageflow-calibration-"))
    started = not ray.is_initialized()
    try:
        small = calibration_spec(spec, storage / "study")
        run_study(small, source)
        how = f"{len(expand(small))} trials, at most {CALIBRATION_STEPS} steps a stage"
        costs = measured_costs(storage / "study", f"a calibration run ({how})")
        if costs is None:
            raise RuntimeError(f"the calibration run in {storage} finished no trial")
        return costs
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
