"""One trial's pipeline: its stages in order through the prefix cache, evaluation after
each, the unlearning branches at the end, everything logged to MLflow.

Each stage is run by its kind (`platform/engine/stages.py`). A stage whose prefix is already finished
(by this or another trial) is not trained again: its checkpoint is reused and the trial run
links the stage run that trained it with a tag. The trial walks its plan (platform/
trial_plan.py): every checkpoint and every evaluation set's result has a key covering all that
made it, so an evaluation whose set changed is computed again on the cached checkpoint. A
trained prefix is evaluated on the weights the learner holds, before its checkpoint is
committed. With `evaluation.placement: evaluators` the checkpoint is committed first and the
trial's evaluator scores it on a thread beside the trial's own, while the learner trains the
next stage; the trial logs and reports every evaluation in the path's order as it comes in
(`evaluations` returns a Future either way). Where the trial's time went is logged as
`time/<phase>_s`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stageflow.actors.dispatch import call_actor
from stageflow.actors.metrics import harmonic_mean
from stageflow.actors.weight_sync import Weights
from stageflow.core.config import StudySpec
from stageflow.core.expand import Trial
from stageflow.core.keys import digest
from stageflow.core.membership import reference_auc
from stageflow.core.prefix_cache import Claim, PrefixCache
from stageflow.core.registry import STAGE_KINDS, trains_assistant
from stageflow.core.study_dir import StudyDir
from stageflow.platform.engine.evaluation import EvalJob, evaluate
from stageflow.platform.engine.rl import rl_summary, stage_reward_range
from stageflow.platform.engine.stages import Point, StageStep, TrainingLoop
from stageflow.platform.engine.tracking import Tracker, now_ms
from stageflow.platform.engine.trial_plan import PlannedStep, Planner, TrialPlan
from stageflow.platform.engine.workers import Stopwatch, TrialWorkers


@dataclass
class TrialContext:
    """What every trial of a study shares: its spec, files, planner and the shared actors."""

    spec: StudySpec
    study: StudyDir
    base_model: Path
    planner: Planner
    tracker: Any
    study_run_id: str
    pool: Any = None  # the shared rollout pool (placement: shared), when the study needs one

    def rows(self, data) -> list[dict]:
        """The rows of a data spec, rendered for the model (the rows its keys digest)."""
        return self.planner.rows(data)

    def eval_jobs(self, spec: StudySpec, names: list[str], seed: int) -> list[EvalJob]:
        sets = spec.evaluation.sets
        return [
            EvalJob(
                name=name,
                rows=self.rows(s.data)[: s.max_examples],
                holdout=self.rows(sets[s.holdout].data)[: sets[s.holdout].max_examples]
                if s.holdout
                else [],
                min_k=s.min_k,
                metrics=list(s.metrics),
                task=s.data.task,
                samples=s.samples,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                seed=seed,
                truth_ratios=name == spec.analysis.forget_quality,
            )
            for name, s in spec.evaluation.sets.items()
            if name in names
        ]


def settled(value: dict[str, float]) -> Future:
    """A Future that already holds `value` (an evaluation made on the trial's own thread)."""
    future: Future = Future()
    future.set_result(value)
    return future


def on_learner(stage) -> bool:
    """Whether a stage's model is scored by the learner whatever the placement: a ULD model
    (two models' logits) lives on the learner that trained it."""
    return stage is not None and trains_assistant(stage)


def step_time_split(steps: list[dict[str, float]]) -> dict[str, float]:
    """Where a stage's training time went, from its per-step metrics."""
    out = {"optimizer_steps": 0.0, "rl_generation": 0.0, "weight_sync": 0.0}
    for row in steps:
        out["optimizer_steps"] += row.get("learn_s", row.get("step_time_s", 0.0))
        out["rl_generation"] += row.get("gen_s", 0.0)
        out["weight_sync"] += row.get("sync_s", 0.0)
    return out


class TrialRunner:
    """Runs one trial along its plan; holds its actors (`TrialWorkers`), its MLflow run and its
    time breakdown."""

    def __init__(
        self, ctx: TrialContext, trial: Trial, report: Callable[[dict], None] | None = None
    ):
        self.ctx, self.trial = ctx, trial
        self.plan: TrialPlan = ctx.planner.plan(trial)
        self.spec = self.plan.spec
        self.cache: PrefixCache = ctx.study.cache()
        self.report = report or (lambda metrics: None)
        self.clock = Stopwatch()
        self.workers = TrialWorkers(
            self.spec, ctx.base_model, trial.seed, trial.trial_id, ctx.pool, self.clock
        )
        self.trained = 0
        self.history: list[dict[str, Any]] = []  # per stage: index, keys, metrics
        self.final: dict[str, float] = {}
        # evaluation.placement: evaluators: the evaluations run here, one at a time, in order
        self.beside = None
        if self.spec.evaluation.placement == "evaluators":
            self.beside = ThreadPoolExecutor(1, thread_name_prefix=f"evaluations-{trial.trial_id}")
        self.pending: list[tuple[dict[str, Any], Future, PlannedStep | None]] = []
        self.pending_runs: list[Future] = []  # stage runs ended once their evaluation is in

    # ----- tracking ---------------------------------------------------------------------------
    def track(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`method` of the study's `Tracker` actor, waited for."""
        with self.clock("tracking"):
            return call_actor(self.ctx.tracker, method, *args, **kwargs)

    def log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.track(Tracker.log_metrics, run_id, metrics, step, now_ms())

    def tag(self, tags: dict[str, Any]) -> None:
        self.track(Tracker.set_tags, self.run_id, tags)

    # ----- the path ---------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        trial, ctx = self.trial, self.ctx
        self.run_id = self.track(
            Tracker.start_run,
            trial.label,
            key=f"trial:{trial.trial_id}:{self.plan.fingerprint}",
            parent_id=ctx.study_run_id,
            tags={
                "stageflow.kind": "trial",
                "stageflow.trial_id": trial.trial_id,
                "stageflow.fingerprint": self.plan.fingerprint,
                "stageflow.ordering": trial.ordering,
                "stageflow.oracle": trial.oracle,
            },
            params={
                "path": trial.ordering,
                "seed": trial.seed,
                "oracle": trial.oracle,
                "unlearning": ",".join(trial.unlearning),
                **trial.hparams,
            },
            description=trial.description,
        )
        finished = False
        try:
            final = self._run_path()
            finished = True
        except BaseException:
            self.track(Tracker.end_run, self.run_id, "FAILED")
            raise
        finally:
            if self.beside is not None:  # nothing scores or writes after the trial's actors end
                self.beside.shutdown(wait=True, cancel_futures=True)
            with self.clock("shutdown"):
                self.workers.close(keep_learner=finished)
        done = len(trial.path) + 1
        self.log(self.run_id, {"stages_trained": self.trained, **self.clock.breakdown()}, done)
        self.track(Tracker.end_run, self.run_id)
        return final

    def _run_path(self) -> dict[str, float]:
        plan = self.plan
        point = Point(plan.base, self.ctx.base_model)
        base = {"index": 0, "stage": "base", "key": plan.base, "evals": plan.base_evals}
        self.pending.append(
            (base, self.evaluations(point, plan.base_evals, plan.base_eval_seed), None)
        )
        end = point  # the path's end so far; every unlearning branch starts from the last
        for step in plan.steps:
            after, metrics = STAGE_KINDS[step.stage.kind].run(self, StageStep(step, end))
            entry = {"index": step.index, "stage": step.name, "key": after.key, "evals": step.evals}
            self.pending.append(({**entry, "branch": step.branch}, metrics, step))
            if not step.branch:
                end = after
            self._settle(wait=False)
        with self.clock("wait_evaluations"):
            self._settle(wait=True)
            for future in self.pending_runs:
                future.result()
        return self.final

    def _settle(self, wait: bool) -> None:
        """Log and report the evaluations that are in, in the path's order (all of them, waited
        for, with `wait`): the trial run's metrics at the stage's index, its history, Tune."""
        for future in [f for f in self.pending_runs if f.done()]:
            future.result()  # a stage run's evaluation that failed ends the trial now
        while self.pending and (wait or self.pending[0][1].done()):
            entry, future, step = self.pending.pop(0)
            metrics = future.result()
            self.history.append({**entry, "metrics": metrics})
            if step is None:  # the base model
                self.log(self.run_id, metrics, 0)
                self.final = dict(metrics)
                continue
            if step.branch:
                metrics = {f"{step.name}/{k}": v for k, v in metrics.items()}
            self.log(self.run_id, metrics, step.index)
            self.final.update(metrics)
            self.report({"stage_index": step.index, "stage": step.name, **metrics})

    # ----- evaluation -------------------------------------------------------------------------
    def evaluate(self, point: Point, names: list[str], seed: int, learner: bool) -> dict[str, dict]:
        """Evaluate `point` on the sets `names` with the trial's actors: the learner holding its
        weights (`learner`), else the evaluator holding its committed checkpoint; {set name:
        {"metrics": ..., "examples": ...}}."""
        jobs = self.ctx.eval_jobs(self.spec, names, seed=seed)
        generates = any(job.needs("generation") for job in jobs)
        weights = None
        if learner:
            scorer = self.workers.learner_at(point.key, point.model_dir)
            # a ULD model's completions: transformers on the learner (`generation: hf`)
            combined = generates and scorer.holds_combined()
            if generates and not combined:
                weights = self.workers.weights(point.key, point.model_dir)
        else:
            scorer, combined = self.workers.evaluator_at(point.key, point.model_dir), False
            weights = Weights.of_dir(point.model_dir, tag=point.key)

        def generate(prompts: list[str], **sampling: Any) -> dict:
            if combined:
                with self.clock("eval_generation"):
                    return {"texts": scorer.sample_combined(prompts, **sampling)}
            return self.workers.generate(prompts, weights, **sampling)

        def answer_stats(items: list[dict], standardized: bool) -> list:
            with self.clock("eval_loglik"):
                return scorer.answer_stats(items, standardized)

        def grad_norms(items: list[dict]) -> list[float]:
            with self.clock("eval_gradnorm"):
                return scorer.grad_norms(items)

        return split_by_set(evaluate(jobs, answer_stats, generate, grad_norms), names)

    def evaluations(
        self,
        point: Point,
        evals: dict[str, str],
        seed: int,
        extra: dict[str, float] | None = None,
        stage: Any = None,
    ) -> Future:
        """The metrics of the sets `evals` names ({set: evaluation key}) on `point`, with
        `extra` added: computed on this thread by the learner, or (evaluation.placement:
        evaluators) queued for the evaluator unless `stage` made a model only the learner holds."""
        if self.beside is None or on_learner(stage):
            return settled({**self._evaluations(point, evals, seed, True), **(extra or {})})
        return self.beside.submit(
            lambda: {**self._evaluations(point, evals, seed, False), **(extra or {})}
        )

    def _evaluations(
        self, point: Point, evals: dict[str, str], seed: int, learner: bool
    ) -> dict[str, float]:
        """`evaluations`' metrics: read from the cache, the missing ones computed once by the
        first trial that needs them (a claim keeps two trials from computing them together)."""
        missing = {name: key for name, key in evals.items() if self.cache.read_eval(key) is None}
        if missing:
            done = lambda: all(self.cache.eval_path(k).is_file() for k in missing.values())  # noqa: E731
            claim_key = f"{digest(sorted(missing.values()))}-evaluating"
            claim = self.cache.acquire(claim_key, self.trial.trial_id, done)
            if claim is not None:
                try:
                    results = self.evaluate(point, list(missing), seed, learner)
                    for name, key in missing.items():
                        self.cache.write_eval(key, results[name])
                finally:
                    self.cache.release(claim)
        results = {name: self.cache.read_eval(key) for name, key in evals.items()}
        metrics: dict[str, float] = {}
        for result in results.values():
            metrics.update(result["metrics"])
        metrics.update(self.against_base(results))
        utility = self.spec.evaluation.model_utility
        if utility and all(name in metrics for name in utility):
            metrics["model_utility"] = harmonic_mean([metrics[name] for name in utility])
        return metrics

    def against_base(self, results: dict[str, dict]) -> dict[str, float]:
        """`<set>/mia_reference` of the sets whose reference is the base model: these
        evaluation `results`' per-row log-probs against the base's own evaluation of the same
        rows."""
        out = {}
        for name, result in results.items():
            spec = self.spec.evaluation.sets[name]
            if "mia_reference" in spec.metrics and spec.reference == "base":
                theirs = self.cache.read_eval(self.plan.base_evals[name])["examples"]
                out[f"{name}/mia_reference"] = reference_auc(result["examples"], theirs, name)
        return out

    # ----- training ---------------------------------------------------------------------------
    def mass_probe(self, step: StageStep) -> list[dict] | None:
        """On an unlearning branch, the rows of the eval set `analysis.probability_mass` names,
        whose probability mass the learner traces step by step; else None."""
        name = self.spec.analysis.probability_mass
        if not step.branch or name is None:
            return None
        spec = self.spec.evaluation.sets[name]
        return self.ctx.rows(spec.data)[: spec.max_examples]

    def train(self, step: StageStep, claim: Claim, loop: TrainingLoop) -> dict:
        """Train the prefix `step.key` (claimed) with the stage kind's `loop`, evaluate it,
        write its checkpoint; its meta."""
        stage, ctx, key = step.stage, self.ctx, step.key
        run_id = self.track(
            Tracker.start_run,
            f"{step.index}:{step.name}",
            key=f"prefix:{key}",
            parent_id=self.run_id,
            tags={
                "stageflow.kind": "stage",
                "stageflow.stage": step.name,
                "stageflow.prefix_key": key,
                "stageflow.trial_id": self.trial.trial_id,
            },
            params={
                "kind": stage.kind,
                "index": step.index,
                "objective": stage.objective or stage.kind,
                "lr": stage.lr,
                "batch_size": stage.batch_size,
                "steps": stage.steps,
                "epochs": stage.epochs,
                "seed": step.seed,
                "zero_stage": self.spec.learner.engine_zero_stage,  # as the engine ran it
                **{f"params.{k}": v for k, v in stage.params.items()},
            },
        )
        self.workers.learner_at(step.parent.key, step.parent.model_dir)
        rows = ctx.rows(stage.data)
        retain = ctx.rows(stage.retain) if stage.retain is not None else None
        started = now_ms()  # the training itself, for the stage's window in time
        steps = loop(self, step, rows, retain)
        ended = now_ms()
        isolated = steps[0].pop("isolated", None) if steps else None
        for phase, seconds in step_time_split(steps).items():
            self.clock.add(f"in_{phase}", seconds)  # parts of train / rl_stage, not added twice
        self.workers.holds(key)
        meta = {
            "key": key,
            "parent": step.parent.key,
            "stage": step.name,
            "seed": step.seed,
            "trial_id": self.trial.trial_id,
            "stage_run_id": run_id,
            "step_metrics": steps,
            "train_start_ms": started,
            "train_end_ms": ended,
        }
        if isolated is not None:  # ABL: which rows the stage ascended on, and their losses
            isolated["prompts"] = [rows[i]["prompt"] for i in isolated["rows"]]
            meta["isolated"] = isolated
            self.track(Tracker.log_text, run_id, json.dumps(isolated, indent=1), "isolated.json")
        if any("reward_mean" in s for s in steps):
            meta["rl_summary"] = rl_summary(steps, stage_reward_range(stage))
        # evaluated on the weights the learner holds, before the checkpoint is committed; or
        # (evaluators) from the committed checkpoint, while the learner trains on
        point = Point(key, self.cache.model_dir(key))
        now = self.beside is None or on_learner(stage)
        metrics = self._evaluations(point, step.evals, step.eval_seed, True) if now else {}
        staging = self.cache.staging_dir(claim)
        with self.clock("checkpoint_write"):
            self.workers.learner.save(staging / "model")
        self.track(Tracker.log_metric_series, run_id, list(enumerate(steps)), started)
        self.trained += 1

        def end_stage_run(metrics: dict[str, float]) -> None:
            self.log(run_id, {**metrics, **meta.get("rl_summary", {})}, step.index)
            self.track(Tracker.end_run, run_id)

        if now:
            end_stage_run(metrics)
        self.cache.commit(claim, staging, meta)
        if not now:
            evals = lambda: self._evaluations(point, step.evals, step.eval_seed, False)  # noqa: E731
            self.pending_runs.append(self.beside.submit(lambda: end_stage_run(evals())))
        return meta


def split_by_set(result: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """{set: its part of an evaluation result} ("<set>/<metric>" keys)."""
    return {
        name: {
            part: {k: v for k, v in values.items() if k.split("/", 1)[0] == name}
            for part, values in result.items()
        }
        for name in names
    }


def run_trial(
    ctx: TrialContext, trial: Trial, report: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Run a trial's path and unlearning branches; returns the trial's record: final
    metrics, per-stage history (prefix and evaluation keys, metrics), its plan's fingerprint,
    its MLflow run id and time breakdown."""
    runner = TrialRunner(ctx, trial, report)
    final = runner.run()
    return {
        "trial": trial.to_dict(),
        "fingerprint": runner.plan.fingerprint,
        "metrics": final,
        "history": runner.history,
        "run_id": runner.run_id,
        "timing": runner.clock.breakdown(),
    }
