"""The stage kinds (`kind:` in YAML): the trial pipeline looks a stage's kind up once and calls
its `run`; everything after that (the prefix cache claim, which training loop, the
evaluations) is the kind's business.

`sft`, `grpo` and `unlearn` train (`TrainStage`; its objective picks the loop: supervised
batches on the learner, or the RL loop with the rollout engines); `eval` only evaluates the model
it is given. A new kind is one subclass registered in `STAGE_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stageflow.actors.rendering import row_prompt
from stageflow.core.alternatives import GENERATED
from stageflow.core.prefix_cache import Claim, PrefixCache
from stageflow.core.registry import (
    STAGE_KINDS,
    StageKind,
    runs_rl_loop,
    samples_alternatives,
    stage_objective,
)
from stageflow.platform.engine.evaluation import mass_per_step, probe_items
from stageflow.platform.engine.trial_plan import PlannedStep


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


class TrialRun(Protocol):
    """What a stage kind uses of the running trial (platform/engine/pipeline.py's TrialRunner)."""

    cache: PrefixCache
    workers: Any  # platform/engine/workers.py's TrialWorkers
    trial: Any  # core/expand.py's Trial

    def clock(self, phase: str) -> AbstractContextManager[None]: ...
    def tag(self, tags: dict[str, Any]) -> None: ...
    def evaluations(
        self, point: Point, evals: dict[str, str], seed: int, extra: Any = None, stage: Any = None
    ) -> Future: ...
    def mass_probe(self, step: StageStep) -> list[dict] | None: ...
    def train(self, step: StageStep, claim: Claim, loop: TrainingLoop) -> dict: ...


# One stage's training from the parent's weights: (trial, step, rows, retain rows) -> per-step
# metrics in order.
TrainingLoop = Callable[[TrialRun, StageStep, list[dict], Any], list[dict[str, float]]]


class TrainStage(StageKind):
    """Train the stage's objective from the parent prefix, once per study (prefix cache)."""

    def run(self, trial: TrialRun, step: StageStep) -> tuple[Point, Future]:
        key = step.key
        with trial.clock("wait_prefix"):
            claim = trial.cache.acquire(key, owner=trial.trial.trial_id)
        if claim is None:  # trained by another trial (or an earlier attempt of this one)
            meta = trial.cache.meta(key)
            trial.tag({f"stageflow.reused.{step.index}.{step.name}": meta["stage_run_id"]})
        else:
            loop = rl_loop if runs_rl_loop(step.stage) else supervised_loop
            try:
                meta = trial.train(step, claim, loop)
            except BaseException:
                trial.cache.release(claim)
                raise
        point = Point(key, trial.cache.model_dir(key))
        extra = meta.get("rl_summary") or {}
        return point, trial.evaluations(point, step.evals, step.eval_seed, extra, step.stage)


def supervised_loop(
    trial: TrialRun, step: StageStep, rows: list[dict], retain: Any
) -> list[dict[str, float]]:
    """The stage's objective over batches of its rows, on the learner (AltPO's preferred
    answers sampled first, from the stage's starting weights)."""
    probe = trial.mass_probe(step)
    sampled = None
    if samples_alternatives(step.stage):
        rows, sampled = sampled_alternatives(trial, step, rows)
    with trial.workers.training(), trial.clock("train"):
        steps = trial.workers.learner.train_stage(
            step.stage, rows, retain, seed=step.seed, probe=probe_items(probe) if probe else None
        )
    if probe:
        mass_per_step(probe, steps)
    if sampled is not None and steps:
        steps[0]["alternatives/like_answer"] = sampled
    return steps


def sampled_alternatives(
    trial: TrialRun, step: StageStep, rows: list[dict]
) -> tuple[list[dict], float]:
    """Each row with a `generated` answer sampled from the stage's starting weights by the
    trial's engines: the first of `samples` completions (temperature 1, `max_new_tokens`) that
    is not empty and differs from the row's answer, else the first; and the share of rows
    where none differed."""
    params = stage_objective(step.stage).extra  # AltPO's
    weights = trial.workers.weights(step.parent.key, step.parent.model_dir)  # own clocks
    rollout = trial.workers.rollout  # started here (its own clock) when the trial's own
    with trial.clock("alternatives"):
        out = rollout.generate(
            [row_prompt(row) for row in rows],
            weights,
            n=params.samples,
            temperature=1.0,
            max_tokens=params.max_new_tokens,
            seed=step.seed,
        )
    chosen, same = [], 0
    for row, texts in zip(rows, out["texts"]):
        other = [t for t in texts if t.strip() and t.strip() != row["answer"].strip()]
        same += not other
        chosen.append({**row, GENERATED: (other or texts)[0]})
    return chosen, same / max(1, len(rows))


def rl_loop(
    trial: TrialRun, step: StageStep, rows: list[dict], retain: Any
) -> list[dict[str, float]]:
    """The RL loop (platform/engine/rl.py) with the trial's rollout engines."""
    # lazy: Ray and the actors load where a stage trains, not where validate and status
    # read the stage kinds
    from stageflow.platform.engine.rl import run_rl_stage

    workers = trial.workers
    _ = workers.rollout  # the trial's own engines start on first use, before the stage's clock
    with trial.clock("rl_stage"):
        return run_rl_stage(
            workers.learner, workers.rollout, step.stage, rows, retain, seed=step.seed,
            owner=f"{trial.trial.trial_id}/{step.index}", sync=workers.sync,
        )  # fmt: skip


class EvalStage(StageKind):
    """Evaluate the parent model on the stage's sets (all sets when it names none)."""

    trains = False

    def run(self, trial: TrialRun, step: StageStep) -> tuple[Point, Future]:
        return step.parent, trial.evaluations(step.parent, step.evals, step.eval_seed)


for _kind, _default, _doc in [
    ("sft", "sft", "supervised training on prompt/answer pairs"),
    ("grpo", "grpo", "reinforcement learning from rewards on sampled completions"),
    ("unlearn", None, "an unlearning method applied to a forget set"),
]:
    STAGE_KINDS.add(TrainStage(_kind, _default, _doc))
STAGE_KINDS.add(EvalStage("eval", None, "evaluation only; trains nothing"))
