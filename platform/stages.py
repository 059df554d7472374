"""The stage kinds (`kind:` in YAML), each a class whose `run` the trial pipeline calls.

`sft`, `grpo` and `unlearn` train (`TrainStage`: the objective says whether by supervised
batches or by the RL loop); `eval` only evaluates the model it is given. A new kind is one
subclass registered in `STAGE_KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stageflow.platform.evaluation import mass_per_step, probe_items
from stageflow.platform.registry import OBJECTIVES, STAGE_KINDS, StageKind, objective_of
from stageflow.platform.trial_plan import PlannedStep


@dataclass(frozen=True)
class Point:
    """A model state on a trial's path: its prefix key and its checkpoint directory."""

    key: str
    model_dir: Path


@dataclass(frozen=True)
class StageStep:
    """One stage of a trial as planned (its key, seed and evaluations), and the model it
    starts from."""

    planned: PlannedStep
    parent: Point

    index = property(lambda self: self.planned.index)
    name = property(lambda self: self.planned.name)
    stage = property(lambda self: self.planned.stage)
    branch = property(lambda self: self.planned.branch)  # an unlearning branch at the path's end
    key = property(lambda self: self.planned.key)
    seed = property(lambda self: self.planned.seed)
    evals = property(lambda self: self.planned.evals)
    eval_seed = property(lambda self: self.planned.eval_seed)


class TrainStage(StageKind):
    """Train the stage's objective from the parent prefix, once per study (prefix cache)."""

    def run(self, trial: Any, step: StageStep) -> tuple[Point, dict[str, float]]:
        key = step.key
        with trial.clock("wait_prefix"):
            claim = trial.cache.acquire(key, owner=trial.trial.trial_id)
        if claim is None:  # trained by another trial (or an earlier attempt of this one)
            meta = trial.cache.meta(key)
            trial.tag({f"stageflow.reused.{step.index}.{step.name}": meta["stage_run_id"]})
        else:
            try:
                meta = trial.train(step, claim)
            except BaseException:
                trial.cache.release(claim)
                raise
        point = Point(key, trial.cache.model_dir(key))
        evaluation = trial.evaluations(point, step.evals, step.eval_seed)
        return point, {**evaluation, **(meta.get("rl_summary") or {})}

    def prepare(self, trial: Any, step: StageStep) -> None:
        """Start what training needs besides the learner: an RL stage's rollout engines."""
        if OBJECTIVES[objective_of(step.stage)].rl_loop:
            _ = trial.workers.rollout  # the trial's own engines start on first use

    def train(self, trial: Any, step: StageStep, rows: list[dict], retain: Any):
        """Per-step metrics of training prefix `step.key` (the learner holds the parent's
        weights)."""
        from stageflow.platform.rl import run_rl_stage

        stage, workers, seed = step.stage, trial.workers, step.seed
        if OBJECTIVES[objective_of(stage)].rl_loop:
            with trial.clock("rl_stage"):
                return run_rl_stage(
                    workers.learner, workers.rollout, stage, rows, retain,
                    seed=seed, owner=f"{trial.trial.trial_id}/{step.index}", sync=workers.sync,
                )  # fmt: skip
        probe = trial.mass_probe(step)
        with workers.training(), trial.clock("train"):
            steps = workers.learner.train_stage(
                stage, rows, retain, seed=seed, probe=probe_items(probe) if probe else None
            )
        if probe:
            mass_per_step(probe, steps)
        return steps


class EvalStage(StageKind):
    """Evaluate the parent model on the stage's sets (all sets when it names none)."""

    trains = False

    def run(self, trial: Any, step: StageStep) -> tuple[Point, dict[str, float]]:
        return step.parent, trial.evaluations(step.parent, step.evals, step.eval_seed)


for _kind, _default, _doc in [
    ("sft", "sft", "supervised training on prompt/answer pairs"),
    ("grpo", "grpo", "reinforcement learning from rewards on sampled completions"),
    ("unlearn", None, "an unlearning method applied to a forget set"),
]:
    STAGE_KINDS.add(TrainStage(_kind, _default, _doc))
STAGE_KINDS.add(EvalStage("eval", None, "evaluation only; trains nothing"))
