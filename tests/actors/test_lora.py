"""LoRA learners (actors/lora.py): a stage trains its adapter alone; rollout engines,
checkpoints and pi_ref see the merged weights W + (alpha / r) B A."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import ray
import torch
from safetensors.torch import load_file

from stageflow.actors.group import Placement
from stageflow.actors.rendering import Completion
from stageflow.core.config import LearnerSpec, LoraSpec, StageSpec

LORA = LoraSpec(r=4, alpha=8.0, dropout=0.1)
SCALE = LORA.alpha / LORA.r
SFT = StageSpec(kind="sft", lr=1e-2, batch_size=4, steps=4, max_len=64)
# half a CPU per rank: the session's learner and engine keep theirs while this module runs
HALF_CPU = Placement(device="cpu", cpus=0.5, threads=1)


@pytest.fixture(scope="module")
def lora_learner(ray_cluster, actor_model_dir):
    """Two DeepSpeed ranks (ZeRO-2) training LoRA adapters."""
    from stageflow.actors.learner import LearnerGroup

    spec = LearnerSpec(ranks=2, zero_stage=2, lora=LORA)
    group = LearnerGroup(actor_model_dir, spec, HALF_CPU, seed=0)
    yield group
    group.shutdown()


def live_state(group) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rank 0's policy tensors as they are (`.base_layer`, `lora_A`, `lora_B`) and the names of
    those that train."""

    def read(worker):  # runs in the rank's process (a closure: Ray sends it by value)
        state = {k: v.detach().clone() for k, v in worker.policy.lm.state_dict().items()}
        return state, [n for n, p in worker.policy.lm.named_parameters() if p.requires_grad]

    return ray.get(group.actors[0].__ray_call__.remote(read))


def adapter_init(actor_model_dir, stage: StageSpec) -> dict[str, torch.Tensor]:
    """The A and B a learner of seed 0 draws at the start of `stage`, drawn again here."""
    from transformers import AutoModelForCausalLM

    from stageflow.actors.lora import adapter_seed, attach_adapter

    lm = AutoModelForCausalLM.from_pretrained(actor_model_dir)
    attach_adapter(lm, LORA, adapter_seed(0, stage), None)
    return {k: v.detach().clone() for k, v in lm.state_dict().items() if ".lora_" in k}


def test_a_lora_stage_trains_the_adapter_alone(lora_learner, actor_model_dir, qa_rows):
    base = load_file(actor_model_dir / "model.safetensors")
    lora_learner.load(actor_model_dir)
    losses = [m["loss"] for m in lora_learner.train_stage(SFT, qa_rows, seed=0)]
    assert losses[-1] < losses[0]
    live, trainable = live_state(lora_learner)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {k.replace(".base_layer.", ".") for k in live if ".base_layer." in k}
    # all-linear: the 7 projections of each layer, never the LM head (nor the embeddings)
    assert adapted == {k for k in base if k.endswith("_proj.weight")} and len(adapted) == 14
    for name, weight in base.items():  # the base weights did not move, not by one bit
        live_name = name.replace(".weight", ".base_layer.weight") if name in adapted else name
        assert torch.equal(live[live_name], weight), name
    init = adapter_init(actor_model_dir, SFT)
    assert set(init) == {k for k in live if ".lora_" in k}
    for name, value in init.items():  # A drawn from the stage's seed, B from zero: both moved
        assert not torch.equal(live[name], value), name
        assert ".lora_A." in name or not value.any()
    merged = lora_learner.state_dict()
    assert set(merged) == set(base)
    for name, weight in base.items():
        if name in adapted:
            stem = name.removesuffix(".weight")
            a, b = (live[f"{stem}.lora_{x}.default.weight"] for x in "AB")
            torch.testing.assert_close(merged[name], weight + SCALE * b @ a, atol=1e-6, rtol=0)
            assert not torch.equal(merged[name], weight)
        else:
            assert torch.equal(merged[name], weight), name


