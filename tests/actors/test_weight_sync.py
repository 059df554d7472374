"""Weight sync learner -> rollout: after a sync vLLM's log-probs equal the learner's (fp32)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from stageflow.actors.weight_sync import (
    ORPHAN_AGE_S,
    SHM_PREFIX,
    WeightSync,
    read_shared_weights,
    release_shared_weights,
    sweep_orphaned_weights,
    write_shared_weights,
)
from stageflow.core.config import StageSpec


@pytest.mark.parametrize("transport", ["object_store", "shm"])
def test_logprobs_match_after_sync(
    learner, rollout, actor_model_dir, qa_rows, transport, logprob_gap
):
    learner.load(actor_model_dir)
    rollout.load_model(actor_model_dir)
    assert logprob_gap(learner, rollout) < 1e-3  # same base weights on both sides
    learner.train_stage(StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=6), qa_rows)
    assert logprob_gap(learner, rollout) > 1e-2  # the learner moved, the rollout did not
    sync = WeightSync(learner, rollout, transport)
    try:
        stats = sync.sync()
        assert stats["tensors"] == 21 and stats["bytes"] > 0
        after = logprob_gap(learner, rollout)
        print(f"{transport}: max |vLLM - learner| after sync {after:.2e}; {stats}")
        assert after < 1e-3
        learner.train_stage(StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=2), qa_rows)
        sync.sync()  # the same file / path again
        assert logprob_gap(learner, rollout) < 1e-3
    finally:
        sync.close()


def test_auto_transport_is_shm_on_one_node(learner, rollout):
    sync = WeightSync(learner, rollout)
    assert sync.transport == "shm"


def test_kept_versions_take_shared_memory_slots_in_turn(learner, rollout, actor_model_dir, qa_rows):
    """Asynchronous RL keeps the last n versions readable: n files, written in turn, each
    holding its version until a newer one takes its slot; close removes them all."""
    import os

    learner.load(actor_model_dir)
    sync = WeightSync(learner, rollout, "shm")
    sync.keep_versions(3)
    try:
        paths, states = [], []
        for _ in range(4):
            paths.append(sync.publish().shm_path)
            states.append({k: v.clone() for k, v in learner.state_dict().items()})
            learner.train_stage(StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=1), qa_rows)
        assert len(set(paths[:3])) == 3 and paths[3] == paths[0]
        for path, version in ((paths[1], 1), (paths[2], 2), (paths[0], 3)):
            held = read_shared_weights(path)
            assert all(torch.equal(held[k], states[version][k]) for k in states[version])
        assert not torch.equal(
            states[0]["model.embed_tokens.weight"], states[3]["model.embed_tokens.weight"]
        )
    finally:
        sync.close()
    assert not any(os.path.exists(p) for p in paths)
    with pytest.raises(ValueError, match="asynchronous RL"):
        WeightSync(learner, rollout, "nccl").keep_versions(2)


def test_shared_file_round_trip(tmp_path):
    state = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2),
    }
    path = str(tmp_path / "weights")
    write_shared_weights(path, state)
    state["a"] += 1  # rewritten in place on the next write
    write_shared_weights(path, state)
    back = read_shared_weights(path)
    assert list(back) == list(state)
    for name in state:
        assert back[name].dtype == state[name].dtype
        assert torch.equal(back[name], state[name])
    release_shared_weights(path)


WRITER = """
import sys, time, torch
from stageflow.actors.weight_sync import write_shared_weights
write_shared_weights(sys.argv[1], {"w": torch.ones(4)})
print("written", flush=True)
time.sleep(600)
"""


def test_a_killed_writers_file_is_swept_a_living_ones_kept(tmp_path):
    old = time.time() - 2 * ORPHAN_AGE_S
    writers = {}
    for name in ("killed", "alive"):
        path = tmp_path / f"{SHM_PREFIX}{name}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"written"
        os.utime(path, (old, old))
        writers[name] = (path, proc)
    killed, alive = writers["killed"], writers["alive"]
    try:
        killed[1].kill()  # SIGKILL: no close, no atexit
        killed[1].wait()
        assert sweep_orphaned_weights(str(tmp_path)) == [str(killed[0])]
        assert not killed[0].exists() and alive[0].exists()  # a living writer's file stays
    finally:
        alive[1].kill()
        alive[1].wait()
    assert sweep_orphaned_weights(str(tmp_path)) == [str(alive[0])]


@pytest.fixture(scope="module")
def cuda_pair(ray_cluster, actor_model_dir):
    """A learner rank and a vLLM engine on two GPUs of their own (NCCL needs one per rank)."""
    from stageflow.actors.group import Placement
    from stageflow.actors.learner import LearnerGroup
    from stageflow.actors.rollout import RolloutGroup
    from stageflow.core.config import LearnerSpec, RolloutSpec

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices (an NCCL broadcast from a learner GPU to an engine GPU)")
    gpu = Placement(device="cuda")
    engine = RolloutGroup(
        actor_model_dir, RolloutSpec(max_model_len=256, gpu_memory_utilization=0.3), gpu
    )
    learner = LearnerGroup(actor_model_dir, LearnerSpec(ranks=1, zero_stage=0), gpu)
    yield learner, engine
    learner.shutdown()
    engine.shutdown()


@pytest.mark.gpu
def test_nccl_broadcast_sync(cuda_pair, qa_rows, logprob_gap):
    from stageflow.actors.weight_sync import NcclWeightSync

    learner, engine = cuda_pair
    sync = NcclWeightSync(learner, engine)
    learner.train_stage(StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=2), qa_rows)
    assert logprob_gap(learner, engine) > 1e-2
    sync.sync()
    assert logprob_gap(learner, engine) < 1e-3
