"""Where a learner step's time goes: one rank's optimizer step against the hand-written loop's.

Command (repo root, the venv active):

    python benchmarks/step_profile.py           # full run, about 10 min on 2 CPU cores
    python benchmarks/step_profile.py --quick   # smoke run (tiny model, one repetition)

Writes benchmarks/results/step_profile.json and benchmarks/results/step_profile.md.

Three sides train the same rows (the refusal set, batch 16) from the same base model, in this
process, with the same torch threads: the loop of benchmarks/hand_written.py (torch AdamW,
log_softmax + gather, clip_grad_norm_), the learner as it runs (`LearnerWorker.train_stage`:
a DeepSpeed engine, the fused log-prob kernel), and the learner as it ran before (the ZeRO
stage as asked, 1, and DeepSpeed's gradient all-reduce, both at world size 1). A side's step
time is the median over a stage's steps after the first (the first, where the optimizer's
state is allocated, is reported alone); sides run in a new random order in each of
`--reps` repetitions, and the table gives median [min, max] over them, a ratio within one.
After the repetitions each side trains the stage once more under torch.profiler, and the
operators whose time differs most from the loop's are listed per objective.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import hand_written
import results_io

SIDES = ("loop", "learner", "learner_before")
OBJECTIVES = ("sft", "ga", "npo")
BETA = 0.5  # NPO's, as in the quickstart


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, one repetition")
    parser.add_argument("--sizes", default="tiny,25M", help="comma-separated: tiny,25M")
    parser.add_argument("--reps", type=int, default=3)


def stage_of(objective: str, steps: int):
    from stageflow.core.config import StageSpec

    if objective == "sft":
        return StageSpec(kind="sft", lr=5e-4, batch_size=16, steps=steps, max_len=256)
    params = {"beta": BETA} if objective == "npo" else {}
    return StageSpec(
        kind="unlearn",
        objective=objective,
        lr=5e-4,
        batch_size=16,
        steps=steps,
        max_len=256,
        params=params,
    )


def learner_side(model_dir: Path, before: bool) -> Callable[[str, list[dict], int], list[float]]:
    """Train one stage on a rank of this process (world size 1); its step times."""
    import dataclasses

    from stageflow.actors.learner_worker import LearnerWorker
    from stageflow.core.config import LearnerSpec
    from stageflow.core.registry import stage_objective

    @dataclasses.dataclass(frozen=True)
    class AsAsked(LearnerSpec):  # the ZeRO stage as written, at one rank too
        @property
        def engine_zero_stage(self) -> int:
            return self.zero_stage

    spec = (AsAsked if before else LearnerSpec)(ranks=1, zero_stage=1)
    worker = LearnerWorker(str(model_dir), spec, "cpu", 0)
    worker.setup()
    if before:  # DeepSpeed's all-reduce of the gradients, as at world size 1 before
        begin = worker.begin_stage

        def begin_stage(*args, **kwargs):
            out = begin(*args, **kwargs)
            worker.engine.enable_backward_allreduce = True
            return out

        worker.begin_stage = begin_stage

    def train(objective: str, rows: list[dict], steps: int) -> list[float]:
        stage = stage_of(objective, steps)
        worker.load(str(model_dir))
        metrics = worker.train_stage(stage, stage_objective(stage), rows, seed=0)
        return [m["step_time_s"] for m in metrics]

    return train


def loop_side(model_dir: Path) -> Callable[[str, list[dict], int], list[float]]:
    """Train one stage with the hand-written loop; its step times."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def train(objective: str, rows: list[dict], steps: int) -> list[float]:
        stage = stage_of(objective, steps)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        settings = {
            "objective": objective,
            "lr": stage.lr,
            "weight_decay": stage.weight_decay,
            "steps": steps,
            "schedule": stage.schedule,
            "warmup_steps": stage.warmup_steps,
            "batch_size": stage.batch_size,
            "max_len": stage.max_len,
            "grad_clip": stage.grad_clip,
            "beta": BETA,
        }
        hand_written.STEP_SECONDS.pop(objective, None)
        hand_written.train(model, tokenizer, objective, settings, rows, 0)
        return hand_written.STEP_SECONDS[objective]

    return train


