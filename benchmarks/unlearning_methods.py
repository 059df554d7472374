"""Each unlearning objective's step time and peak memory against gradient ascent's, per token.

Command (repo root, the venv active):

    python benchmarks/unlearning_methods.py           # 25M parameters, about 13 min on 2 cores
    python benchmarks/unlearning_methods.py --quick   # smoke run (tiny model, 2 timed steps)

Writes benchmarks/results/unlearning_methods.json and benchmarks/results/unlearning_methods.md.

One learner rank (DeepSpeed ZeRO-0, fp32, AdamW, fused kernels; a Ray actor with 1 CPU) runs,
for every registered supervised unlearning objective with its default parameters, one `unlearn`
stage of `--warmup` + `--steps` steps from the same base model, with `--batch` forget rows and
`--batch` retain rows of `--seq` tokens (the retain rows enter the step only where the
objective's retain weight is non-zero, as in a study). AltPO's chosen answers, which a study
samples with the rollout engines before the stage, are given (a `generated` column), and ABL's
isolation pass, which runs once before the stage, is outside the timed steps; its steps then
train on its isolated share of the rows (`isolate: 1` here, so a step sees as many rows as
GA's). The methods run interleaved: each of
`--reps` repetitions runs all of them in a new random order. Per method and repetition: the
median step time over the timed steps (forward, backward, optimizer step: `step_time_s`) divided
by the tokens the step processed (forget, chosen and retain rows counted), and its ratio to GA's
in the same repetition; the page shows each ratio's median and range over repetitions, and the peak
memory of a step above what was resident before it (`peak_mem_mib`, the process's high-water
mark on CPU; 0 where the allocator reused memory it already held), its median.
"""

from __future__ import annotations

import argparse
import random
import statistics

import results_io

SIZES = results_io.MODEL_SIZES
# methods that must run a second model or a second pass (pi_ref, a teacher): goal 2.5x, else 1.5x
SECOND_PASS = {"npo", "undial", "dpo", "idkdpo", "altpo", "rmu", "uld"}
# what a method cannot run without; ABL's steps on every row (the same batch as GA's)
PARAMS = {"dpo": {"alternative": "idk"}, "abl": {"isolate": 1.0}}


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps")
    parser.add_argument("--size", choices=sorted(SIZES), default="25M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)


def rows(n: int, seq: int, tag: str) -> list[dict]:
    rng = random.Random(tag)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text() -> str:
        return "".join(rng.choice(letters) for _ in range(seq - 5))

    return [{"prompt": f"{tag}: ", "answer": text(), "generated": text()} for _ in range(n)]


def methods() -> list[str]:
    """The supervised unlearning objectives (the RL-trained ones run the RL loop instead)."""
    from stageflow.core.registry import OBJECTIVES

    return [
        name
        for name in OBJECTIVES.names()
        if "unlearn" in OBJECTIVES[name].kinds and not OBJECTIVES[name].rl_loop
    ]


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from stageflow.actors.group import Placement
    from stageflow.actors.learner import LearnerGroup
    from stageflow.core.config import LearnerSpec, StageSpec

    size = "tiny" if args.quick else args.size
    names = methods()
    forget, retain = rows(4 * args.batch, args.seq, "F"), rows(4 * args.batch, args.seq, "R")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    order_rng = random.Random(0)
    with results_io.local_ray(num_cpus=2):
        for _, model_dir in results_io.tiny_models({size: SIZES[size]}):
            params = results_io.param_count(model_dir)
            group = LearnerGroup(model_dir, LearnerSpec(ranks=1, zero_stage=0), Placement("cpu"))
            try:
                for rep in range(args.reps):
                    order = order_rng.sample(names, len(names))
                    for name in order:
                        group.load(model_dir)
                        stage = StageSpec(
                            kind="unlearn",
                            objective=name,
                            lr=1e-5,
                            batch_size=args.batch,
                            steps=args.warmup + args.steps,
                            max_len=args.seq,
                            params=PARAMS.get(name, {}),
                        )
                        metrics = group.train_stage(stage, forget, retain)[args.warmup :]
                        step = statistics.median(m["step_time_s"] for m in metrics)
                        tokens = statistics.median(
                            m["tokens_per_s"] * m["step_time_s"] for m in metrics
                        )
                        runs[name].append(
                            {
                                "rep": rep,
                                "step_s": step,
                                "tokens": tokens,
                                "s_per_token": step / tokens,
                                "peak_mem_mib": statistics.median(
                                    m["peak_mem_mib"] for m in metrics
                                ),
                            }
                        )
                        print(
                            f"rep {rep} {name}: {step * 1e3:.0f} ms/step, {tokens:.0f} tokens",
                            flush=True,
                        )
            finally:
                group.shutdown()
    results = []
    for name in names:
        ratios = [r["s_per_token"] / ga["s_per_token"] for r, ga in zip(runs[name], runs["ga"])]
        goal = 2.5 if name in SECOND_PASS else 1.5
        results.append(
            {
                "method": name,
                "model": size,
                "params": params,
                "tokens_per_step": statistics.median(r["tokens"] for r in runs[name]),
                "step_s": statistics.median(r["step_s"] for r in runs[name]),
                "us_per_token": 1e6 * statistics.median(r["s_per_token"] for r in runs[name]),
                "ratio_vs_ga": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "peak_mem_mib": statistics.median(r["peak_mem_mib"] for r in runs[name]),
                "goal": goal,
                "met": statistics.median(ratios) <= goal,
                "runs": runs[name],
            }
        )
    return results, {"methods": names}


def intro(meta: dict) -> str:
    return (
        f"Forget batch {meta['batch']} x {meta['seq']} tokens (and as many retain rows where the "
        f"objective weights them, chosen answers for DPO and IdkDPO: `idk`, for AltPO: given; ABL on all rows), fp32, AdamW, one learner rank (1 CPU); each method's median "
        f"step time over {meta['steps']} steps after {meta['warmup']} warm-up steps, per token "
        f"processed; {meta['reps']} repetitions with the methods interleaved in a new random "
        f"order each time; ratio to GA in the same repetition: median [min, max]. Goal: 1.5x "
        f"GA, 2.5x for methods that run a second model or pass ({results_io.load_phrase(meta)})."
    )


BENCHMARK = results_io.Benchmark(
    name="unlearning_methods",
    doc=__doc__,
    arguments=arguments,
    quick={"steps": 2, "warmup": 1, "reps": 2, "batch": 4},
    measure=measure_all,
    title="Unlearning objectives: step time per token against gradient ascent",
    intro=intro,
    columns=[
        ("method", "left", lambda r: f"`{r['method']}`"),
        ("params", "right", lambda r: f"{r['params'] / 1e6:.1f}M"),
        ("tokens/step", "right", lambda r: f"{r['tokens_per_step']:.0f}"),
        ("step ms", "right", lambda r: f"{r['step_s'] * 1e3:.0f}"),
        ("us/token", "right", lambda r: f"{r['us_per_token']:.0f}"),
        (
            "vs GA per token",
            "right",
            lambda r: (
                f"{r['ratio_vs_ga']:.2f} [{r['ratio_range'][0]:.2f}, {r['ratio_range'][1]:.2f}]"
            ),
        ),
        ("goal", "right", lambda r: f"{r['goal']:.1f}x"),
        ("met", "left", lambda r: "yes" if r["met"] else "no"),
        ("peak MiB above resident", "right", lambda r: f"{r['peak_mem_mib']:.0f}"),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
