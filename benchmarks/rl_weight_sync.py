"""The RL loop's weight sync, as a study runs it: object store (what every RL stage used
before) vs shared memory (what `rollout.weight_sync: auto` picks on one host), in one run.

Command (repo root, the venv active):

    python benchmarks/rl_weight_sync.py           # about 4 min on 2 CPU cores
    python benchmarks/rl_weight_sync.py --quick   # tiny model only, 3 steps

Writes benchmarks/results/rl_weight_sync.json and benchmarks/results/rl_weight_sync.md.

For each model size one learner rank (DeepSpeed ZeRO-0, fp32) and one vLLM engine (a trial's
own `RolloutGroup`) run the same seeded GRPO stage (`platform/engine/rl.py`: math prompts, 4 prompts
x group 4, 16 new tokens) once per transport, through `WeightSync`. Each step's `sync_s` is
the time the loop spent on weights: publishing the learner's new weights plus the engine's
load of them before sampling. Reported: the median over the steps after the first, the bytes
of one copy of the weights, and "x memcpy" = sync time / (bytes / memcpy bandwidth), the
number of full-model copies one sync costs (memcpy: the fastest torch copy_ of 256 MiB here).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import results_io

SIZES = results_io.MODEL_SIZES
TRANSPORTS = ("object_store", "shm")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model only, 3 steps")
    parser.add_argument("--steps", type=int, default=6)


def measure(model_dir: Path, steps: int) -> list[dict]:
    from stageflow.actors.rollout import read_weights_bytes
    from stageflow.actors.weight_sync import WeightSync
    from stageflow.core.config import DataSpec, RewardSpec, StageSpec
    from stageflow.core.tasks import generate
    from stageflow.platform.engine.rl import run_rl_stage

    stage = StageSpec(
        kind="grpo",
        data=DataSpec(task="math"),
        steps=steps,
        lr=1e-5,
        batch_size=4,
        params={"group_size": 4, "max_new_tokens": 16},
        rewards=[RewardSpec("math_correct")],
    )
    rows = generate("math", 0, 32)["train"]
    nbytes = len(read_weights_bytes(model_dir))
    out = []
    with results_io.learner_and_engine(model_dir) as (learner, rollout):
        for transport in TRANSPORTS:
            learner.load(model_dir)
            sync = WeightSync(learner, rollout, transport, owner=transport)
            try:
                metrics = run_rl_stage(
                    learner, rollout, stage, rows, seed=0, owner=transport, sync=sync
                )
            finally:
                sync.close()
            later = metrics[1:] or metrics
            out.append(
                {
                    "transport": transport,
                    "bytes": nbytes,
                    "sync_s": statistics.median(m["sync_s"] for m in later),
                    "step_s": statistics.median(m["step_time_s"] for m in later),
                    "reward_mean": statistics.mean(m["reward_mean"] for m in metrics),
                }
            )
    return out


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Both transports on every model size, against the memcpy bandwidth measured first."""
    sizes = {"tiny": SIZES["tiny"]} if args.quick else SIZES
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    bandwidth = results_io.memcpy_bandwidth()
    rows = []
    with results_io.local_ray(num_cpus=4):
        for size, model_dir in results_io.tiny_models(sizes):
            for row in measure(model_dir, args.steps):
                row.update(model=size, x_memcpy=row["sync_s"] / (row["bytes"] / bandwidth))
                rows.append(row)
                print(row, flush=True)
    return rows, {"memcpy_GBps": bandwidth / 1e9}


def intro(meta: dict) -> str:
    return (
        f"Median over GRPO steps 2..{meta['steps']} of one seeded stage per transport; one "
        f"learner rank and one vLLM-CPU engine on one node ({meta['cpus']} CPU cores; "
        f"{results_io.load_phrase(meta)}). memcpy: {meta['memcpy_GBps']:.1f} GB/s. "
        "sync = publishing the new weights + the engine loading them (vLLM's reload_weights "
        "included); x memcpy = sync time / (bytes / memcpy bandwidth)."
    )


BENCHMARK = results_io.Benchmark(
    name="rl_weight_sync",
    doc=__doc__,
    arguments=arguments,
    quick={"steps": 3},
    measure=measure_all,
    title="The RL loop's weight sync: object store (before) vs shared memory (now)",
    intro=intro,
    columns=[
        ("model", "left", lambda r: r["model"]),
        ("MB", "right", lambda r: f"{r['bytes'] / 1e6:.1f}"),
        ("transport", "left", lambda r: r["transport"]),
        ("sync ms per step", "right", lambda r: f"{r['sync_s'] * 1e3:.1f}"),
        ("x memcpy", "right", lambda r: f"{r['x_memcpy']:.1f}"),
        ("share of the step", "right", lambda r: f"{r['sync_s'] / r['step_s']:.0%}"),
    ],
)

if __name__ == "__main__":
    BENCHMARK.main()
