"""Asynchronous RL: the same GRPO stage with max_staleness k = 0 (synchronous), 1 and 2, in one run.

Command (repo root, the venv active):

    python benchmarks/async_rl.py           # about 5 min on 2 CPU cores
    python benchmarks/async_rl.py --quick   # 1 seed, 6 steps

Writes benchmarks/results/async_rl.json and benchmarks/results/async_rl.md.

One learner rank (DeepSpeed ZeRO-0, fp32, 1 CPU) and one vLLM engine (a trial's own
`RolloutGroup`, 1 CPU) on the CPU. The model is first trained on easy math (SFT), so the math
reward has room to move; then, for each seed and each k (interleaved, so that load on the
machine falls on every k alike), the learner reloads that checkpoint and runs one seeded GRPO
stage (`platform/engine/rl.py`: math prompts, a fixed number of samples, the math_correct reward).
Per run: samples/s over the stage (its wall time, the learner's stage set-up excluded), the
learner's and the engines' idle shares (step-time weighted), staleness, and the final reward
(the mean step reward over the last quarter of the steps, `rl/reward_final`). Per k: the mean
over seeds, the reward also as mean +- seed std, and samples/s against k = 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import results_io

MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)
STALENESS = (0, 1, 2)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def grpo_stage(args: argparse.Namespace, k: int):
    from stageflow.core.config import DataSpec, RewardSpec, StageSpec

    return StageSpec(
        kind="grpo",
        data=DataSpec(task="math"),
        steps=args.steps,
        lr=3e-4,
        batch_size=args.prompts,
        params={
            "group_size": args.group,
            "max_new_tokens": args.max_new_tokens,
            "max_staleness": k,
        },
        rewards=[RewardSpec("math_correct")],
    )


def warm_start(learner, model_dir: Path, out: Path) -> Path:
    """Easy math SFT from the random model: its checkpoint, where every GRPO run starts."""
    from stageflow.core.config import StageSpec
    from stageflow.core.tasks import generate

    rows = generate("math", 0, 512, {"difficulty": 1})["train"]
    learner.load(model_dir)
    spec = StageSpec(
        kind="sft",
        steps=250,
        lr=3e-3,
        batch_size=32,
        max_len=96,
        schedule="cosine",
        warmup_steps=10,
    )
    learner.train_stage(spec, rows)
    return learner.save(out)


def one_run(learner, rollout, start_dir: Path, args, k: int, seed: int) -> dict:
    from stageflow.actors.weight_sync import WeightSync
    from stageflow.core.tasks import generate
    from stageflow.platform.engine.rl import prepare_rl_stage, rl_summary

    prompts = generate("math", 1, 512, {"difficulty": 1})["train"]
    learner.load(start_dir)
    owner = f"k{k}-s{seed}"
    sync = WeightSync(learner, rollout, owner=owner)
    try:
        loop, batches = prepare_rl_stage(
            learner, rollout, grpo_stage(args, k), prompts, None, seed=seed, owner=owner, sync=sync
        )
        start = time.perf_counter()
        steps = loop.run(batches)
        wall = time.perf_counter() - start
    finally:
        sync.close()
    samples = args.steps * args.prompts * args.group
    step_s = [s["step_time_s"] for s in steps]

    def weighted(key: str) -> float:
        return sum(s[key] * t for s, t in zip(steps, step_s)) / sum(step_s)

    return {
        "k": k,
        "seed": seed,
        "samples": samples,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "learner_idle": weighted("learner_idle"),
        "rollout_idle": weighted("rollout_idle"),
        "staleness_mean": statistics.mean(s["staleness_mean"] for s in steps),
        "staleness_max": max(s["staleness_max"] for s in steps),
        "gen_s": sum(s["gen_s"] for s in steps),
        "learn_s": sum(s["learn_s"] for s in steps),
        "reward_final": rl_summary(steps, (0.0, 1.0))["rl/reward_final"],
        "logprob_gap": statistics.mean(s["logprob_gap"] for s in steps),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """One row per k: samples/s and its ratio to k = 0 (the same seed, run beside it) as
    median [min, max] over seeds, the other columns means, the final reward's seed std."""
    rows = []
    base = {r["seed"]: r["samples_per_s"] for r in runs if r["k"] == 0}
    for k in STALENESS:
        mine = [r for r in runs if r["k"] == k]
        rewards = [r["reward_final"] for r in mine]
        speeds = [r["samples_per_s"] for r in mine]
        ratios = [r["samples_per_s"] / base[r["seed"]] for r in mine]
        row = {
            key: statistics.mean(r[key] for r in mine)
            for key in ("wall_s", "learner_idle", "rollout_idle", "staleness_mean")
        }
        row.update(
            k=k,
            seeds=len(mine),
            samples_per_s=statistics.median(speeds),
            samples_range=[min(speeds), max(speeds)],
            speedup=statistics.median(ratios),
            speedup_range=[min(ratios), max(ratios)],
            staleness_max=max(r["staleness_max"] for r in mine),
            reward_final=statistics.mean(rewards),
            reward_seed_std=statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
        )
        rows.append(row)
    return rows


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import tempfile

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    runs = []
    with results_io.local_ray(num_cpus=2), tempfile.TemporaryDirectory() as tmp:
        for _, model_dir in results_io.tiny_models({"tiny": MODEL}):
            params = results_io.param_count(model_dir)
            with results_io.learner_and_engine(model_dir) as (learner, rollout):
                start_dir = warm_start(learner, model_dir, Path(tmp) / "sft")
                for seed in range(args.seeds):
                    for k in STALENESS:
                        runs.append(one_run(learner, rollout, start_dir, args, k, seed))
                        print({key: round(v, 4) for key, v in runs[-1].items()}, flush=True)
    return summarise(runs), {"runs": runs, "params": params}


