"""One trial's pipeline: its stages in order, evaluation after each, everything to MLflow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.actors.evaluator import EvalJob
from stageflow.platform.config import StageSpec, StudySpec
from stageflow.platform.expand import Trial
from stageflow.platform.tasks import materialize, read_jsonl


@dataclass
class TrialContext:
    """What every trial of a study shares: its spec, files and the actors it calls."""

    spec: StudySpec
    storage: Path
    base_model: Path
    tracker: Any
    study_run_id: str
    evaluator: Any
    rollout: Any = None
    _rows: dict[Path, list[dict]] = field(default_factory=dict)

    def rows(self, data) -> list[dict]:
        path = materialize(data, self.storage / "data")
        if path not in self._rows:
            self._rows[path] = read_jsonl(path)
        return self._rows[path]

    def eval_jobs(self, names: list[str] | None = None) -> list[EvalJob]:
        sets = self.spec.evaluation.sets
        return [
            EvalJob(
                name=name,
                rows=self.rows(s.data)[: s.max_examples],
                metrics=list(s.metrics),
                task=s.data.task,
                samples=s.samples,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
            )
            for name, s in sets.items()
            if names is None or name in names
        ]


@dataclass
class StageResult:
    model_dir: Path
    step_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


StageExecutor = Callable[[TrialContext, str, StageSpec, Path, Trial], StageResult]


def run_eval_stage(
    ctx: TrialContext, name: str, stage: StageSpec, model_dir: Path, trial: Trial
) -> StageResult:
    """An `eval` stage trains nothing: it scores the current model on its sets (default: all)."""
    metrics = evaluate(ctx, model_dir, stage.sets or None)
    return StageResult(model_dir=model_dir, summary=metrics)


EXECUTORS: dict[str, StageExecutor] = {"eval": run_eval_stage}


def evaluate(
    ctx: TrialContext, model_dir: Path, names: list[str] | None = None
) -> dict[str, float]:
    import ray

    jobs = ctx.eval_jobs(names)
    if not jobs:
        return {}
    return ray.get(ctx.evaluator.evaluate.remote(str(model_dir), jobs, ctx.rollout))


def run_trial(ctx: TrialContext, trial: Trial) -> dict[str, float]:
    """Run a trial's path, log trial and stage runs, and return its final metrics."""
    import ray

    tracker, spec = ctx.tracker, ctx.spec
    trial_run = ray.get(
        tracker.start_run.remote(
            f"{trial.ordering} seed={trial.seed}",
            parent_id=ctx.study_run_id,
            tags={
                "stageflow.kind": "trial",
                "stageflow.trial_id": trial.trial_id,
                "stageflow.ordering": trial.ordering,
            },
            params={"path": trial.ordering, "seed": trial.seed, **trial.hparams},
        )
    )
    model_dir, final = ctx.base_model, evaluate(ctx, ctx.base_model)
    ray.get(tracker.log_metrics.remote(trial_run, final, 0))
    for index, name in enumerate(trial.path, start=1):
        stage = spec.stages[name]
        stage_run = ray.get(
            tracker.start_run.remote(
                f"{index}:{name}",
                parent_id=trial_run,
                tags={
                    "stageflow.kind": "stage",
                    "stageflow.stage": name,
                    "stageflow.trial_id": trial.trial_id,
                },
                params={"kind": stage.kind, "index": index},
            )
        )
        result = EXECUTORS[stage.kind](ctx, name, stage, model_dir, trial)
        model_dir = result.model_dir
        metrics = dict(result.summary)
        if spec.evaluation.after_every_stage and stage.kind != "eval":
            metrics.update(evaluate(ctx, model_dir))
        ray.get(tracker.log_metric_series.remote(stage_run, result.step_metrics))
        ray.get(tracker.log_metrics.remote(stage_run, metrics, index))
        ray.get(tracker.log_metrics.remote(trial_run, metrics, index))
        ray.get(tracker.end_run.remote(stage_run))
        final.update(metrics)
    ray.get(tracker.end_run.remote(trial_run))
    return final