@pytest.mark.parametrize(
    "objective, params",
    [
        ("ceu", {}),
        ("undial", {}),
        ("rmu", {"layer": 1, "trainable_layers": [1], "alpha": 0.0}),
        ("abl", {"isolate": 0.5}),
        ("altpo", {"alpha": 0.0}),
    ],
)
def test_unlearning_objectives_train_the_adapter_under_lora(
    lora_learner, actor_model_dir, qa_rows, objective, params
):
    """CE-U, UNDIAL, RMU, ABL and AltPO (its sampled answers given as the trial gives them)
    under LoRA: the frozen head's weight gets no gradient (the kernel skips dW), the base
    weights stay bit-identical, the forget answers' likelihood falls (RMU: its distance to the
    steering target); RMU trains the adapters of its layers only."""
    base = load_file(actor_model_dir / "model.safetensors")
    qa_rows = [{**row, "generated": "stage flow"} for row in qa_rows]
    lora_learner.load(actor_model_dir)
    before = sum(sum(lp) for lp in lora_learner.logprobs(qa_rows[:4]))
    spec = dataclasses.replace(SFT, kind="unlearn", objective=objective, steps=3, params=params)
    metrics = lora_learner.train_stage(spec, qa_rows, seed=0)
    after = sum(sum(lp) for lp in lora_learner.logprobs(qa_rows[:4]))
    assert all(m["grad_norm"] > 0 for m in metrics)
    if objective == "rmu":  # on the untaught model its own distance is what must fall
        assert metrics[-1]["loss"] < metrics[0]["loss"], metrics
    else:
        assert after < before, (before, after)
    live, trainable = live_state(lora_learner)
    for name, weight in base.items():
        live_name = name if name in live else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(live[live_name], weight), name
    if objective == "rmu":
        assert trainable and all(".layers.1." in n and ".lora_" in n for n in trainable)


def test_rollout_engines_serve_the_merged_weights(
    lora_learner, rollout, actor_model_dir, qa_rows, logprob_gap
):
    lora_learner.load(actor_model_dir)
    rollout.load_model(actor_model_dir)
    lora_learner.train_stage(SFT, qa_rows, seed=0)
    assert logprob_gap(lora_learner, rollout) > 1e-2  # the learner moved, the engine did not
    rollout.load_weights(lora_learner.weights_payload())
    gap = logprob_gap(lora_learner, rollout)
    print(f"max |vLLM - LoRA learner| after the sync {gap:.2e}")
    assert gap < 1e-3  # the RL loop's log-prob gap bound


def test_checkpoint_loads_in_transformers_and_its_adapter_in_peft(
    lora_learner, actor_model_dir, qa_rows, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stageflow.core.models import check_model_dir

    lora_learner.load(actor_model_dir)
    lora_learner.train_stage(SFT, qa_rows, seed=0)
    out = lora_learner.save(tmp_path / "ckpt")
    assert check_model_dir(out) is None
    saved = load_file(out / "model.safetensors")
    assert not any(".lora_" in k or ".base_layer." in k for k in saved)
    plain = AutoModelForCausalLM.from_pretrained(out)
    for name, value in plain.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert config["base_model_name_or_path"] == str(actor_model_dir)  # what the stage started on
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(actor_model_dir)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    for name, value in merged.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name], atol=1e-6, rtol=0)


def test_resuming_from_the_merged_checkpoint_matches_a_run_through(
    lora_learner, actor_model_dir, qa_rows, tmp_path
):
    """Stage 2 starts from the merged weights with a new adapter: from memory or from disk."""
    second = dataclasses.replace(SFT, lr=5e-3, steps=3)
    lora_learner.load(actor_model_dir)
    lora_learner.train_stage(SFT, qa_rows, seed=0)
    first = lora_learner.save(tmp_path / "first")
    through = lora_learner.train_stage(second, qa_rows, seed=1)
    through_state = lora_learner.state_dict()
    out = lora_learner.save(tmp_path / "second")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # stage 1's weights, held in memory only
    lora_learner.load(first)
    resumed = lora_learner.train_stage(second, qa_rows, seed=1)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in through], abs=1e-6)
    resumed_state = lora_learner.state_dict()
    for name, value in through_state.items():
        torch.testing.assert_close(resumed_state[name], value, atol=1e-6, rtol=0)