def intro(meta: dict) -> str:
    return (
        f"One seeded GRPO stage per k and seed ({meta['seeds']} seeds, {meta['steps']} steps x "
        f"{meta['prompts']} prompts x {meta['group']} completions, up to "
        f"{meta['max_new_tokens']} new tokens) on a {meta['params'] / 1e6:.1f}M-parameter model "
        "after an easy-math SFT; one learner rank and one vLLM-CPU engine, 1 CPU each, on "
        f"{meta['cpus']} cores ({results_io.load_phrase(meta)}), the k interleaved within each "
        "seed. samples/s over the stage's wall time and its ratio to k = 0 of the same seed: "
        "median [min, max] over seeds; wall time and idle shares (step-time weighted): means; final reward: the mean math reward of the "
        "last quarter of the steps, mean +- std over seeds. Per-run rows in the JSON file."
    )


BENCHMARK = results_io.Benchmark(
    name="async_rl",
    doc=__doc__,
    arguments=arguments,
    quick={"seeds": 1, "steps": 6},
    measure=measure,
    title="Asynchronous RL: max_staleness k = 0 (synchronous), 1, 2",
    intro=intro,
    columns=[
        ("k", "right", lambda r: r["k"]),
        (
            "samples/s",
            "right",
            lambda r: (
                f"{r['samples_per_s']:.1f} [{r['samples_range'][0]:.1f}, "
                f"{r['samples_range'][1]:.1f}]"
            ),
        ),
        (
            "x k=0",
            "right",
            lambda r: (
                f"{r['speedup']:.2f} [{r['speedup_range'][0]:.2f}, {r['speedup_range'][1]:.2f}]"
            ),
        ),
        ("wall s", "right", lambda r: f"{r['wall_s']:.1f}"),
        ("learner idle", "right", lambda r: f"{r['learner_idle']:.0%}"),
        ("engine idle", "right", lambda r: f"{r['rollout_idle']:.0%}"),
        (
            "staleness mean / max",
            "right",
            lambda r: f"{r['staleness_mean']:.2f} / {r['staleness_max']:.0f}",
        ),
        (
            "final reward",
            "right",
            lambda r: f"{r['reward_final']:.3f} +- {r['reward_seed_std']:.3f}",
        ),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
