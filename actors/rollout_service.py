"""The study's rollout workers behind one Ray actor, shared by every trial.

Engines start once per study (25–30 s each on CPU) and are reused across stages and
trials. Calls are serialised (`max_concurrency=1`), so loading a trial's weights and
sampling with them happen together, never interleaved with another trial's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SERVICE_NAME = "stageflow-rollout"


class RolloutService:
    """Owns a `RolloutGroup`; serves `generate` for whichever model directory a caller names."""

    def __init__(self, model_dir: str, spec: Any, device: str, cpus_per_actor: float):
        from stageflow.actors.rollout import RolloutGroup

        self.group = RolloutGroup(model_dir, spec, device=device, cpus_per_actor=cpus_per_actor)
        self.serving = str(model_dir)

    def generate(
        self, model_dir: str | Path, prompts: list[str], **sampling: Any
    ) -> dict[str, list]:
        """Sample from `model_dir`'s weights (loaded in place when they are not already served)."""
        if str(model_dir) != self.serving:
            self.group.load_model(model_dir)
            self.serving = str(model_dir)
        return self.group.generate(prompts, **sampling)

    def info(self) -> list[dict[str, Any]]:
        return self.group.info()

    def shutdown(self) -> None:
        self.group.shutdown()


def start_rollout_service(
    model_dir: str | Path, spec: Any, device: str, cpus_per_actor: float, study: str
):
    import ray

    from stageflow.platform.tracking import NAMESPACE

    actor = ray.remote(num_cpus=0, max_concurrency=1)(RolloutService)
    return actor.options(
        name=f"{SERVICE_NAME}-{study}", namespace=NAMESPACE, get_if_exists=True
    ).remote(str(model_dir), spec, device, cpus_per_actor)