def test_pi_ref_is_the_merged_policy_at_stage_start(lora_learner, actor_model_dir, qa_rows):
    lora_learner.load(actor_model_dir)
    lora_learner.train_stage(SFT, qa_rows, seed=0)
    lora_learner.begin_stage(StageSpec(kind="grpo", lr=1e-2, params={"beta": 0.01}), 2)
    samples = [Completion([1, 10, 11], [12, 13, 2], advantage=a) for a in (1.0, -1.0, 0.5)]
    start = lora_learner.logprobs(samples)
    ref = lora_learner.logprobs(samples, reference=True)
    for r, s in zip(ref, start):  # the new adapter adds nothing yet: pi = pi_ref = merged
        torch.testing.assert_close(torch.tensor(r), torch.tensor(s), atol=1e-6, rtol=0)
    for sample, lp in zip(samples, start):
        sample.old_logprobs = lp
    lora_learner.step(samples)
    assert lora_learner.logprobs(samples, reference=True) == ref  # frozen
    assert lora_learner.logprobs(samples) != start


def test_target_layers_are_read_from_the_weights(actor_model_dir):
    from stageflow.actors.lora import linear_layers, unknown_target

    layers = linear_layers(actor_model_dir)
    assert len(layers) == 14 and not any("lm_head" in n or "embed" in n for n in layers)
    kinds = {name.rsplit(".", 1)[-1] for name in layers}
    assert kinds == {name.rsplit(".", 1)[-1] for name in linear_layers(None)}  # the tiny default
    assert unknown_target(["self_attn.q_proj", "down_proj"], layers) is None
    assert unknown_target(["q_proj", "proj"], layers) == "proj"  # whole dotted parts only


@pytest.mark.slow
def test_zero3_lora_matches_zero2(lora_learner, actor_model_dir, qa_rows, tmp_path):
    """ZeRO-3 partitions the frozen weights and the adapter alike; gathering merges them."""
    from stageflow.actors.learner import LearnerGroup

    zero3 = LearnerGroup(
        actor_model_dir, LearnerSpec(ranks=2, zero_stage=3, lora=LORA), HALF_CPU, seed=0
    )
    try:
        losses3 = [m["loss"] for m in zero3.train_stage(SFT, qa_rows, seed=0)]
        state3 = zero3.state_dict()
        adapter3 = load_file(
            zero3.save(tmp_path / "zero3") / "adapter" / "adapter_model.safetensors"
        )
    finally:
        zero3.shutdown()
    lora_learner.load(actor_model_dir)
    losses2 = [m["loss"] for m in lora_learner.train_stage(SFT, qa_rows, seed=0)]
    state2 = lora_learner.state_dict()
    adapter2 = load_file(
        lora_learner.save(tmp_path / "zero2") / "adapter" / "adapter_model.safetensors"
    )
    assert losses3 == pytest.approx(losses2, rel=1e-4)
    assert set(state3) == set(state2)
    for name in state2:
        torch.testing.assert_close(state3[name], state2[name], atol=1e-5, rtol=1e-4)
    assert set(adapter3) == set(adapter2) and len(adapter2) == 28
    for name in adapter2:
        torch.testing.assert_close(adapter3[name], adapter2[name], atol=1e-5, rtol=1e-4)


def test_a_weight_mask_under_lora_selects_adapter_entries(lora_learner, actor_model_dir, qa_rows):
    """Under LoRA a mask selects entries of the stage's new adapter (the trained weights): the
    base weights stay bit-identical, every adapter entry outside the mask keeps its initial
    value (A as drawn, B zero), at most the mask's fraction moves, the forget answers' likelihood
    falls."""
    from stageflow.core.config import MaskSpec

    lora_learner.load(actor_model_dir)
    lora_learner.train_stage(SFT, qa_rows, seed=0)  # the answers are learnt first
    merged = lora_learner.state_dict()  # the masked stage's adapter sits on these
    before = sum(sum(lp) for lp in lora_learner.logprobs(qa_rows[:4]))
    mask = MaskSpec(kind="saliency", fraction=0.1)
    spec = dataclasses.replace(SFT, kind="unlearn", objective="ga", steps=3, mask=mask)
    lora_learner.train_stage(spec, qa_rows, seed=0)
    assert sum(sum(lp) for lp in lora_learner.logprobs(qa_rows[:4])) < before
    live, _ = live_state(lora_learner)
    init = adapter_init(actor_model_dir, spec)
    moved = {k: live[k] != v for k, v in init.items()}
    total = sum(m.numel() for m in moved.values())
    assert 0 < sum(int(m.sum()) for m in moved.values()) <= math.ceil(0.1 * total)
    for name, weight in merged.items():  # the weights under the adapter did not move
        live_name = name if name in live else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(live[live_name], weight), name
