"""stageflow against the hand-written for-loop: the quickstart study, and the same study at the
25M-parameter size, each run by `stageflow run` and by benchmarks/hand_written.py, in one run.

Command (repo root, the venv active):

    python benchmarks/vs_script.py           # about 33 min on 2 CPU cores
    python benchmarks/vs_script.py --quick   # the quickstart size only

Writes benchmarks/results/vs_script.json and benchmarks/results/vs_script.md.

Per size, the study's data and base model are prepared once (stageflow's own generators and
model builder; both runs read the same files). The hand-written script (plain transformers +
torch, one process) trains every ordering's stages from the base model, evaluates after every
stage and runs every unlearning branch; `stageflow run` does the same study with its prefix
cache (a shared prefix is trained once). Both are timed as whole processes, one after the
other on the same cores. Reported: wall time and the ratio, optimizer-step time per step,
evaluation time, and where stageflow's time went: the driver's phases (Ray, shared actors,
Tune, the report) and the trials' `time/<phase>_s` summed over trials.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_io

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "studies" / "quickstart.yaml"
# the 25M-parameter model of the other benchmarks, one seed and fewer steps so that one run
# stays affordable; ZeRO stage 0: a single learner rank has nothing to partition
SIZES = {
    "quickstart": [],
    "25M": [
        "model.tiny.hidden_size=512",
        "model.tiny.num_layers=8",
        "model.tiny.num_heads=8",
        "model.tiny.intermediate_size=1408",
        "seeds=[0]",
        "learner.zero_stage=0",
        "stages.pretrain.steps=40",
        "stages.facts.steps=20",
        "stages.refusal.steps=10",
        "stages.ga.steps=4",
        "stages.npo.steps=4",
    ],
}
TRIAL_PHASES = results_io.trial_phases(
    "learner_start",
    "train",
    "in_optimizer_steps",
    "checkpoint_write",
    "checkpoint_load",
    "weight_sync",
    "eval_loglik",
    "eval_generation",
    "tracking",
    "wait_prefix",
    "other",
)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the quickstart size only")
    parser.add_argument("--sizes", default="quickstart,25M", help="comma-separated: quickstart,25M")


def plan(root: Path, overrides: list[str]) -> tuple[Path, Path]:
    """The study file with storage under `root`, and the hand-written script's plan."""
    from stageflow.core.data_files import materialize
    from stageflow.core.expand import expand
    from stageflow.core.study_file import load_study, spec_to_yaml
    from stageflow.platform.engine.runner import prepare

    spec = load_study(QUICKSTART, [*overrides, f"storage_dir={root / 'study'}"])
    study, base = prepare(spec)

    def data(spec_data) -> str:
        return str(materialize(spec_data, study.data))

    stages = {
        name: {
            "objective": s.objective or s.kind,
            "data": data(s.data),
            "steps": s.steps,
            "lr": s.lr,
            "batch_size": s.batch_size,
            "max_len": s.max_len,
            "schedule": s.schedule,
            "warmup_steps": s.warmup_steps,
            "weight_decay": s.weight_decay,
            "grad_clip": s.grad_clip,
            **s.params,
        }
        for name, s in spec.stages.items()
    }
    sets = {
        name: {
            "data": data(s.data),
            "task": s.data.task,
            "metrics": list(s.metrics),
            "max_examples": s.max_examples,
            "max_new_tokens": s.max_new_tokens,
        }
        for name, s in spec.evaluation.sets.items()
    }
    trials = [
        {"path": list(t.path), "unlearning": list(t.unlearning), "seed": t.seed}
        for t in expand(spec)
    ]
    files = sorted({s["data"] for s in [*stages.values(), *sets.values()]})
    plan_file = root / "plan.json"
    plan_file.write_text(
        json.dumps(
            {
                "model_dir": str(base),
                "stages": stages,
                "eval_sets": sets,
                "trials": trials,
                "data_files": files,
            }
        )
    )
    study_file = root / "study.yaml"
    study_file.write_text(spec_to_yaml(spec))
    return study_file, plan_file


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return wall, done.stdout


def stageflow_breakdown(storage: Path) -> dict:
    """The driver's phases and the trials' phases (summed), from the study directory."""
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    trials = {k: sum(r["timing"].get(f"time/{k}_s", 0.0) for r in records) for k in TRIAL_PHASES}
    stage_steps: dict[str, list[float]] = {}  # as the script's: stage -> [seconds, steps]
    for meta in (storage / "prefixes").glob("*/meta.json"):
        meta = json.loads(meta.read_text())
        totals = stage_steps.setdefault(meta["stage"], [0.0, 0])
        totals[0] += sum(step["step_time_s"] for step in meta["step_metrics"])
        totals[1] += len(meta["step_metrics"])
    driver = json.loads((storage / "timing.json").read_text())
    return {
        "driver": driver,
        "trials": trials,
        "trial_wall_s": sum(r["timing"]["time/wall_s"] for r in records),
        "optimizer_steps": sum(n for _, n in stage_steps.values()),
        "stage_steps": stage_steps,
    }


