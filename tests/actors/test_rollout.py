"""Rollout workers: vLLM generation with log-probs, one engine across stages, dead-worker recovery."""

from __future__ import annotations

import dataclasses
import time

import psutil
import pytest
import ray
import torch

from stageflow.core.config import RolloutSpec, StageSpec
from tests.actors.conftest import CPU, ROLLOUT_OPTIONS

PROMPTS = ["Q1: name? ", "Q2: name? ", "abc"]


def test_generate_shapes_and_backend(rollout):
    out = rollout.generate(PROMPTS, n=2, temperature=1.0, max_tokens=12, seed=3)
    assert len(out["texts"]) == len(out["token_ids"]) == len(out["logprobs"]) == len(PROMPTS)
    for texts, ids, lps in zip(out["texts"], out["token_ids"], out["logprobs"]):
        assert len(texts) == len(ids) == len(lps) == 2
        for seq, lp in zip(ids, lps):
            assert 1 <= len(seq) <= 12 and len(lp) == len(seq)
            assert all(v <= 0.0 for v in lp)
    info = rollout.info()[0]
    assert info["backend"] == "vllm" and info["engine"].startswith("vllm")
    assert info["device"] == "cpu" and info["logprobs_mode"] == "processed_logprobs"
    # same seed, same samples
    again = rollout.generate(PROMPTS, n=2, temperature=1.0, max_tokens=12, seed=3)
    assert again["token_ids"] == out["token_ids"]


@pytest.mark.slow
def test_an_engine_in_the_actor_samples_as_one_in_its_own_processes(rollout, actor_model_dir):
    """`rollout.engine_process`: on CPU vLLM runs in the rollout actor's process by default;
    with the same seed it draws the same tokens, with the same log-probs, as vLLM in its own
    engine-core and worker processes."""
    from stageflow.actors.rollout import RolloutGroup
    from stageflow.actors.weight_sync import Weights

    spec = dataclasses.replace(ROLLOUT_OPTIONS, engine_process="separate")
    base = Weights.of_dir(actor_model_dir)
    sampling = {"n": 2, "temperature": 1.0, "max_tokens": 12, "seed": 3}
    separate = RolloutGroup(actor_model_dir, spec, CPU, seed=0)
    try:
        theirs, their_info = separate.generate(PROMPTS, base, **sampling), separate.info()[0]
    finally:
        separate.shutdown()
    ours, our_info = rollout.generate(PROMPTS, base, **sampling), rollout.info()[0]
    assert (
        our_info["engine_pid"] == our_info["pid"] and "in the actor's process" in our_info["engine"]
    )
    assert their_info["engine_pid"] != their_info["pid"] and "own processes" in their_info["engine"]
    assert ours["token_ids"] == theirs["token_ids"]
    flat = [
        [v for samples in lps for seq in samples for v in seq]
        for lps in (ours["logprobs"], theirs["logprobs"])
    ]
    torch.testing.assert_close(torch.tensor(flat[0]), torch.tensor(flat[1]), atol=1e-5, rtol=0)


def _scaled_model(src, dst, scale: float):
    """A copy of `src` whose weights are multiplied by `scale` (same architecture)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = {k: v * scale for k, v in load_file(src / "model.safetensors").items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_two_stages_reuse_one_engine(rollout, learner, actor_model_dir, qa_rows, tmp_path):
    before = rollout.info()[0]
    seq, n_prompt = [1, 30, 31, 32, 33, 34, 35], 2
    stage_a = _scaled_model(actor_model_dir, tmp_path / "a", 1.1)
    learner.load(actor_model_dir)  # stage b: a checkpoint the learner wrote after training
    learner.train_stage(StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=2), qa_rows)
    stage_b = learner.save(tmp_path / "b")
    scores = []
    for model_dir in (stage_a, stage_b, actor_model_dir):
        rollout.load_model(model_dir)
        rollout.generate(PROMPTS[:1], n=1, max_tokens=4)
        scores.append(ray.get(rollout.actors[0].score.remote([seq], [n_prompt]))[0])
    after = rollout.info()[0]
    assert after["engine_starts"] == before["engine_starts"] == 1
    assert after["pid"] == before["pid"]
    assert after["weights_version"] >= before["weights_version"] + 3
    assert scores[0] != scores[1]  # the weights really changed
    # back on the base model, vLLM's teacher-forced log-probs match transformers
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(actor_model_dir)
    with torch.no_grad():
        logits = lm(torch.tensor([seq])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scores[2]), expected[n_prompt - 1 :], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_killed_worker_is_replaced_with_latest_weights(rollout, actor_model_dir, tmp_path):
    scaled = _scaled_model(actor_model_dir, tmp_path / "s", 1.2)
    rollout.load_weights((scaled / "model.safetensors").read_bytes())
    seq = [1, 40, 41, 42, 43]
    before = ray.get(rollout.actors[0].score.remote([seq], [2]))[0]
    old = rollout.info()[0]
    ray.kill(rollout.actors[0])
    out = rollout.generate(PROMPTS, n=1, max_tokens=8)  # replaced and retried inside the group
    assert len(out["token_ids"]) == len(PROMPTS)
    info = rollout.info()[0]
    assert info["pid"] != old["pid"] and info["engine_starts"] == 1
    # the killed actor's engine process does not outlive it
    deadline = time.monotonic() + 30
    while psutil.pid_exists(old["engine_pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not psutil.pid_exists(old["engine_pid"])
    after = ray.get(rollout.actors[0].score.remote([seq], [2]))[0]
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), atol=1e-5, rtol=0)
    rollout.load_model(actor_model_dir)


def test_hf_backend_is_explicit_and_matches_its_logprobs(actor_model_dir):
    from transformers import AutoModelForCausalLM

    from stageflow.actors.rollout import RolloutWorker

    worker = RolloutWorker(actor_model_dir, RolloutSpec(backend="hf"), device="cpu")
    assert worker.info()["backend"] == "hf" and worker.info()["engine"] == "transformers generate"
    out = worker.generate(PROMPTS[:2], n=2, temperature=1.0, max_tokens=6, seed=0)
    lm = AutoModelForCausalLM.from_pretrained(actor_model_dir)
    for prompt_ids, samples, lps in zip(out["prompt_token_ids"], out["token_ids"], out["logprobs"]):
        for seq, lp in zip(samples, lps):
            ids = torch.tensor([prompt_ids + seq])
            with torch.no_grad():
                logits = lm(ids).logits[0, len(prompt_ids) - 1 : -1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lp), expected, atol=1e-4, rtol=0)
