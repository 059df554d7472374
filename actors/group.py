"""One actor group for every role: placement, the torch.distributed handshake, call-and-gather.

`ActorGroup(cls, n)` starts n Ray actors of `cls`, one placement-group bundle per rank (or
inside the enclosing Tune trial's placement group), optionally wires them up for
torch.distributed (rank 0 picks a free port; every rank gets MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK), and runs a worker method on its ranks as the method declares
(`run`, actors/dispatch.py). Learners and rollout workers are both `ModelGroup`s on it, whose
methods are their workers' @dispatch methods.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stageflow.actors.dispatch import (
    ALL,
    RANK0,
    REF0,
    SPLIT,
    SPLIT_RANK0,
    bind_worker_methods,
    check_call,
    mode_of,
)
from stageflow.core.config import StudyError

# lazy: torch only to look for a local GPU (device: auto)

PLACEMENT_TIMEOUT_S = 120.0
START_TIMEOUT_S = 600.0  # a vLLM engine start takes 25-30 s here, more on a busy machine
RESTARTS = 3  # restarts of a lost rank (and retries of its calls) before a call fails


def available_cpus() -> float:
    """CPUs new actors can get: the enclosing placement group's, else the whole cluster's."""
    pg = get_current_placement_group()
    if pg is not None:
        # Bundle 0 of a Tune trial's placement group runs the trial itself.
        return sum(b.get("CPU", 0.0) for b in pg.bundle_specs[1:])
    return float(ray.cluster_resources().get("CPU", 0.0))


def check_fits(what: str, ranks: int, cpus_per_actor: float) -> None:
    """Raise StudyError when `ranks` actors of `cpus_per_actor` CPUs cannot all be placed."""
    if ranks < 1:
        raise StudyError("", what, f"expected at least 1 rank, got {ranks}")
    have = available_cpus()
    if ranks * cpus_per_actor > have:
        raise StudyError(
            "",
            what,
            f"{ranks} ranks x {cpus_per_actor:g} CPUs need {ranks * cpus_per_actor:g} "
            f"CPUs but the cluster (or trial placement group) has {have:g}",
        )


def shared(value: Any) -> Any:
    """A list or dict argument put in the object store once (Ray hands each rank the value)."""
    return ray.put(value) if isinstance(value, (list, dict)) else value


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Contiguous, nearly equal chunks (sizes differ by at most one; trailing chunks may be empty)."""
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate per-rank results: lists end to end, dicts of lists key by key."""
    if parts and isinstance(parts[0], dict):
        return {k: [item for p in parts for item in p[k]] for k in parts[0]}
    return [item for p in parts for item in p]


def first(parts: Sequence[Any]) -> Any:
    """Rank 0's result."""
    return parts[0]


def free_address(_actor: Any = None) -> tuple[str, int]:
    """This process's node address and a free TCP port there (run inside rank 0 via __ray_call__)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def node_address(_actor: Any = None) -> str:
    """This process's node address (run inside an actor via __ray_call__)."""
    return ray.util.get_node_ip_address()


def _set_env(_actor: Any, env: dict[str, str]) -> None:
    os.environ.update(env)


