"""ActorGroup: placement, the torch.distributed handshake, calls dispatched as the worker method
declares (actors/dispatch.py), dead-rank replacement."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
from ray import cloudpickle
from ray.exceptions import RayActorError

from stageflow.actors.dispatch import ALL, RANK0, SPLIT, SPLIT_RANK0, dispatch
from stageflow.actors.group import ActorGroup, split_evenly
from stageflow.core.config import StudyError

# Ray workers cannot import this test module by name: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Echo:
    """A tiny actor class: reports its env and echoes chunks."""

    def __init__(self, tag: str = "x"):
        self.tag = tag

    @dispatch(ALL)
    def env(self) -> dict:
        keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        return {k: os.environ.get(k) for k in keys}

    @dispatch(ALL)
    def pid(self) -> int:
        return os.getpid()

    @dispatch(RANK0)
    def first_pid(self) -> int:
        return os.getpid()

    @dispatch(SPLIT)
    def double(self, chunk: list[int]) -> list[int]:
        return [2 * x for x in chunk]

    @dispatch(SPLIT)
    def as_dict(self, chunk: list[int]) -> dict:
        return {"x": chunk, "tag": [self.tag] * len(chunk)}

    @dispatch(ALL)
    def placement(self) -> str | None:
        pg = ray.util.get_current_placement_group()
        return None if pg is None else pg.id.hex()


def kill(actor, timeout_s: float = 60.0) -> None:
    """ray.kill, then wait until the actor is really gone (the kill lands asynchronously)."""
    ray.kill(actor)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except RayActorError:
            return
        time.sleep(0.2)
    raise TimeoutError("the killed actor still answers")


def test_split_evenly_keeps_order_and_sizes():
    assert split_evenly(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_distributed_env_and_calls(ray_cluster):
    group = ActorGroup(Echo, 2, args=("t",), num_cpus=0.5, distributed=True, name="echo")
    try:
        envs = group.run(Echo.env)
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
        assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
        assert group.run(Echo.double, [1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
        assert group.run(Echo.as_dict, [1, 2, 3]) == {"x": [1, 2, 3], "tag": ["t"] * 3}
        # a group that reserved its own placement group puts each rank in it
        assert len(set(group.run(Echo.placement))) == 1
    finally:
        group.shutdown()


def test_dead_rank_is_replaced(ray_cluster):
    replaced = []
    group = ActorGroup(
        Echo, 2, num_cpus=0.5, name="echo", on_replace=lambda g, rank: replaced.append(rank)
    )
    try:
        old = group.run(Echo.pid)
        kill(group.actors[1])
        assert group.run(Echo.double, [1, 2]) == [2, 4]  # retried after replacement
        new = group.run(Echo.pid)
        assert new[0] == old[0] and new[1] != old[1]
        assert replaced == [1]
    finally:
        group.shutdown()


def test_distributed_group_refuses_single_rank_replacement(ray_cluster):
    group = ActorGroup(Echo, 2, num_cpus=0.5, distributed=True, name="echo")
    try:
        kill(group.actors[0])
        with pytest.raises(RuntimeError, match="restarted as a whole"):
            group.replace_dead()
    finally:
        group.shutdown()


@ray.remote(num_cpus=0)
class _Trial:
    """Stands in for a Tune trial: it runs in a placement group and builds a group inside it."""

    def run(self) -> tuple[str, list]:
        group = ActorGroup(Echo, 2, num_cpus=0.5, name="inner")
        try:
            return ray.util.get_current_placement_group().id.hex(), group.run(Echo.placement)
        finally:
            group.shutdown()


def test_group_lands_in_enclosing_placement_group(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}])
    ray.get(pg.ready())
    try:
        trial = _Trial.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            )
        ).remote()
        outer, inner = ray.get(trial.run.remote())
        assert inner == [outer, outer] == [pg.id.hex()] * 2
    finally:
        remove_placement_group(pg)


def test_more_ranks_than_cpus_fails_before_any_actor(ray_cluster):
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(StudyError, match="CPUs"):
        ActorGroup(Echo, int(cpus) + 1, num_cpus=1.0, name="learner.ranks")


class ThreadProbe:
    """A model-group worker that reports its math-library threads."""

    def __init__(self, model_dir: str, spec, device: str, seed: int):
        pass

    @dispatch(ALL)
    def threads(self) -> tuple[int, str | None]:
        import torch

        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def test_placement_threads_reach_the_ranks(ray_cluster, tmp_path):
    from stageflow.actors.group import ModelGroup, Placement

    class Probes(ModelGroup):
        worker, name, ranks = ThreadProbe, "probe", 1

    default = Probes(tmp_path, None, Placement("cpu"))
    chosen = Probes(tmp_path, None, Placement("cpu", threads=2))
    try:
        assert default.threads() == [(1, "1")]  # Ray's default: the rank's CPUs
        assert chosen.threads() == [(2, "2")]
    finally:
        default.group.shutdown()
        chosen.group.shutdown()


def test_group_methods_are_the_workers_with_their_signatures():
    """A group's method is its worker's @dispatch method (same signature and docstring); a wrong
    call fails in the caller; a method without a declared dispatch cannot be called."""
    import inspect

    from stageflow.actors.dispatch import check_call, mode_of
    from stageflow.actors.learner import LearnerGroup
    from stageflow.actors.learner_worker import LearnerWorker
    from stageflow.actors.rollout import RolloutGroup, RolloutWorker

    for group, worker, name in [
        (LearnerGroup, LearnerWorker, "logprobs"),
        (LearnerGroup, LearnerWorker, "load"),
        (RolloutGroup, RolloutWorker, "info"),
    ]:
        assert inspect.signature(getattr(group, name)) == inspect.signature(getattr(worker, name))
        assert getattr(group, name).__doc__ == getattr(worker, name).__doc__
    assert mode_of(LearnerWorker.step) is SPLIT_RANK0 and mode_of(LearnerWorker.save) is RANK0
    with pytest.raises(TypeError):
        check_call(LearnerWorker.logprobs, ([],), {"bogus": 1})
    with pytest.raises(TypeError, match="not declared"):
        mode_of(Echo.__init__)


def test_rank0_and_wrong_calls(ray_cluster):
    group = ActorGroup(Echo, 2, num_cpus=0.5, name="echo")
    try:
        assert group.run(Echo.first_pid) == group.run(Echo.pid)[0]
        with pytest.raises(TypeError):
            group.run(Echo.double)  # no chunk: refused before any rank is called
    finally:
        group.shutdown()
