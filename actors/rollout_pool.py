"""The study's shared rollout engines (`rollout.placement: shared`) behind one router actor.

Engines start once per study (25–30 s each on CPU) and serve every trial. Each call names the
weights it wants (`Weights`) and runs on one free engine, preferably one that serves those
weights already; an engine serves one call at a time, so a pool of N engines serves N callers
at once — one lease per engine and call, never one lease for the study. An RL step (its
weights, then its samples) and an evaluation are each one call, so RL stages and evaluations
of different trials interleave and never wait for each other's stage to end.

Fault tolerance: the engines are restartable, named actors owned by the study driver (Ray
restarts one lost with its node and retries the call); the router is a named, restartable
actor that finds the engines by name and holds no state it cannot rebuild.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from stageflow.actors.weight_sync import Weights

POOL_RESTARTS = -1  # the router holds no state it cannot rebuild: restart it whenever lost


class RolloutPool:
    """An async router over the engines of one `RolloutGroup` (its named actors)."""

    def __init__(self, engine_names: list[str], namespace: str):
        self.engines = [ray.get_actor(name, namespace=namespace) for name in engine_names]
        self.serving: list[str | None] = [None] * len(self.engines)
        self.free = set(range(len(self.engines)))
        self.changed = asyncio.Condition()
        self.calls = [0] * len(self.engines)

    async def _take(self, tag: str) -> int:
        """A free engine, one serving `tag` if there is one; waits while all are busy."""
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.free))
            same = [i for i in self.free if self.serving[i] == tag]
            index = same[0] if same else min(self.free, key=lambda i: self.calls[i])
            self.free.discard(index)
            return index

    async def _give_back(self, index: int) -> None:
        async with self.changed:
            self.free.add(index)
            self.changed.notify_all()

    async def generate(self, prompts: list[str], weights: Weights, **sampling: Any) -> dict:
        """`RolloutWorker.generate(prompts, weights, ...)` on one engine of the pool."""
        index = await self._take(weights.tag)
        try:
            self.serving[index] = None  # unknown until the call has loaded them
            out = await self.engines[index].generate.remote(prompts, weights, **sampling)
            self.serving[index] = weights.tag
            self.calls[index] += 1
            return out
        finally:
            await self._give_back(index)

    async def serve(self, weights: Weights) -> list[dict[str, float]]:
        """Every engine loads `weights` now (one at a time, as its turn comes)."""
        out = []
        for index in range(len(self.engines)):
            async with self.changed:
                await self.changed.wait_for(lambda i=index: i in self.free)
                self.free.discard(index)
            try:
                out.append(await self.engines[index].serve.remote(weights))
                self.serving[index] = weights.tag
            finally:
                await self._give_back(index)
        return out

    async def info(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*[e.info.remote() for e in self.engines]))

    async def hosts(self) -> list[str]:
        return [info["host"] for info in await self.info()]


class SharedRollout:
    """The client side of the pool, with the same calls as a trial's own `RolloutGroup`."""

    def __init__(self, pool: Any):
        self.pool = pool

    def generate(self, prompts: list[str], weights: Weights | None = None, **sampling: Any):
        if weights is None:
            raise ValueError("the shared rollout pool needs the weights to sample with")
        return ray.get(self.pool.generate.remote(list(prompts), weights, **sampling))

    def serve(self, weights: Weights) -> list[dict[str, float]]:
        return ray.get(self.pool.serve.remote(weights))

    def hosts(self) -> list[str]:
        return ray.get(self.pool.hosts.remote())

    def info(self) -> list[dict[str, Any]]:
        return ray.get(self.pool.info.remote())

    def sleep(self) -> None:  # shared engines never sleep for one trial's learner
        pass

    def wake(self) -> None:
        pass


def start_rollout_pool(group: Any, name: str, resources: dict[str, float]):
    """The router actor `name` over the named engines of `group` (a RolloutGroup the driver
    owns, started with `actor_name`), in the engines' namespace."""
    namespace = group.group.namespace
    actor = ray.remote(num_cpus=0, max_restarts=POOL_RESTARTS, max_task_retries=-1)(RolloutPool)
    return actor.options(
        name=name, namespace=namespace, get_if_exists=True, resources=resources or None
    ).remote(group.group.actor_names, namespace)
