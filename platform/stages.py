"""The stage kinds (`kind:` in YAML), each a class whose `run` the trial pipeline calls.

`sft`, `grpo` and `unlearn` train (`TrainStage`: the objective says whether by supervised
batches or by the RL loop); `eval` only evaluates the model it is given. A new kind is one
subclass registered in `STAGE_KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stageflow.platform.config import StageSpec
from stageflow.platform.evaluation import mass_per_step, probe_items
from stageflow.platform.prefix_cache import child_key, digest, stage_seed
from stageflow.platform.registry import OBJECTIVES, STAGE_KINDS, StageKind, objective_of


@dataclass(frozen=True)
class Point:
    """A model state on a trial's path: its prefix key and its checkpoint directory."""

    key: str
    model_dir: Path


@dataclass(frozen=True)
class StageStep:
    """One stage of a trial: where it sits on the path and the model it starts from."""

    index: int
    name: str
    stage: StageSpec
    parent: Point
    branch: bool = False  # an unlearning branch from the path's end


class TrainStage(StageKind):
    """Train the stage's objective from the parent prefix, once per study (prefix cache)."""

    def run(self, trial: Any, step: StageStep) -> tuple[Point, dict[str, float]]:
        key = child_key(step.parent.key, step.stage, trial.spec)
        with trial.clock("wait_prefix"):
            claim = trial.cache.acquire(key, owner=trial.trial.trial_id)
        if claim is None:  # trained by another trial (or an earlier attempt of this one)
            meta = trial.cache.meta(key)
            trial.tag({f"stageflow.reused.{step.index}.{step.name}": meta["stage_run_id"]})
        else:
            try:
                meta = trial.train(step, key, claim)
            except BaseException:
                trial.cache.release(claim)
                raise
        evaluation = trial.cache.read_eval(key) or {"metrics": {}}
        metrics = {**evaluation["metrics"], **(meta.get("rl_summary") or {})}
        return Point(key, trial.cache.model_dir(key)), metrics

    def prepare(self, trial: Any, step: StageStep) -> None:
        """Start what training needs besides the learner: an RL stage's rollout engines."""
        if OBJECTIVES[objective_of(step.stage)].rl_loop:
            _ = trial.workers.rollout  # the trial's own engines start on first use

    def train(self, trial: Any, step: StageStep, key: str, rows: list[dict], retain: Any):
        """Per-step metrics of training prefix `key` (the learner holds the parent's weights)."""
        from stageflow.platform.rl import run_rl_stage

        stage, workers, seed = step.stage, trial.workers, stage_seed(key)
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
        names = list(step.stage.sets) or None
        record = f"{step.parent.key}-eval-{digest(step.stage.sets)}"
        return step.parent, trial.evaluate_once(record, step.parent, names)


for _kind, _default, _doc in [
    ("sft", "sft", "supervised training on prompt/answer pairs"),
    ("grpo", "grpo", "reinforcement learning from rewards on sampled completions"),
    ("unlearn", None, "an unlearning method applied to a forget set"),
]:
    STAGE_KINDS.add(TrainStage(_kind, _default, _doc))
STAGE_KINDS.add(EvalStage("eval", None, "evaluation only; trains nothing"))