def profiled(train: Callable, objective: str, rows: list[dict], steps: int) -> dict[str, float]:
    """{operator: self CPU seconds per step} of one stage of `train` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(objective, rows, steps)
    return {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}


def largest_differences(side: dict[str, float], loop: dict[str, float], n: int = 4) -> list:
    """The `n` operators whose self time per step differs most, `side` minus the loop."""
    diff = {k: side.get(k, 0.0) - loop.get(k, 0.0) for k in {*side, *loop}}
    return sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:n]


def measure_size(size: str, model_dir: Path, args: argparse.Namespace) -> list[dict]:
    from stageflow.core import tasks

    rows = tasks.generate("refusal", 0, 64)["train"]
    steps = 20 if size == "tiny" else 6
    sides = {
        "loop": loop_side(model_dir),
        "learner": learner_side(model_dir, before=False),
        "learner_before": learner_side(model_dir, before=True),
    }
    out = []
    for objective in OBJECTIVES:
        reps = []
        for rep in range(args.reps):
            times = {}
            for side in random.Random(f"{size}-{objective}-{rep}").sample(SIDES, len(SIDES)):
                times[side] = sides[side](objective, rows, steps)
            reps.append(times)
            medians = {s: round(statistics.median(t[1:]) * 1e3) for s, t in times.items()}
            print(f"{size} {objective} rep {rep}: step ms {medians}", flush=True)
        ops = {s: profiled(sides[s], objective, rows, steps) for s in SIDES}
        out.append(row(size, objective, steps, reps, ops))
    return out


def row(size: str, objective: str, steps: int, reps: list[dict], ops: dict) -> dict:
    def rest(times: list[float]) -> float:
        return statistics.median(times[1:])

    r = {"model": size, "objective": objective, "steps": steps, "reps": reps}
    for side in SIDES:
        r[f"{side}_step_s"] = [rest(t[side]) for t in reps]
        r[f"{side}_first_s"] = [t[side][0] for t in reps]
    for side in ("learner", "learner_before"):
        r[f"{side}_vs_loop"] = [rest(t[side]) / rest(t["loop"]) for t in reps]
    for side in ("learner", "learner_before"):
        r[f"{side}_op_differences_s"] = largest_differences(ops[side], ops["loop"])
    return r


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import torch

    from stageflow.platform.engine.tracking import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    wanted = args.sizes.split(",") if not args.quick else ["tiny"]
    sizes = {name: results_io.MODEL_SIZES[name] for name in wanted}
    rows = []
    for size, model_dir in results_io.tiny_models(sizes):
        rows += measure_size(size, model_dir, args)
    return rows, {"threads": torch.get_num_threads()}


def intro(meta: dict) -> str:
    return (
        f"One stage per objective on the refusal set (batch 16; the tiny model 20 steps, 25M "
        f"6), fp32, {meta['threads']} torch threads, in one process; step: median over a "
        f"stage's steps after the first; median [min, max] over {meta['reps']} repetitions "
        f"({results_io.load_phrase(meta)}). before: ZeRO-1 and DeepSpeed's gradient all-reduce "
        f"at world size 1."
    )


def ms(key: str) -> Callable[[dict], str]:
    return lambda r: results_io.spread([v * 1e3 for v in r[key]], 0)


def ratio(key: str) -> Callable[[dict], str]:
    return lambda r: results_io.spread(r[key], 2, "x")


def first_steps(r: dict) -> str:
    return f"{ms('loop_first_s')(r)}; {ms('learner_first_s')(r)}"


def differences(side: str) -> Callable[[dict], str]:
    """The operators whose time differs most from the loop's, shortened."""

    def cell(r: dict) -> str:
        ops = r[f"{side}_op_differences_s"]
        return ", ".join(f"{name.removeprefix('aten::')} {s * 1e3:+.1f}" for name, s in ops)

    return cell


BENCHMARK = results_io.Benchmark(
    name="step_profile",
    doc=__doc__,
    arguments=arguments,
    quick={"reps": 1},
    measure=measure_all,
    title="One optimizer step: the learner against the hand-written loop",
    intro=intro,
    columns=[
        ("model", "left", lambda r: r["model"]),
        ("objective", "left", lambda r: r["objective"]),
        ("loop step (ms)", "right", ms("loop_step_s")),
        ("learner step (ms)", "right", ms("learner_step_s")),
        ("**learner / loop**", "right", ratio("learner_vs_loop")),
        ("before: step (ms)", "right", ms("learner_before_step_s")),
        ("before / loop", "right", ratio("learner_before_vs_loop")),
        ("first step: loop; learner (ms)", "right", first_steps),
        ("operators: learner - loop (ms a step)", "left", differences("learner")),
        ("operators: before - loop (ms a step)", "left", differences("learner_before")),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
