"""Study scaling: one study run with a shared rollout engine and with per-trial engines, on one
simulated multi-node cluster, in one run.

Command (repo root, the venv active):

    python benchmarks/study_scaling.py           # about 10 min on 2 CPU cores
    python benchmarks/study_scaling.py --quick   # 2 GRPO steps instead of 6

Writes benchmarks/results/study_scaling.json and benchmarks/results/study_scaling.md.

The cluster is `ray.cluster_utils.Cluster` on 127.0.0.1: a head without CPUs (the study driver
runs there) and `--nodes` worker nodes of 3 logical CPUs each — every node has room for one
per_trial trial (the trial, its learner rank, its engine) — all sharing this machine's cores.
The study: the tiny model, an SFT stage and a GRPO stage in both orders x 2 seeds (4 trials),
evaluation (greedy generation accuracy and log-likelihood) after every stage. It runs twice,
`rollout.placement: shared` (one engine for the study) then `per_trial` (one engine per
trial), each as `stageflow run` with RAY_ADDRESS set. Reported per placement: study wall time
(the driver process), the most RL stages running at once (from the GRPO prefixes' training
start/end times), engines started, and where the trials' time went (their `time/<phase>_s`,
summed over trials: learner and engine start, optimizer steps, RL generation, weight sync,
evaluation, checkpoint I/O, waiting for another trial's prefix, MLflow logging).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_io
import yaml

PLACEMENTS = ("shared", "per_trial")
PHASES = results_io.trial_phases(
    "learner_start",
    "engine_start",
    "in_optimizer_steps",
    "in_rl_generation",
    "in_weight_sync",
    "eval_loglik",
    "eval_generation",
    "weight_sync",
    "checkpoint_write",
    "checkpoint_load",
    "wait_prefix",
    "tracking",
    "wall",
)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2 GRPO steps instead of 6")
    parser.add_argument("--nodes", type=int, default=4)


def study(root: Path, placement: str, grpo_steps: int) -> Path:
    spec = {
        "name": f"scaling-{placement}",
        "storage_dir": str(root / placement),
        "model": {"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2}},
        "stages": {
            "sft": {"kind": "sft", "data": {"task": "inst", "size": 64}, "steps": 10},
            "grpo": {
                "kind": "grpo",
                "data": {"task": "math", "size": 32},
                "steps": grpo_steps,
                "lr": 1e-4,
                "batch_size": 4,
                "params": {"group_size": 4, "max_new_tokens": 16},
                "rewards": [{"name": "math_correct"}],
            },
        },
        "orderings": {"permutations": ["sft", "grpo"]},
        "seeds": [0, 1],
        "evaluation": {
            "sets": {
                "inst": {
                    "data": {"task": "inst", "split": "eval", "size": 32},
                    "metrics": ["accuracy", "avg_loglik"],
                    "max_examples": 16,
                    "max_new_tokens": 12,
                    "temperature": 0.0,
                }
            }
        },
        "learner": {"ranks": 1, "zero_stage": 0},
        "rollout": {
            "placement": placement,
            "workers": 1,
            "max_model_len": 128,
            "kv_cache_gib": 0.1,
            "gpu_memory_utilization": 0.15,
        },
    }
    path = root / f"{placement}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def most_at_once(windows: list[tuple[float, float]]) -> int:
    """The largest number of [start, end) windows that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in windows] + [(e, -1) for _, e in windows])
    best = now = 0
    for _, change in events:
        now += change
        best = max(best, now)
    return best


def measure(cluster, root: Path, placement: str, grpo_steps: int) -> dict:
    path = study(root, placement, grpo_steps)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stageflow.platform.commands.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{placement} study failed:\n{done.stdout[-3000:]}")
    storage = root / placement
    metas = [json.loads(p.read_text()) for p in (storage / "prefixes").glob("*/meta.json")]
    rl = [(m["train_start_ms"], m["train_end_ms"]) for m in metas if m["stage"] == "grpo"]
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    phases = {k: sum(r["timing"].get(f"time/{k}_s", 0.0) for r in records) for k in PHASES}
    engines = len(records) if placement == "per_trial" else 1
    return {
        "placement": placement,
        "study_wall_s": wall,
        "trials": len(records),
        "rl_stages": len(rl),
        "max_rl_stages_at_once": most_at_once(rl),
        "engines_started": engines,
        "phases_s": phases,
    }


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The study under each placement, on one simulated cluster of `--nodes` worker nodes."""
    from ray.cluster_utils import Cluster

    grpo_steps = 2 if args.quick else 6
    local = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **local})
    rows = []
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory() as tmp:
            for placement in PLACEMENTS:
                rows.append(measure(cluster, Path(tmp), placement, grpo_steps))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        cluster.shutdown()
    return rows, {"grpo_steps": grpo_steps}


def intro(meta: dict) -> str:
    return (
        f"One run on a simulated cluster of {meta['nodes']} worker nodes x 3 logical CPUs (plus "
        f"a head without CPUs) on this {meta['cpus']}-core machine ({results_io.load_phrase(meta)}); "
        f"4 trials (SFT and {meta['grpo_steps']}-step GRPO in both orders x 2 seeds), evaluation "
        "after every stage. All trials fit the cluster at once under both placements; every "
        "process shares the same two physical cores, so the per_trial wall time pays for four "
        "engine starts on them. The concurrency and where the time goes are the point."
    )


def figures(rows: list[dict]) -> list[tuple[str, dict]]:
    """The table's lines, one per figure: (label, {placement: the figure under it})."""
    by = {r["placement"]: r for r in rows}
    # (label, the figure of a placement's row)
    of_row = [
        ("study wall time (s)", lambda r: f"{r['study_wall_s']:.0f}"),
        ("RL stages running at once (max)", lambda r: r["max_rl_stages_at_once"]),
        ("engines started", lambda r: r["engines_started"]),
        *(
            (f"{label} (s, all trials)", lambda r, key=key: f"{r['phases_s'][key]:.1f}")
            for key, label in PHASES.items()
        ),
    ]
    return [(label, {p: figure(by[p]) for p in PLACEMENTS}) for label, figure in of_row]


BENCHMARK = results_io.Benchmark(
    name="study_scaling",
    doc=__doc__,
    arguments=arguments,
    measure=measure_all,
    title="Study scaling: shared rollout engine vs per-trial engines",
    intro=intro,
    # One line per figure, one column per placement.
    table_rows=figures,
    columns=results_io.figure_columns(PLACEMENTS),
)

if __name__ == "__main__":
    BENCHMARK.main()
