"""One trial's pipeline: its stages in order through the prefix cache, evaluation after
each, the unlearning branches at the end, everything logged to MLflow.

Each stage is run by its kind (`platform/stages.py`). A stage whose prefix is already finished
(by this or another trial) is not trained again: its checkpoint and evaluation are reused and
the trial run links the stage run that trained it with a tag. A trained prefix is evaluated on
the weights the learner holds, before its checkpoint is committed, so every finished prefix
has its evaluation. Where the trial's time went is logged as `time/<phase>_s`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from stageflow.actors.rendering import render_row, renders_chat
from stageflow.platform.config import StudySpec
from stageflow.platform.evaluation import EvalJob, evaluate
from stageflow.platform.expand import Trial, trial_spec
from stageflow.platform.models import has_chat_template
from stageflow.platform.prefix_cache import Claim, PrefixCache, base_key, stage_seed
from stageflow.platform.registry import STAGE_KINDS
from stageflow.platform.rl import rl_summary, stage_reward_range
from stageflow.platform.stages import Point, StageStep
from stageflow.platform.study_dir import StudyDir
from stageflow.platform.tasks import materialize, read_jsonl
from stageflow.platform.tracking import now_ms
from stageflow.platform.workers import Stopwatch, TrialWorkers


@dataclass
class TrialContext:
    """What every trial of a study shares: its spec, files and the shared actors it calls."""

    spec: StudySpec
    study: StudyDir
    base_model: Path
    base_identity: str
    tracker: Any
    study_run_id: str
    pool: Any = None  # the shared rollout pool (placement: shared), when the study needs one
    _rows: dict[tuple, list[dict]] = field(default_factory=dict)

    @cached_property
    def model_has_template(self) -> bool:
        return has_chat_template(self.base_model)

    def rows(self, data) -> list[dict]:
        """The rows of a data spec, rendered for the model (chat turns when `data.template`
        resolves to chat: `auto` does when the model's tokenizer has a chat template)."""
        path = materialize(data, self.study.data)
        chat = renders_chat(data.template, self.model_has_template)
        key = (path, chat, data.system)
        if key not in self._rows:
            self._rows[key] = [render_row(r, chat, data.system) for r in read_jsonl(path)]
        return self._rows[key]

    def eval_jobs(self, spec: StudySpec, names: list[str] | None, seed: int) -> list[EvalJob]:
        return [
            EvalJob(
                name=name,
                rows=self.rows(s.data)[: s.max_examples],
                metrics=list(s.metrics),
                task=s.data.task,
                samples=s.samples,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                seed=seed,
                truth_ratios=name == spec.analysis.forget_quality,
            )
            for name, s in spec.evaluation.sets.items()
            if names is None or name in names
        ]


def step_time_split(steps: list[dict[str, float]]) -> dict[str, float]:
    """Where a stage's training time went, from its per-step metrics."""
    out = {"optimizer_steps": 0.0, "rl_generation": 0.0, "weight_sync": 0.0}
    for row in steps:
        out["optimizer_steps"] += row.get("learn_s", row.get("step_time_s", 0.0))
        out["rl_generation"] += row.get("gen_s", 0.0)
        out["weight_sync"] += row.get("sync_s", 0.0)
    return out


class TrialRunner:
    """Runs one trial; holds its actors (`TrialWorkers`), its MLflow run and its time breakdown."""

    def __init__(
        self, ctx: TrialContext, trial: Trial, report: Callable[[dict], None] | None = None
    ):
        self.ctx, self.trial = ctx, trial
        self.spec = trial_spec(ctx.spec, trial)
        self.cache: PrefixCache = ctx.study.cache()
        self.report = report or (lambda metrics: None)
        self.clock = Stopwatch()
        self.workers = TrialWorkers(
            self.spec, ctx.base_model, trial.seed, trial.trial_id, ctx.pool, self.clock
        )
        self.trained = 0
        self.history: list[dict[str, Any]] = []  # per stage: index, stage, prefix key, metrics

    # ----- tracking ---------------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        with self.clock("tracking"):
            return ray.get(getattr(self.ctx.tracker, method).remote(*args, **kwargs))

    def log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.call("log_metrics", run_id, metrics, step, now_ms())

    def tag(self, tags: dict[str, Any]) -> None:
        self.call("set_tags", self.run_id, tags)

    # ----- the path ---------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        trial, ctx = self.trial, self.ctx
        self.run_id = self.call(
            "start_run",
            trial.label,
            key=f"trial:{trial.trial_id}",
            parent_id=ctx.study_run_id,
            tags={
                "stageflow.kind": "trial",
                "stageflow.trial_id": trial.trial_id,
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
        try:
            final = self._run_path()
        except BaseException:
            self.call("end_run", self.run_id, "FAILED")
            raise
        finally:
            with self.clock("shutdown"):
                self.workers.close()
        done = len(trial.path) + 1
        self.log(self.run_id, {"stages_trained": self.trained, **self.clock.breakdown()}, done)
        self.call("end_run", self.run_id)
        return final

    def _run_path(self) -> dict[str, float]:
        trial = self.trial
        point = Point(base_key(self.ctx.base_identity, trial.seed), self.ctx.base_model)
        final = self.evaluate_once(point.key, point)
        self.log(self.run_id, final, 0)
        self.history.append({"index": 0, "stage": "base", "key": point.key, "metrics": final})
        for index, name in enumerate(trial.path, start=1):
            point, metrics = self._stage(StageStep(index, name, self.spec.stages[name], point))
            final = {**final, **metrics}
            self.report({"stage_index": index, "stage": name, **metrics})
        for branch in trial.unlearning:
            step = StageStep(len(trial.path) + 1, branch, self.spec.stages[branch], point, True)
            _, metrics = self._stage(step)
            unlearned = {f"{branch}/{k}": v for k, v in metrics.items()}
            final.update(unlearned)
            self.report({"stage_index": step.index, "stage": branch, **unlearned})
        return final

    def _stage(self, step: StageStep) -> tuple[Point, dict[str, float]]:
        point, metrics = STAGE_KINDS[step.stage.kind].run(self, step)
        logged = {f"{step.name}/{k}": v for k, v in metrics.items()} if step.branch else metrics
        self.log(self.run_id, logged, step.index)
        self.history.append(
            {
                "index": step.index,
                "stage": step.name,
                "key": point.key,
                "branch": step.branch,
                "metrics": metrics,
            }
        )
        return point, metrics

    # ----- evaluation -------------------------------------------------------------------------
    def evaluate(self, record_key: str, point: Point, names: list[str] | None = None) -> dict:
        """Evaluate `point` with the trial's actors (the learner holding its weights)."""
        jobs = self.ctx.eval_jobs(self.spec, names, seed=stage_seed(record_key))
        if not jobs:
            return {"metrics": {}, "examples": {}}
        learner = self.workers.learner_at(point.key, point.model_dir)
        weights = None
        if any(job.needs("generation") for job in jobs):
            weights = self.workers.weights(point.key, point.model_dir)

        def generate(prompts: list[str], **sampling: Any) -> dict:
            return self.workers.generate(prompts, weights, **sampling)

        def answer_stats(items: list[dict]) -> list:
            with self.clock("eval_loglik"):
                return learner.answer_stats(items)

        return evaluate(jobs, answer_stats, generate)

    def evaluate_once(self, record_key: str, point: Point, names: list[str] | None = None):
        """The evaluation stored under `record_key`, computed by the first trial that needs it
        (a claim keeps two trials from computing it together)."""
        found = self.cache.read_eval(record_key)
        if found is None:
            done = lambda: self.cache.eval_path(record_key).is_file()  # noqa: E731
            claim = self.cache.acquire(f"{record_key}-evaluating", self.trial.trial_id, done)
            if claim is not None:
                try:
                    self.cache.write_eval(record_key, self.evaluate(record_key, point, names))
                finally:
                    self.cache.release(claim)
            found = self.cache.read_eval(record_key)
        return found["metrics"]

    # ----- training ---------------------------------------------------------------------------
    def mass_probe(self, step: StageStep) -> list[dict] | None:
        """On an unlearning branch, the rows of the eval set `analysis.probability_mass` names,
        whose probability mass the learner traces step by step; else None."""
        name = self.spec.analysis.probability_mass
        if not step.branch or name is None:
            return None
        spec = self.spec.evaluation.sets[name]
        return self.ctx.rows(spec.data)[: spec.max_examples]

    def train(self, step: StageStep, key: str, claim: Claim) -> dict:
        """Train the prefix `key` (claimed), evaluate it, write its checkpoint; its meta."""
        stage, ctx = step.stage, self.ctx
        run_id = self.call(
            "start_run",
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
                **{f"params.{k}": v for k, v in stage.params.items()},
            },
        )
        self.workers.learner_at(step.parent.key, step.parent.model_dir)
        rows = ctx.rows(stage.data)
        retain = ctx.rows(stage.retain) if stage.retain is not None else None
        kind = STAGE_KINDS[stage.kind]
        kind.prepare(self, step)
        started = now_ms()  # the training itself, for the stage's window in time
        steps = kind.train(self, step, key, rows, retain)
        ended = now_ms()
        for phase, seconds in step_time_split(steps).items():
            self.clock.add(f"in_{phase}", seconds)  # parts of train / rl_stage, not added twice
        self.workers.holds(key)
        meta = {
            "key": key,
            "parent": step.parent.key,
            "stage": step.name,
            "trial_id": self.trial.trial_id,
            "stage_run_id": run_id,
            "step_metrics": steps,
            "train_start_ms": started,
            "train_end_ms": ended,
        }
        if any("reward_mean" in s for s in steps):
            meta["rl_summary"] = rl_summary(steps, stage_reward_range(stage))
        metrics = {}
        if self.spec.evaluation.after_every_stage:
            result = self.evaluate(key, Point(key, self.cache.model_dir(key)))
            self.cache.write_eval(key, result)
            metrics = result["metrics"]
        staging = self.cache.staging_dir(claim)
        with self.clock("checkpoint_write"):
            self.workers.learner.save(staging / "model")
        self.call("log_metric_series", run_id, list(enumerate(steps)), started)
        self.log(run_id, {**metrics, **meta.get("rl_summary", {})}, step.index)
        self.call("end_run", run_id)
        self.trained += 1
        self.cache.commit(claim, staging, meta)
        return meta


def run_trial(
    ctx: TrialContext, trial: Trial, report: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Run a trial's path and unlearning branches; returns the trial's record: final
    metrics, per-stage history (prefix keys, metrics), its MLflow run id and time breakdown."""
    runner = TrialRunner(ctx, trial, report)
    final = runner.run()
    return {
        "trial": trial.to_dict(),
        "metrics": final,
        "history": runner.history,
        "run_id": runner.run_id,
        "timing": runner.clock.breakdown(),
    }
