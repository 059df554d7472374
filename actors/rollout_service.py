"""The study's rollout workers behind one Ray actor, shared by every trial.

Engines start once per study (25–30 s each on CPU) and are reused across stages and
trials. Calls are serialised (`max_concurrency=1`), so loading a trial's weights and
sampling with them happen together, never interleaved with another trial's.

An RL stage holds the service's lease (`acquire(owner)` ... `release(owner)`): while leased,
only the owner may `load_weights` or sample its own weights (`generate(None, ..., owner=)`);
another owner is refused (`RolloutLeaseError`) and retries later; a lease left idle for
`LEASE_IDLE_S` (its trial died) may be taken over. Evaluation
(`generate(model_dir, ...)`) keeps working for everyone: the leaseholder's weights are loaded
again before its next sample.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SERVICE_NAME = "stageflow-rollout"
LEASE_IDLE_S = 900.0  # an RL stage calls the service every step; a lease this idle is stale


class RolloutLeaseError(RuntimeError):
    """The rollout service is leased by another owner (or the caller holds no lease)."""


class RolloutService:
    """Owns a `RolloutGroup`; serves `generate` for whichever model directory a caller names."""

    def __init__(self, model_dir: str, spec: Any, device: str, cpus_per_actor: float):
        from stageflow.actors.rollout import RolloutGroup

        self.group = RolloutGroup(model_dir, spec, device=device, cpus_per_actor=cpus_per_actor)
        self.serving = str(model_dir)
        self.owner: str | None = None
        self.owner_weights: Any = None  # the leaseholder's latest payload (bytes or ObjectRef)
        self.owner_version = 0
        self.owner_seen = 0.0

    def generate(
        self,
        model_dir: str | Path | None,
        prompts: list[str],
        owner: str | None = None,
        **sampling: Any,
    ) -> dict[str, list]:
        """Sample from `model_dir`'s weights (loaded in place when they are not already served),
        or with `owner` and no `model_dir`, from the weights the leaseholder loaded."""
        if owner is not None or model_dir is None:
            self._check_owner(owner)
            if self.owner_weights is None:
                raise RolloutLeaseError(f"'{owner}' holds the lease but loaded no weights yet")
            if self.serving != self._owner_tag():
                self.group.load_weights(self.owner_weights)
                self.serving = self._owner_tag()
        elif str(model_dir) != self.serving:
            self.group.load_model(model_dir)
            self.serving = str(model_dir)
        return self.group.generate(prompts, **sampling)

    # ----- the lease of an RL stage ---------------------------------------------------------
    def acquire(self, owner: str) -> bool:
        """Take the lease for `owner` (re-entrant); False while another owner holds it."""
        stale = time.monotonic() - self.owner_seen > LEASE_IDLE_S
        if self.owner not in (None, owner) and not stale:
            return False
        if self.owner != owner:
            self.owner, self.owner_weights = owner, None
        self.owner_seen = time.monotonic()
        return True

    def release(self, owner: str) -> bool:
        """Give the lease back; False when `owner` did not hold it."""
        if self.owner != owner:
            return False
        self.owner, self.owner_weights = None, None
        return True

    def holder(self) -> str | None:
        return self.owner

    def load_weights(self, owner: str, payload: Any) -> list[dict[str, float]]:
        """Load the leaseholder's weights: safetensors bytes, an ObjectRef, or [ObjectRef]
        (a list keeps Ray from fetching the payload into this actor)."""
        self._check_owner(owner)
        if isinstance(payload, list):
            (payload,) = payload
        stats = self.group.load_weights(payload)
        self.owner_weights, self.owner_version = payload, self.owner_version + 1
        self.serving = self._owner_tag()
        return stats

    def _owner_tag(self) -> str:
        return f"<weights of {self.owner} v{self.owner_version}>"

    def _check_owner(self, owner: str | None) -> None:
        if owner is None or self.owner != owner:
            held = f"leased by '{self.owner}'" if self.owner else "not leased"
            raise RolloutLeaseError(
                f"rollout service is {held}; '{owner}' must acquire the lease first"
            )
        self.owner_seen = time.monotonic()

    def info(self) -> list[dict[str, Any]]:
        return self.group.info()

    def shutdown(self) -> None:
        self.group.shutdown()


def start_rollout_service(
    model_dir: str | Path, spec: Any, device: str, cpus_per_actor: float, name: str
):
    """The study's rollout service as the Ray actor `name`."""
    import ray

    from stageflow.platform.tracking import NAMESPACE

    actor = ray.remote(num_cpus=0, max_concurrency=1)(RolloutService)
    return actor.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
        str(model_dir), spec, device, cpus_per_actor
    )
