"""Learner step time at ZeRO 0/1/2/3 with 1 and 2 ranks (DeepSpeed on gloo, CPU), one run.

Command (repo root, the venv active):

    python benchmarks/learner_step.py           # full run, about 7 min on 2 CPU cores
    python benchmarks/learner_step.py --quick   # smoke run (tiny model, 3 timed steps)

Writes benchmarks/results/learner_step.json and benchmarks/results/learner_step.md.

Each configuration starts a fresh `LearnerGroup` (Ray actors, 1 CPU and so 1 torch thread per
rank) and runs one SFT stage of `--warmup` + `--steps` steps; the step time is rank 0's wall
time of forward + backward + optimizer step (`step_time_s` of `train_stage`'s metrics), median
over the timed steps (the minimum is reported too: on a shared machine it is the better
estimate of the unloaded time). Global batch `--batch` rows of `--seq` tokens (split across ranks),
fp32, AdamW (torch), fused log-prob kernel. tokens/s = global batch tokens / step time.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import results_io

SIZES = results_io.MODEL_SIZES


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)


def rows(n: int, seq: int) -> list[dict]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    return [
        {"prompt": "P: ", "answer": "".join(rng.choice(letters) for _ in range(seq - 5))}
        for _ in range(n)
    ]


def measure(model_dir: Path, ranks: int, zero: int, args: argparse.Namespace) -> dict:
    from stageflow.actors.group import Placement
    from stageflow.actors.learner import LearnerGroup
    from stageflow.core.config import LearnerSpec, StageSpec

    spec = LearnerSpec(ranks=ranks, zero_stage=zero)
    group = LearnerGroup(model_dir, spec, Placement(device="cpu"))
    try:
        steps = args.warmup + args.steps
        stage = StageSpec(kind="sft", lr=1e-4, batch_size=args.batch, steps=steps, max_len=args.seq)
        metrics = group.train_stage(stage, rows(4 * args.batch, args.seq))[args.warmup :]
    finally:
        group.shutdown()
    step = statistics.median(m["step_time_s"] for m in metrics)
    return {
        "step_s": step,
        "min_step_s": min(m["step_time_s"] for m in metrics),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
        "final_loss": metrics[-1]["loss"],
    }


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every model size x ZeRO stage x ranks, then each one's speedup over its 1-rank run."""
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    results = []
    with results_io.local_ray(num_cpus=2):
        for size, model_dir in results_io.tiny_models(sizes):
            params = results_io.param_count(model_dir)
            for zero in (0, 1, 2, 3):
                for ranks in (1, 2):
                    r = {"model": size, "params": params, "zero_stage": zero, "ranks": ranks}
                    r.update(measure(model_dir, ranks, zero, args))
                    results.append(r)
                    print(
                        f"{size} ZeRO-{zero} ranks={ranks}: {r['step_s'] * 1e3:.1f} ms/step",
                        flush=True,
                    )
    for r in results:
        one = next(
            x
            for x in results
            if x["model"] == r["model"] and x["zero_stage"] == r["zero_stage"] and x["ranks"] == 1
        )
        r["speedup_vs_1_rank"] = r["tokens_per_s"] / one["tokens_per_s"]
    return results, {}


def intro(meta: dict) -> str:
    return (
        f"Global batch {meta['batch']} x {meta['seq']} tokens, fp32, AdamW; median over "
        f"{meta['steps']} steps after {meta['warmup']} warm-up steps; each rank is a Ray actor "
        f"with 1 CPU (1 torch thread) on a {meta['cpus']}-core machine shared with other work "
        f"({results_io.load_phrase(meta)})."
    )


BENCHMARK = results_io.Benchmark(
    name="learner_step",
    doc=__doc__,
    arguments=arguments,
    quick={"steps": 3},
    measure=measure_all,
    title="Learner step time: DeepSpeed ZeRO stage x ranks (CPU, gloo)",
    intro=intro,
    columns=[
        ("model", "left", lambda r: r["model"]),
        ("params", "right", lambda r: f"{r['params'] / 1e6:.1f}M"),
        ("ZeRO", "right", lambda r: r["zero_stage"]),
        ("ranks", "right", lambda r: r["ranks"]),
        ("step ms (median)", "right", lambda r: f"{r['step_s'] * 1e3:.1f}"),
        ("step ms (min)", "right", lambda r: f"{r['min_step_s'] * 1e3:.1f}"),
        ("tokens/s", "right", lambda r: f"{r['tokens_per_s']:.0f}"),
        ("vs 1 rank", "right", lambda r: f"{r['speedup_vs_1_rank']:.2f}"),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
