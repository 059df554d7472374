"""A trial's placement group per rollout placement, and its time breakdown (no Ray needed)."""

from __future__ import annotations

import dataclasses
import time

from stageflow.core.config import (
    DataSpec,
    EvalSetSpec,
    EvaluationSpec,
    LearnerSpec,
    ResourcesSpec,
    RolloutSpec,
    StudySpec,
)
from stageflow.core.registry import load_plugins
from stageflow.platform.engine.workers import Stopwatch, trial_bundles

load_plugins()


def spec(placement: str, device: str = "cpu") -> StudySpec:
    sampled = EvalSetSpec(data=DataSpec(task="inst", split="eval"), metrics=["accuracy"])
    return StudySpec(
        name="x",
        evaluation=EvaluationSpec(sets={"inst": sampled}),
        learner=LearnerSpec(ranks=2),
        rollout=RolloutSpec(placement=placement, workers=2),
        resources=ResourcesSpec(device=device, cpus_per_actor=1.0),
    )


def test_trial_bundles_per_placement():
    unsampled = dataclasses.replace(spec("per_trial"), evaluation=EvaluationSpec())
    assert trial_bundles(unsampled) == [{"CPU": 1.0}] * 3  # no engines where nothing samples
    assert trial_bundles(spec("shared")) == [{"CPU": 1.0}] * 3  # trial + 2 learner ranks
    assert trial_bundles(spec("per_trial")) == [{"CPU": 1.0}] * 5  # + 2 own engines
    gpu = [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert trial_bundles(spec("per_trial", "cuda")) == gpu
    # colocated: each engine shares its learner rank's bundle (and GPU)
    assert (
        trial_bundles(spec("colocated", "cuda")) == [{"CPU": 1.0}] + [{"CPU": 2.0, "GPU": 1.0}] * 2
    )
    one = dataclasses.replace(spec("colocated", "cuda"), rollout=RolloutSpec(placement="colocated"))
    assert trial_bundles(one) == [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]


def test_stopwatch_breakdown():
    clock = Stopwatch()
    with clock("train"):
        time.sleep(0.05)
    clock.add("in_optimizer_steps", 0.04)  # a part of train: not counted twice
    with clock("tracking"):
        time.sleep(0.01)
    out = clock.breakdown()
    assert out["time/train_s"] >= 0.05 and out["time/in_optimizer_steps_s"] == 0.04
    assert out["time/wall_s"] >= out["time/train_s"] + out["time/tracking_s"]
    counted = out["time/train_s"] + out["time/tracking_s"]
    assert abs(out["time/other_s"] - (out["time/wall_s"] - counted)) < 1e-6


def test_threads_share_one_machine_among_the_trials_at_once(monkeypatch):
    from stageflow.platform.engine.runner import actor_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    two_ranks = spec("shared")
    assert actor_threads(two_ranks, concurrent=1, embedded=True) == 4  # 8 cores, 2 ranks
    assert actor_threads(two_ranks, concurrent=2, embedded=True) == 2
    assert actor_threads(two_ranks, concurrent=8, embedded=True) == 1  # never fewer than one
    assert actor_threads(two_ranks, concurrent=1, embedded=False) is None  # a cluster: Ray's
    chosen = ResourcesSpec(device="cpu", threads_per_actor=3)
    assert actor_threads(dataclasses.replace(two_ranks, resources=chosen), 1, True) == 3