class ActorGroup:
    """N Ray actors of one class, placed together, called together.

    `cls` is a plain class (wrapped with `ray.remote` here). `args`/`kwargs` go to every rank's
    constructor; `env` is set in each actor process before the class is imported (use it for
    library switches such as VLLM_* variables). With `distributed=True` the group sets the
    torch.distributed variables in every rank after start; the class initialises its process
    group itself (e.g. in a `setup` method). `on_replace(group, rank)` runs after a dead rank was
    replaced, to restore its state. `resources`: custom Ray resources of each rank. Inside an
    enclosing placement group `bundles` names the bundle of each rank (default: any bundle).
    `actor_name` (namespace, prefix): rank r is the named actor `<prefix>-<r>` in that
    namespace (others find it by name).
    Ranks of a group that is not distributed are restartable: Ray restarts one lost with its
    node and retries its calls (they must be safe to repeat).
    """

    def __init__(
        self,
        cls: type,
        num_ranks: int,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        distributed: bool = False,
        env: dict[str, str] | None = None,
        name: str = "group",
        on_replace: Callable[[ActorGroup, int], None] | None = None,
        resources: dict[str, float] | None = None,
        bundles: list[int] | None = None,
        actor_name: tuple[str, str] | None = None,
        wait: bool = True,
    ):
        check_fits(name, num_ranks, num_cpus)
        self.name = name
        self.num_ranks = num_ranks
        self.distributed = distributed
        self.on_replace = on_replace
        self._args, self._kwargs = tuple(args), dict(kwargs or {})
        self._num_cpus, self._num_gpus = num_cpus, num_gpus
        self._resources, self._bundles = dict(resources or {}), bundles
        self.namespace, prefix = actor_name or (None, None)
        self.actor_names = [f"{prefix}-{rank}" for rank in range(num_ranks)] if prefix else None
        self._env = dict(env or {})
        self._remote_cls = ray.remote(cls)
        self._pg, self._owns_pg = self._reserve()
        self.actors: list[Any] = [self._create(rank) for rank in range(num_ranks)]
        self._starting = [a.__ray_ready__.remote() for a in self.actors]
        self._since = time.monotonic()
        if wait or distributed:  # ranks of a distributed group meet once all have started
            self.started(timeout_s=START_TIMEOUT_S)

    def started(self, timeout_s: float = 0.0) -> bool:
        """Whether every rank's constructor has returned, waiting up to `timeout_s`; raises
        its error, or StudyError when the ranks are not up START_TIMEOUT_S after creation.
        A group made with `wait=False` starts while its caller goes on; calls queue meanwhile."""
        if not self._starting:
            return True
        try:
            ready, pending = ray.wait(
                self._starting, num_returns=len(self._starting), timeout=timeout_s
            )
            if pending and time.monotonic() - self._since >= START_TIMEOUT_S:
                raise StudyError(
                    "",
                    self.name,
                    f"{len(pending)} of {self.num_ranks} actors did not start within "
                    f"{START_TIMEOUT_S:.0f} s (not enough free resources in the cluster or the "
                    "trial's placement group?)",
                )
            if pending:
                return False
            ray.get(ready)  # raises the constructor's error, if any
            if self.distributed:
                self._handshake()
        except Exception:
            self.shutdown()
            raise
        self._starting = []
        return True

    # ----- placement -------------------------------------------------------------------------
    def _reserve(self) -> tuple[PlacementGroup, bool]:
        """The enclosing trial's placement group, else a new one with one bundle per rank."""
        current = get_current_placement_group()
        if current is not None:
            return current, False
        bundle: dict[str, float] = {"CPU": self._num_cpus, **self._resources}
        if self._num_gpus:
            bundle["GPU"] = self._num_gpus
        pg = placement_group([dict(bundle) for _ in range(self.num_ranks)], strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            raise StudyError(
                "",
                self.name,
                f"could not reserve {self.num_ranks} x {bundle} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (other actors hold the cluster's resources)",
            )
        return pg, True

    def _create(self, rank: int) -> Any:
        index = rank if self._owns_pg else (self._bundles[rank] if self._bundles else -1)
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._pg,
            placement_group_bundle_index=index,
            placement_group_capture_child_tasks=True,
        )
        options: dict[str, Any] = {
            "num_cpus": self._num_cpus,
            "num_gpus": self._num_gpus,
            "resources": self._resources,
            "scheduling_strategy": strategy,
            "name": self.actor_names[rank] if self.actor_names else None,
        }
        if self.actor_names:
            options["namespace"] = self.namespace
        if not self.distributed:  # a lost node: Ray restarts the rank and retries its calls
            options.update(max_restarts=RESTARTS, max_task_retries=RESTARTS)
        if self._env:
            options["runtime_env"] = {"env_vars": self._env}
        return self._remote_cls.options(**options).remote(*self._args, **self._kwargs)

    def _handshake(self) -> None:
        """Rank 0 reports its address and a free port; every rank gets the torch.distributed env."""
        addr, port = ray.get(self.actors[0].__ray_call__.remote(free_address))
        nodes = ray.get([a.__ray_call__.remote(node_address) for a in self.actors])
        envs = []
        for rank, node in enumerate(nodes):
            # Ray gives each GPU actor only its own device, so its local device index is 0.
            local = 0 if self._num_gpus else nodes[:rank].count(node)
            envs.append(
                {
                    "MASTER_ADDR": addr,
                    "MASTER_PORT": str(port),
                    "RANK": str(rank),
                    "WORLD_SIZE": str(self.num_ranks),
                    "LOCAL_RANK": str(local),
                    "LOCAL_WORLD_SIZE": str(nodes.count(node)),
                }
            )
        ray.get([a.__ray_call__.remote(_set_env, e) for a, e in zip(self.actors, envs)])

    # ----- calls -----------------------------------------------------------------------------
    def run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`method`, a @dispatch method of the worker class, on the ranks as it declares
        (actors/dispatch.py); arguments are checked here, before anything is sent.

        In a group that is not distributed, a dead rank is replaced and the call retried once.
        """
        mode = mode_of(method)
        check_call(method, args, kwargs)
        name = method.__name__
        if mode in (ALL, RANK0, REF0):  # the same rows for every rank: one copy in the store
            args = tuple(shared(a) for a in args)
            kwargs = {k: shared(v) for k, v in kwargs.items()}
        if mode is REF0:  # every rank takes part (a gather); rank 0's result stays in the store
            refs = self._start(name, args, kwargs)
            ray.wait(refs, num_returns=len(refs))
            return refs[0]
        if mode in (SPLIT, SPLIT_RANK0):
            combine = first if mode is SPLIT_RANK0 else concat
            return self._retried(lambda: combine(ray.get(self._start_split(name, args, kwargs))))
        results = self._retried(lambda: ray.get(self._start(name, args, kwargs)))
        return results[0] if mode is RANK0 else results

    def _start(self, name: str, args: tuple, kwargs: dict) -> list[ray.ObjectRef]:
        return [getattr(a, name).remote(*args, **kwargs) for a in self.actors]

    def _start_split(self, name: str, args: tuple, kwargs: dict) -> list[ray.ObjectRef]:
        """`args[0]` split into one contiguous chunk per rank (a list per item, or a dict of
        such lists, comes back from each)."""
        chunks = split_evenly(args[0], self.num_ranks)
        return [
            getattr(a, name).remote(c, *args[1:], **kwargs) for a, c in zip(self.actors, chunks)
        ]

    def _retried(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except RayActorError:
            if self.distributed or not self.replace_dead():
                raise
            return call()

    # ----- fault tolerance -------------------------------------------------------------------
    def dead_ranks(self, timeout_s: float = 30.0) -> list[int]:
        """Ranks whose actor no longer answers."""
        dead = []
        for rank, actor in enumerate(self.actors):
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
            except RayActorError:
                dead.append(rank)
        return dead

    def replace_dead(self) -> list[int]:
        """Recreate every dead rank with the original arguments; returns the replaced ranks.

        A distributed group cannot swap one rank under a live process group: restart it whole.
        """
        dead = self.dead_ranks()
        if dead and self.distributed:
            raise RuntimeError(
                f"{self.name}: ranks {dead} died; a distributed group must be restarted as a whole"
            )
        for rank in dead:
            self.actors[rank] = self._create(rank)
            ray.get(self.actors[rank].__ray_ready__.remote())
            if self.on_replace is not None:
                self.on_replace(self, rank)
        return dead

    def shutdown(self) -> None:
        """Kill the actors and give back the placement group this group reserved."""
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._owns_pg:
            remove_placement_group(self._pg)
            self._owns_pg = False


def resolve_device(device: str = "auto") -> str:
    """'cuda' or 'cpu'; 'auto' picks cuda when the Ray cluster (or this process) has a GPU."""
    if device == "auto":
        import torch

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class Placement:
    """Where a group's ranks run: the device, CPUs and GPU share of each rank, custom Ray
    resources, inside an enclosing placement group the bundle of each rank, and the threads
    of each rank's math libraries (OMP_NUM_THREADS; None: Ray's default, the rank's CPUs)."""

    device: str = "auto"
    cpus: float = 1.0
    gpus: float = 1.0  # share of a GPU per rank, on a CUDA device
    resources: dict[str, float] = field(default_factory=dict)
    bundles: list[int] | None = None
    threads: int | None = None


