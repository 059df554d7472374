"""ULD on the learner: an assistant trains while the model stays frozen, and the unlearned model
(base - weight * assistant) is what the ranks evaluate, sample from and save."""

from __future__ import annotations

import math

import pytest
import torch

from stageflow.core.config import StageSpec

SFT = StageSpec(kind="sft", lr=5e-3, batch_size=4, steps=8, max_len=64)
ULD = StageSpec(
    kind="unlearn",
    objective="uld",
    lr=5e-3,
    batch_size=4,
    steps=8,
    max_len=64,
    params={"layers": 1, "retain_weight": 1.0, "rank": 4, "alpha": 8.0},
)


@pytest.fixture(scope="module")
def other_learner(ray_cluster, actor_model_dir, request):
    """Two ranks of another layout: ZeRO-3, or ZeRO-2 under `learner.lora` (half a CPU each)."""
    from stageflow.actors.group import Placement
    from stageflow.actors.learner import LearnerGroup
    from stageflow.core.config import LearnerSpec, LoraSpec

    made = {}

    def group(layout: str):
        if layout not in made:
            spec = (
                LearnerSpec(ranks=2, zero_stage=3)
                if layout == "zero3"
                else LearnerSpec(ranks=2, zero_stage=2, lora=LoraSpec(r=4, alpha=8.0))
            )
            half = Placement(device="cpu", cpus=0.5, threads=1)
            made[layout] = LearnerGroup(actor_model_dir, spec, half, seed=0)
        return made[layout]

    yield group
    for made_group in made.values():
        made_group.shutdown()


@pytest.mark.parametrize("layout", ["zero2", "zero3", "lora"])
def test_uld_trains_an_assistant_and_leaves_base_minus_assistant(
    learner, other_learner, actor_model_dir, qa_rows, tmp_path, layout
):
    """The forget answers' likelihood under the ULD model falls far more than the retain
    answers'; the checkpoint is the base's weights (unchanged by the stage) plus the
    assistant's adapter, and loads back into the same model; completions are sampled. On
    ZeRO-2, ZeRO-3 and under `learner.lora` (whose SFT adapter is merged into the base)."""
    from safetensors.torch import load_file

    from stageflow.actors.uld import ASSISTANT_DIR, SETTINGS_FILE

    learner = learner if layout == "zero2" else other_learner(layout)
    retain = [{"prompt": f"R{i}: ", "answer": "keep me"} for i in range(8)]
    learner.load(actor_model_dir)
    learner.train_stage(SFT, qa_rows + retain, seed=0)
    before = learner.state_dict()

    def loglik(rows):
        return sum(s.logprob for s in learner.answer_stats(rows)) / len(rows)

    start = (loglik(qa_rows), loglik(retain))
    assert not learner.holds_combined()
    metrics = learner.train_stage(ULD, qa_rows, retain, seed=0)
    assert learner.holds_combined()
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # the assistant learns its reversed task
    end = (loglik(qa_rows), loglik(retain))
    assert start[0] - end[0] > 2.0 and start[0] - end[0] > 3 * abs(start[1] - end[1]), (start, end)
    stats = learner.answer_stats(qa_rows[:3], True)
    texts = learner.sample_combined(["Q1: name? ", "R2: "], n=2, max_tokens=8, seed=0)
    assert len(texts) == 2 and all(len(t) == 2 for t in texts)
    out = learner.save(tmp_path / "uld")
    saved = load_file(f"{out}/model.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in saved)  # the model itself frozen
    assert (tmp_path / "uld" / ASSISTANT_DIR / SETTINGS_FILE).is_file()
    assert (tmp_path / "uld" / ASSISTANT_DIR / "adapter_model.safetensors").is_file()
    learner.load(out)
    assert learner.holds_combined()
    again = learner.answer_stats(qa_rows[:3], True)
    for a, b in zip(stats, again):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.token_zscores == pytest.approx(b.token_zscores, abs=1e-3)
    learner.load(actor_model_dir)
    assert not learner.holds_combined()


def test_the_objective_reverses_forget_and_retain():
    """ULD's assistant loss: NLL_f + retain_weight * the token mean of KL(u || p) over the
    retain answers (the head's `uniform_kl` on the retain rows)."""
    from stageflow.actors.objectives import LossInputs
    from stageflow.core.registry import OBJECTIVES, VocabStat

    entry = OBJECTIVES["uld"]
    typed = entry.typed({"retain_weight": 2.0})
    assert entry.statistic(typed) == VocabStat("uniform_kl", rows="retain")
    assert entry.statistic(entry.typed({"retain_weight": 0})) is None
    assert entry.uses_retain(typed) and not entry.uses_retain(entry.typed({"retain_weight": 0}))
    assert entry.assistant == "layers" and typed.get("layers") == 0
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(3, 7, generator=gen) < 0.7).double()
    kl = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    kl_mask = (torch.rand(2, 5, generator=gen) < 0.7).double()
    x = LossInputs(logprobs, mask, vocab_stat=kl, vocab_stat_mask=kl_mask)
    want = -(logprobs * mask).sum() / mask.sum() + 2.0 * (kl * kl_mask).sum() / kl_mask.sum()
    torch.testing.assert_close(entry.fn(x, retain_weight=2.0), want)


def direct_uld_logits(base, assistant, weight, relative_top):
    """The ULD code's combination (its ContrastLLM with the relative-top filter): log_softmax of
    the base, tokens below min(max + log(relative_top), the int(relative_top * V)-th largest)
    set to -1e3 with the assistant's logits zeroed there, then base + (-weight) * assistant."""
    scores = base.log_softmax(-1)
    keep = int(relative_top * scores.shape[-1])
    sorted_logits = scores.sort(-1, descending=True).values
    thresh = torch.min(
        sorted_logits[..., keep - 1], scores.max(-1).values + math.log(relative_top)
    )[..., None]
    filtered = scores < thresh
    scores = scores.masked_fill(filtered, -1e3)
    return scores + -weight * assistant.masked_fill(filtered, 0.0)


@pytest.mark.parametrize("relative_top", [0.1, 0.5])
def test_combined_logits_are_the_uld_codes(relative_top):
    from stageflow.actors.uld import UldSettings, combine

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 97, generator=gen, dtype=torch.float64) * 3
    assistant = torch.randn(2, 5, 97, generator=gen, dtype=torch.float64)
    settings = UldSettings(layers=1, weight=0.7, relative_top=relative_top)
    got = combine(base, assistant, settings)
    torch.testing.assert_close(got.double(), direct_uld_logits(base, assistant, 0.7, relative_top))
    unfiltered = combine(base, assistant, UldSettings(layers=1, weight=0.7, relative_top=0))
    torch.testing.assert_close(unfiltered.double(), base.log_softmax(-1) - 0.7 * assistant)