def step_ratio(flow: dict, script: dict) -> float:
    """stageflow's time per optimizer step over the script's, each stage's mean step time
    weighted by the script's steps of that stage (the two run different mixes of stages)."""
    flow_mean = {name: t / n for name, (t, n) in flow["stage_steps"].items()}
    at_script_mix = sum(flow_mean[name] * n for name, (_, n) in script["stage_steps"].items())
    return at_script_mix / script["optimizer_steps"]


def measure_size(size: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study_file, plan_file = plan(root, SIZES[size])
        script_wall, out = timed([sys.executable, str(HERE / "hand_written.py"), str(plan_file)])
        script = json.loads(out.strip().splitlines()[-1])
        print(f"{size}: hand-written script {script_wall:.1f} s", flush=True)
        cli = [sys.executable, "-m", "stageflow.platform.commands.cli", "run", str(study_file)]
        flow_wall, _ = timed(cli)
        flow = stageflow_breakdown(root / "study")
        print(f"{size}: stageflow {flow_wall:.1f} s", flush=True)
    script.pop("trials")
    return {
        "size": size,
        "script": {**script, "process_wall_s": script_wall},
        "stageflow": {**flow, "process_wall_s": flow_wall},
        "wall_ratio": flow_wall / script_wall,
        "step_ratio": step_ratio(flow, script),
    }


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    return [measure_size(size) for size in args.sizes.split(",")], {}


def intro(meta: dict) -> str:
    return (
        f"One run on this {meta['cpus']}-core machine ({results_io.load_phrase(meta)}): per "
        "size, the hand-written for-loop (benchmarks/hand_written.py: plain transformers + torch, "
        "every ordering from the base model) and `stageflow run` of the same study, one after "
        "the other. Wall times are whole processes (imports, Ray, engine start included). "
        "stageflow trains each shared prefix once; the script trains every path in full. "
        "Trial phases are summed over the study's trials."
    )


def figures(rows: list[dict]) -> list[tuple[str, dict]]:
    """(label, {size: figure}) per line of the table."""

    def per_step(side: dict, steps_key: str, time_s: float) -> str:
        return f"{1000 * time_s / max(side[steps_key], 1):.1f}"

    lines = [
        ("hand-written script: wall time (s)", lambda r: f"{r['script']['process_wall_s']:.1f}"),
        ("stageflow: wall time (s)", lambda r: f"{r['stageflow']['process_wall_s']:.1f}"),
        ("**stageflow / script, wall time**", lambda r: f"**{r['wall_ratio']:.2f}x**"),
        ("script: optimizer steps", lambda r: r["script"]["steps"]),
        ("stageflow: optimizer steps", lambda r: r["stageflow"]["optimizer_steps"]),
        (
            "script: time per optimizer step (ms)",
            lambda r: per_step(r["script"], "steps", r["script"]["optimizer_steps"]),
        ),
        (
            "stageflow: time per optimizer step at the script's mix of stages (ms)",
            lambda r: per_step(
                r["script"], "steps", r["script"]["optimizer_steps"] * r["step_ratio"]
            ),
        ),
        ("**stageflow / script, per optimizer step**", lambda r: f"**{r['step_ratio']:.2f}x**"),
        (
            "script: evaluation (s; log-likelihood + generation)",
            lambda r: f"{r['script']['eval_loglik']:.1f} + {r['script']['eval_generation']:.1f}",
        ),
        *(
            (
                f"stageflow driver: {label} (s)",
                lambda r, k=k: f"{r['stageflow']['driver'][f'time/{k}_s']:.1f}",
            )
            for k, label in DRIVER_PHASES.items()
        ),
        (
            "stageflow: trials' wall time, summed (s)",
            lambda r: f"{r['stageflow']['trial_wall_s']:.1f}",
        ),
        (
            "stageflow: Tune's own time (Tune experiment − trials' wall time) (s)",
            lambda r: (
                f"{r['stageflow']['driver']['time/tune_s'] - r['stageflow']['trial_wall_s']:.1f}"
            ),
        ),
        *(
            (f"stageflow trials: {label} (s)", lambda r, k=k: f"{r['stageflow']['trials'][k]:.1f}")
            for k, label in TRIAL_PHASES.items()
        ),
    ]
    return [(label, {r["size"]: cell(r) for r in rows}) for label, cell in lines]


DRIVER_PHASES = {
    "ray_start": "Ray start",
    "prepare": "study directory, base model, data",
    "shared_actors": "shared actors (MLflow tracker, rollout engine start)",
    "tune": "Tune experiment (all trials)",
    "report": "table, analysis and report",
    "shutdown": "ending the shared actors",
}


BENCHMARK = results_io.Benchmark(
    name="vs_script",
    doc=__doc__,
    arguments=arguments,
    measure=measure_all,
    title="stageflow vs the hand-written for-loop",
    intro=intro,
    table_rows=figures,
    columns=results_io.figure_columns(SIZES),
    quick={"sizes": "quickstart"},
)

if __name__ == "__main__":
    BENCHMARK.main()
