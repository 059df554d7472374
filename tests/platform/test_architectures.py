"""The architecture matrix: tiny random models of popular HF architectures, each with a BPE
tokenizer trained here and a chat template, run a study end to end on vLLM + DeepSpeed.

Per architecture: an SFT stage and a GRPO stage on chat-rendered rows, a GA unlearning branch,
evaluation after every stage. The GRPO steps compare the engine's log-probs of its sampled
tokens with the learner's on the same tokens (`logprob_gap`, mean absolute difference).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stageflow.core.arch_models import build_arch_model, task_corpus, train_bpe_tokenizer
from stageflow.platform.commands.cli import main
from stageflow.platform.engine.tracking import default_tracking_uri

# Eight that differ in layout: tied embeddings and QKV biases (qwen2), QK-norm (qwen3, olmo2),
# fused QKV and gate-up projections (phi3), parallel residual and partial rotary (gpt_neox),
# soft-capped attention scores and logits with sliding windows (gemma2), sliding windows with
# QK-norm and two rope bases (gemma3_text). mistral is built the same way
# (arch_models.ARCHITECTURES) and is left out for time.
ARCHITECTURES = ["llama", "qwen2", "qwen3", "phi3", "olmo2", "gpt_neox", "gemma2", "gemma3_text"]
# Mean |log p_engine - log p_learner| over sampled tokens, float32 on both sides: vLLM's CPU
# attention and transformers' attention differ in summation order only (about 2e-7 measured).
# Tight enough to fail where one side skips a transform: Gemma2 learner on SDPA, which ignores
# its attention soft cap, was 8e-4 from vLLM.
LOGPROB_TOLERANCE = 1e-4
FACTS = {"task": "facts", "size": 16}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    tokenizer = train_bpe_tokenizer(task_corpus())
    root = tmp_path_factory.mktemp("zoo")
    return {a: build_arch_model(a, root / a, tokenizer=tokenizer) for a in ARCHITECTURES}


def study_file(tmp_path: Path, arch: str, model_dir: Path) -> Path:
    sft = {"steps": 4, "batch_size": 8, "lr": 1e-3}
    study = {
        "name": f"arch-{arch}",
        "storage_dir": str(tmp_path / "runs"),
        "model": {"path": str(model_dir)},
        "stages": {
            "facts": {"kind": "sft", "data": FACTS, **sft},
            "math": {
                "kind": "grpo",
                "data": {"task": "math", "size": 16},
                "steps": 2,
                "batch_size": 4,
                "lr": 1e-4,
                "params": {"group_size": 4, "max_new_tokens": 12},
                "rewards": [{"name": "math_correct"}],
            },
            "ga": {"kind": "unlearn", "objective": "ga", "data": FACTS, **sft, "steps": 2},
        },
        "orderings": {"explicit": ["facts>math"]},
        "unlearning": ["ga"],
        "seeds": [0],
        "evaluation": {
            "sets": {
                "facts": {
                    "data": FACTS,
                    "metrics": ["accuracy", "avg_loglik"],
                    "max_examples": 4,
                    "max_new_tokens": 8,
                    "temperature": 0.0,
                }
            }
        },
        "learner": {"ranks": 1, "zero_stage": 1},
        "rollout": {"backend": "vllm", "workers": 1, "max_model_len": 256},
    }
    path = tmp_path / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_learner_reads_every_decoder_layers_output(arch, zoo):
    """What RMU reads: the policy's decoder-layer states equal transformers' hidden states (the
    output of layer l is hidden_states[l + 1] below the last layer, whose entry is after the
    final norm), at the target positions, in one forward with the log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stageflow.actors.batching import collate_rows
    from stageflow.actors.policy import PolicyModule, decoder_layers
    from stageflow.core.models import attention_implementation

    lm = AutoModelForCausalLM.from_pretrained(
        zoo[arch], dtype=torch.float32, attn_implementation=attention_implementation(zoo[arch])
    ).eval()
    batch = collate_rows(
        AutoTokenizer.from_pretrained(zoo[arch]),
        [{"prompt": "Q: where? ", "answer": "in Bellin"}, {"prompt": "Q: who?", "answer": "x"}],
        64,
    )
    with torch.no_grad():
        want = lm(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        policy = PolicyModule(lm)
        layers = len(decoder_layers(lm))
        assert layers == 2
        for layer in range(layers - 1):
            got = policy.layer_states(batch.input_ids, batch.attention_mask, layer)
            torch.testing.assert_close(got, want.hidden_states[layer + 1][:, 1:])
        logprobs, states = policy(batch.input_ids, batch.attention_mask, batch.mask, layer=1)
        last = policy.layer_states(batch.input_ids, batch.attention_mask, 1)
        assert logprobs.shape == batch.mask.shape and torch.equal(states, last)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_runs_a_chat_study(arch, zoo, tmp_path, ray_cluster):
    assert main(["run", str(study_file(tmp_path, arch, zoo[arch]))]) == 0
    storage = tmp_path / "runs"
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    assert len(records) == 1
    metrics = records[0]["metrics"]
    # evaluated after facts, after math and after the GA branch, every value a number
    assert {"facts/avg_loglik", "ga/facts/avg_loglik"} <= set(metrics), sorted(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    client = MlflowClient(default_tracking_uri(storage))
    experiment = client.get_experiment_by_name(f"arch-{arch}")
    stage_runs = client.search_runs(
        [experiment.experiment_id], "tags.`stageflow.kind` = 'stage'", max_results=100
    )
    gaps = [
        m.value
        for run in stage_runs
        for key in run.data.metrics
        if key.endswith("logprob_gap")
        for m in client.get_metric_history(run.info.run_id, key)
    ]
    assert len(gaps) == 2, "one log-prob gap per GRPO step"
    assert max(gaps) < LOGPROB_TOLERANCE, gaps
    # learner.zero_stage 1 at one rank: the engine ran without ZeRO, and each stage run says so
    assert {run.data.params["zero_stage"] for run in stage_runs} == {"0"}


def test_vllm_receives_the_chat_templates_prompt_ids(zoo, ray_cluster):
    """The rollout engine samples from exactly the ids `apply_chat_template` gives."""
    from transformers import AutoTokenizer

    from stageflow.actors.group import Placement
    from stageflow.actors.rollout import RolloutGroup
    from stageflow.core.config import RolloutSpec

    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Where was Ann born?"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(zoo["qwen2"])
    expected = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    spec = RolloutSpec(workers=1, max_model_len=256, kv_cache_gib=0.25)
    group = RolloutGroup(zoo["qwen2"], spec, Placement(device="cpu"), seed=0)
    try:
        out = group.generate([messages, "plain text"], max_tokens=4, temperature=0.0)
    finally:
        group.shutdown()
    assert out["prompt_token_ids"][0] == list(expected)
    assert out["prompt_token_ids"][1] == tokenizer("plain text")["input_ids"]


@pytest.mark.slow
def test_bring_your_own_study(tmp_path, monkeypatch, ray_cluster):
    """studies/bring_your_own.yaml on the example it documents: a chat model directory, parquet
    and save_to_disk data with their own columns, LoRA; checkpoints hold merged weights and
    the stage's adapter."""
    from stageflow.core.arch_models import write_example

    study = Path(__file__).parents[2] / "studies" / "bring_your_own.yaml"
    write_example(tmp_path)
    monkeypatch.chdir(tmp_path)
    overrides = ["stages.math.steps=4", "stages.facts.steps=4", "stages.ga.steps=2"]
    assert main(["run", str(study), *overrides]) == 0
    storage = tmp_path / "runs" / "bring_your_own"
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    assert len(records) == 2
    for record in records:
        metrics = record["metrics"]
        assert {"math/accuracy", "forget/avg_loglik", "ga/forget/avg_loglik"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
    checkpoints = [p.parent for p in (storage / "prefixes").rglob("adapter_config.json")]
    assert len(checkpoints) >= 4  # math, facts, then the other stage after each, and GA
    for adapter in checkpoints:
        assert (adapter / "adapter_model.safetensors").is_file()
        assert (adapter.parent / "model.safetensors").is_file()