class ModelGroup:
    """Ranks of one actor class that each start from a model directory (learner ranks,
    rollout engines): `worker(model_dir, spec, device, seed)` per rank, in one ActorGroup."""

    worker: type
    name = "group"
    distributed = False
    set_up = False  # the worker's `setup` runs on every rank once they started (else shut down)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        bind_worker_methods(cls, cls.worker)  # the worker's @dispatch methods, typed

    def __init__(
        self,
        model_dir: str | Path,
        spec: Any,
        placement: Placement | None = None,
        seed: int = 0,
        actor_name: tuple[str, str] | None = None,
        wait: bool = True,
    ):
        placement = placement or Placement()
        self.spec, self.device = spec, resolve_device(placement.device)
        self.check(model_dir, placement.cpus)
        self.group = ActorGroup(
            self.worker,
            self.ranks,
            args=(str(model_dir), spec, self.device, seed),
            num_cpus=placement.cpus,
            num_gpus=placement.gpus if self.device == "cuda" else 0.0,
            resources=placement.resources,
            bundles=placement.bundles,
            distributed=self.distributed,
            name=self.name,
            actor_name=actor_name,
            env={"OMP_NUM_THREADS": str(placement.threads)} if placement.threads else None,
            wait=wait,
        )
        if self.set_up:
            try:
                self.setup()
            except Exception:
                self.group.shutdown()
                raise

    @property
    def ranks(self) -> int:
        raise NotImplementedError

    def check(self, model_dir: str | Path, cpus: float) -> None:
        """Raise StudyError (one sentence) when the ranks could not start."""

    @property
    def actors(self) -> list[Any]:
        return self.group.actors

    def shutdown(self) -> None:
        self.group.shutdown()
