"""The RL stage loop (GRPO), driven from the trial pipeline for objectives marked `rl_loop`.

Per step: a batch of prompts, G completions each from the trial's rollout engines (its own,
or the shared pool's) with the learner's latest published weights, rewards
(`actors/rewards.py`), group-normalised advantages, pi_old (and pi_ref) log-probs of the
sampled completions from the learner, `updates_per_batch` clipped-ratio optimizer steps against
pi_old, then the new weights are published (`WeightSync`: shared memory on one host) for the
next batch. Used by `grpo` stages and by the RL unlearning objectives `purge` and `rule`
(docs/formulas.md#rl-objectives). With `params.max_staleness: k >= 1` the engines sample the
next batches while the learner trains (platform/engine/rl_async.py), pi_old being the engines'
behaviour log-probs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stageflow.actors.batch_plan import batch_indices, stage_steps
from stageflow.actors.rendering import Completion, row_prompt
from stageflow.actors.rewards import Sample, StageReward, weighted_range
from stageflow.actors.weight_sync import Weights, WeightSync
from stageflow.core.config import RLLoopParams, StageSpec
from stageflow.core.registry import OBJECTIVES, ObjectiveParams, stage_objective
from stageflow.platform.engine.rl_async import run_streamed


def reward_specs(stage: StageSpec, objective: ObjectiveParams) -> list[Any]:
    """The stage's `rewards`, else the objective's default rewards (purge, rule), else []."""
    default = OBJECTIVES[objective.objective].default_rewards
    if stage.rewards or default is None:
        return list(stage.rewards)
    return default(objective)


def stage_reward_range(stage: StageSpec) -> tuple[float, float]:
    """(low, high) of the stage's total reward R."""
    return weighted_range(reward_specs(stage, stage_objective(stage)))


def group_advantages(
    rewards: Sequence[float], group_size: int, scale: bool = True, eps: float = 1e-6
) -> list[float]:
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each group of `group_size` consecutive
    completions (std unbiased; `scale=False`: A_i = r_i - mean_g r, "Dr GRPO")."""
    if group_size < 2 or len(rewards) % group_size:
        raise ValueError(f"expected groups of {group_size} >= 2 completions, got {len(rewards)}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start : start + group_size]]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


def k3(logprob: float, ref_logprob: float) -> float:
    """k3 estimate of KL(pi || pi_ref) at one token: exp(q) - q - 1, q = log pi_ref - log pi."""
    q = ref_logprob - logprob
    return math.exp(q) - q - 1.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    mean = _mean(values)
    return math.sqrt(_mean([(v - mean) ** 2 for v in values])) if values else float("nan")


def run_rl_stage(
    learner: Any,
    rollout: Any,
    stage: StageSpec,
    rows: list[dict],
    retain_rows: list[dict] | None = None,
    *,
    seed: int = 0,
    owner: str = "rl",
    sync: WeightSync | None = None,
) -> list[dict[str, float]]:
    """Train one RL stage (the GRPO loop); per-step metrics in order, like `train_stage`.

    `rollout`: the trial's engines (a `RolloutGroup` or the shared pool's client); `sync`: how
    the learner's weights reach them (default: a new `WeightSync`, closed at the end). Forget /
    data prompts come from `rows`; objectives with `retain_prompts` (rule) fill half of each
    step's prompts from `retain_rows`. Steps: the stage's `steps`, else its epochs over `rows`
    at `prompts_per_step` prompts per step.
    """
    own_sync = sync is None
    sync = sync or WeightSync(learner, rollout, owner=owner)
    try:
        loop, batches = prepare_rl_stage(
            learner, rollout, stage, rows, retain_rows, seed=seed, owner=owner, sync=sync
        )
        return loop.run(batches)
    finally:
        if own_sync:
            sync.close()


def prepare_rl_stage(
    learner: Any,
    rollout: Any,
    stage: StageSpec,
    rows: list[dict],
    retain_rows: list[dict] | None,
    *,
    seed: int,
    owner: str,
    sync: WeightSync,
) -> tuple[GRPOLoop, list[Batch]]:
    """The stage's loop (the learner's stage begun) and its batches, (prompt rows, seed) per step."""
    if rollout is None:
        raise ValueError("an RL stage needs rollout engines, but the trial has none")
    if not rows:
        raise ValueError("an RL stage got no prompts")
    objective = stage_objective(stage)
    entry, loop_params, loss_params = (
        OBJECTIVES[objective.objective],
        objective.loop,
        objective.loss,
    )
    per_step = loop_params.prompts_per_step or stage.batch_size
    retain = list(retain_rows or []) if entry.retain_prompts else []
    n_retain = per_step // 2 if retain else 0
    steps = stage_steps(stage.steps, stage.epochs, per_step, len(rows))
    plan = batch_indices(len(rows), per_step - n_retain, steps, seed)
    retain_plan = batch_indices(len(retain), n_retain, steps, seed + 1) if retain else None
    batches = []
    for step in range(steps):
        batch = [(rows[i], "data") for i in plan[step]]
        batch += [(retain[i], "retain") for i in (retain_plan[step] if retain else [])]
        batches.append((batch, (seed + 7919 * step) % 2**31))
    reward = StageReward(reward_specs(stage, objective), rows)
    loop = GRPOLoop(learner, rollout, sync, owner, stage, loop_params, loss_params, reward)
    learner.begin_stage(stage, steps * loop.updates)
    return loop, batches


# One step's prompts: (row, role) pairs ("data" or "retain"), and its sampling seed.
Batch = tuple[list[tuple[dict, str]], int]


@dataclass
class Sampled:
    """One completion as the engines sampled it: its token ids, the engine's log-probs of its
    tokens (the behaviour policy) and the policy version that produced it."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    sampled_logprobs: list[float]
    version: int


