"""Learners: one DeepSpeed engine per rank (ZeRO 0-3, data parallel), as Ray actors in one group.

`LearnerGroup` starts `spec.ranks` `LearnerWorker` actors (actors/learner_worker.py) through
`ActorGroup` (torch.distributed over gloo on CPU, nccl on GPU). Its methods are the worker's
@dispatch methods (actors/dispatch.py): `train_stage` (supervised or unlearning objectives over
a stage's rows), `begin_stage` + `step` (the RL hook), `logprobs` and `answer_stats`
(evaluation on the weights it holds), the full weights gathered on rank 0 (`state_dict`,
`weights_payload`, `write_shared_weights` for weight_sync), `save` (an HF model directory vLLM
and transformers load), `load` and `reseed`; the two defined here add what the caller's side
needs (the global sample count of an RL step, a Path back). The rows of a call that every rank
receives go through the object store once (`ActorGroup.run`). The LM head runs the fused per-token
log-prob kernel (`kernels: fused`), so the N x V logits are never held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stageflow.actors.group import ModelGroup, check_fits
from stageflow.actors.learner_worker import LearnerWorker
from stageflow.actors.rendering import Completion
from stageflow.core.config import LearnerSpec, StageSpec, StudyError
from stageflow.core.models import check_model_dir
from stageflow.core.registry import stage_objective


def check_learner(model_dir: str | Path, spec: LearnerSpec, cpus_per_actor: float) -> None:
    """Raise StudyError (one sentence) for a learner that could not start."""
    spec.check("learner")
    why = check_model_dir(model_dir)
    if why:
        raise StudyError("", f"model directory '{model_dir}'", f"expected {why}")
    check_fits("learner.ranks", spec.ranks, cpus_per_actor)


class LearnerGroup(ModelGroup):
    """`spec.ranks` learner actors training one model together (DeepSpeed data parallel)."""

    worker, name, distributed, set_up = LearnerWorker, "learner", True, True

    @property
    def ranks(self) -> int:
        return self.spec.ranks

    def check(self, model_dir: str | Path, cpus: float) -> None:
        check_learner(model_dir, self.spec, cpus)

    def train_stage(self, stage: StageSpec, *args: Any, **kwargs: Any) -> list[dict[str, float]]:
        """`LearnerWorker.train_stage` (rows, retain_rows, seed, probe as there), the stage's
        objective typed here, on the caller's side, once."""
        objective = stage_objective(stage)
        return self.group.run(LearnerWorker.train_stage, stage, objective, *args, **kwargs)

    def begin_stage(self, stage: StageSpec, total_steps: int) -> dict[str, Any]:
        """`LearnerWorker.begin_stage` (the RL hook), the stage's objective typed here."""
        objective = stage_objective(stage)
        return self.group.run(LearnerWorker.begin_stage, stage, objective, total_steps)

    def step(self, samples: list[Completion]) -> dict[str, float]:
        """One RL optimizer step over `samples`, split across ranks; rank 0's metrics."""
        return self.group.run(LearnerWorker.step, list(samples), len(samples))

    def save(self, out_dir: str | Path) -> Path:
        return Path(self.group.run(LearnerWorker.save, str(out_dir)))