@dataclass
class Rollout:
    """One step's sampled groups (prompt-major), scored."""

    samples: list[Sampled]
    rewards: list[float]
    terms: list[dict[str, float]]
    version: int
    gen_s: float
    load_s: float


class GRPOLoop:
    """One RL stage's state between steps: learner, rollout engines, weight sync, reward.

    Policy versions count the weights the learner publishes: version 1 is the stage's start,
    version v + 1 follows the v-th step's update. `max_staleness` k = 0 samples each batch with
    the newest weights and then trains on it (`step`); k >= 1 streams rollouts on a second thread
    while the learner trains (platform/engine/rl_async.py), each batch sampled at most k versions
    before the learner trains on it. `trained`: per step, the learner's version and each sample's.
    """

    def __init__(
        self,
        learner: Any,
        rollout: Any,
        sync: WeightSync,
        owner: str,
        stage: StageSpec,
        loop: RLLoopParams,
        loss: Any,
        reward: StageReward,
    ):
        """`loop`: the loop's parameters; `loss`: the objective's (eps_low, eps_high, beta)."""
        self.learner, self.rollout, self.sync, self.owner = learner, rollout, sync, owner
        self.loop, self.loss, self.reward = loop, loss, reward
        self.tasks = {"data": stage.data.task, "retain": stage.retain and stage.retain.task}
        self.weights: Weights | None = None
        self.version = 0
        self.group_size = loop.group_size
        self.updates = loop.updates_per_batch
        self.max_staleness = loop.max_staleness
        self.sampling = {
            "n": self.group_size,
            "temperature": loop.temperature,
            "max_tokens": loop.max_new_tokens,
        }
        self.use_ref = loss.beta > 0
        self.trained: list[tuple[int, list[int]]] = []

    def run(self, batches: list[Batch]) -> list[dict[str, float]]:
        """Every step of the stage; per-step metrics in order."""
        if self.max_staleness:
            self.sync.keep_versions(self.max_staleness + 1)
            return run_streamed(self, batches)
        self.publish()
        return [self.step(batch, seed) for batch, seed in batches]

    def publish(self) -> float:
        """Make the learner's current weights the ones the next batch samples with; seconds."""
        start = time.perf_counter()
        self.version += 1
        self.weights = self.sync.publish(f"{self.owner}/v{self.version}")
        return time.perf_counter() - start

    def sample(
        self,
        batch: list[tuple[dict, str]],
        seed: int,
        weights: Weights | None = None,
        version: int | None = None,
    ) -> Rollout:
        """G completions per prompt with `weights` (default: the latest published), scored;
        prompt-major."""
        start = time.perf_counter()
        weights, version = weights or self.weights, version or self.version
        prompts = [row_prompt(row) for row, _ in batch]
        out = self.rollout.generate(prompts, weights, seed=seed, **self.sampling)
        load_s = max(out.get("load_s") or [0.0])
        samples, rewards, terms = [], [], []
        for i, (row, role) in enumerate(batch):
            for text, ids, lps in zip(out["texts"][i], out["token_ids"][i], out["logprobs"][i]):
                value, parts = self.reward(Sample(text, row, self.tasks[role], role, len(ids)))
                rewards.append(value)
                terms.append(parts)
                samples.append(Sampled(out["prompt_token_ids"][i], list(ids), list(lps), version))
        gen_s = time.perf_counter() - start - load_s
        return Rollout(samples, rewards, terms, version, gen_s, load_s)

    def step(self, batch: list[tuple[dict, str]], seed: int) -> dict[str, float]:
        """The synchronous step: sample, learn, publish the new weights."""
        start = time.perf_counter()
        rollout = self.sample(batch, seed)
        result = self.learn(rollout)
        sync_s = self.publish() + rollout.load_s  # this step's load + publishing the next weights
        step_s = time.perf_counter() - start
        waited = rollout.gen_s + rollout.load_s  # the learner waits for the samples
        result.update(
            sync_s=sync_s,
            step_time_s=step_s,
            samples_per_s=len(rollout.samples) / step_s,
            learner_idle=waited / step_s,
            rollout_idle=1.0 - waited / step_s,
        )
        return result

    def learn(self, rollout: Rollout) -> dict[str, float]:
        """Advantages, pi_old / pi_ref log-probs, `updates_per_batch` optimizer steps; metrics.

        pi_old: the engine's behaviour log-probs when the samples may be stale (k >= 1), so the
        clipped ratio stays correct off-policy; synchronous with one update per batch, pi_old
        is pi_theta itself (the ratio is 1 by construction: the loss takes the step's own
        log-probs, detached, and no forward is spent on them); else the learner's log-probs.
        """
        staleness = [self.version - s.version for s in rollout.samples]
        if max(staleness) > self.max_staleness:  # asserted: never train on older samples
            raise RuntimeError(
                f"a sample {max(staleness)} versions old reached the learner "
                f"(max_staleness {self.max_staleness})"
            )
        self.trained.append((self.version, [s.version for s in rollout.samples]))
        samples, rewards, terms = rollout.samples, rollout.rewards, rollout.terms
        advantages = group_advantages(rewards, self.group_size, scale=self.loop.scale_rewards)
        items = [Completion(s.prompt_token_ids, s.completion_token_ids) for s in samples]
        behaviour = self.max_staleness > 0
        learn_start = time.perf_counter()  # the learner's share of the step from here
        coef = self.loop.entropy_coef
        sampled = [s.sampled_logprobs for s in samples]  # pi_old's, where T = 1
        tempered = self.sampling["temperature"] != 1.0
        on_policy = not (behaviour or self.updates > 1 or coef or tempered)
        if behaviour:
            old = sampled
        else:
            old = None if on_policy else self.learner.logprobs(items)
        estimate = sampled if old is None else old  # pi_old's log-probs: entropy and KL
        ref = self.learner.logprobs(items, reference=True) if self.use_ref else None
        for i, item in enumerate(items):
            item.old_logprobs = None if old is None else old[i]
            item.sampled_logprobs = sampled[i] if on_policy else None
            item.ref_logprobs = ref[i] if ref is not None else None
            if coef:  # entropy bonus as a per-token advantage term: coef * (-log pi_old(y_t))
                item.token_advantages = [advantages[i] - coef * lp for lp in old[i]]
            else:
                item.advantage = advantages[i]
        low, high = 1.0 - self.loss.eps_low, 1.0 + self.loss.eps_high
        clipped, updates = [], []
        for update in range(self.updates):
            if update:  # pi_theta has moved off pi_old: share of tokens the clip holds
                now = self.learner.logprobs(items)
                ratios = [math.exp(a - b) for n, o in zip(now, old) for a, b in zip(n, o)]
                clipped.append(_mean([float(not low <= r <= high) for r in ratios]))
            updates.append(self.learner.step(items))
        learn_s = time.perf_counter() - learn_start
        n_tokens = sum(len(s.completion_token_ids) for s in samples)
        G = self.group_size
        groups = [rewards[i : i + G] for i in range(0, len(rewards), G)]
        result = {
            "reward_mean": _mean(rewards),
            "reward_std": _std(rewards),
            "flat_group_frac": _mean([float(max(g) == min(g)) for g in groups]),
            **{f"reward/{k}": _mean([t[k] for t in terms]) for k in terms[0]},
            "entropy": _mean([-lp for o in estimate for lp in o]),
            "clip_frac": _mean(clipped) if clipped else 0.0,
            "completion_len": n_tokens / len(samples),
            "loss": _mean([u["loss"] for u in updates]),
            "grad_norm": updates[-1]["grad_norm"],
            "lr": updates[-1]["lr"],
            "tokens_per_s": _mean([u["tokens_per_s"] for u in updates]),
            "gen_tokens_per_s": n_tokens / max(rollout.gen_s, 1e-9),
            "gen_s": rollout.gen_s,
            "learn_s": learn_s,
            "staleness_mean": _mean(staleness),
            "staleness_max": float(max(staleness)),
        }
        if ref is not None:
            result["kl"] = _mean([k3(a, b) for o, r in zip(estimate, ref) for a, b in zip(o, r)])
        if behaviour or on_policy:  # the learner's weights before this update vs the engine's
            result["logprob_gap"] = updates[0].get("old_logprob_gap", float("nan"))
        elif old is not None and not tempered:  # rollout vs learner log-probs, same weights
            gaps = [abs(a - b) for s, o in zip(samples, old) for a, b in zip(s.sampled_logprobs, o)]
            result["logprob_gap"] = _mean(gaps)
        return result


def rl_summary(steps: Sequence[dict[str, float]], reward_range: tuple[float, float]) -> dict:
    """Stability of one RL stage, for the per-ordering report ("rl/<name>" trial metrics).

    reward_start / reward_final: mean step reward over the first / last quarter of the steps;
    reward_std: mean within-step spread of R; reward_jitter: std of the step means over the
    last half; collapsed: 1 when the final quarter is below the best quarter-long window by
    more than 10% of the reward's range.
    """
    means = [s["reward_mean"] for s in steps]
    if not means:
        return {}
    window = max(1, len(means) // 4)
    best = max(_mean(means[i : i + window]) for i in range(len(means) - window + 1))
    final = _mean(means[-window:])
    width = reward_range[1] - reward_range[0]
    return {
        "rl/reward_start": _mean(means[:window]),
        "rl/reward_final": final,
        "rl/reward_std": _mean([s["reward_std"] for s in steps]),
        "rl/reward_jitter": _std(means[len(means) // 2 :]),
        "rl/collapsed": float(final < best - 0.1 * width),
    }
