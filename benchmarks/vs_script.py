"""stageflow against the hand-written for-loop: the quickstart study, and the same study at the
25M-parameter size, each run by `stageflow run` and by benchmarks/hand_written.py, interleaved.

Command (repo root, the venv active):

    python benchmarks/vs_script.py           # about 100 min on 2 CPU cores
    python benchmarks/vs_script.py --quick   # the quickstart size only, one repetition

Writes benchmarks/results/vs_script.json and benchmarks/results/vs_script.md.

Per size, the study's data and base model are prepared once (stageflow's own generators and
model builder; every run reads the same files). Three sides: the careful loop (hand_written.py:
plain transformers + torch in one process, each distinct prefix trained once and each distinct
checkpoint evaluated once, as a researcher who knows the study's shape writes it), the naive
loop (the same code, every trial from the base model) and `stageflow run` of the same study
(its prefix cache in a new study directory each time). Each of `--reps` repetitions runs the
three as whole processes in a new random order on the same cores; a ratio compares two sides
of the same repetition. Reported: median [min, max] over repetitions of the wall times and
ratios, optimizer-step time per step (per stage, at the careful loop's mix of stages),
evaluation time, the 1-minute load average before each process, and where stageflow's time
went (the driver's phases and the trials' `time/<phase>_s` summed over trials, medians over
repetitions). The 25M size is the quickstart with the 25M-parameter model, one seed and a
quarter of every stage's steps.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_io

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "studies" / "quickstart.yaml"
SIDES = ("careful", "naive", "stageflow")
# the 25M-parameter model of the other benchmarks, one seed and every stage's steps scaled by
# the same factor so that a repetition stays affordable
SIZES = {
    "quickstart": {"overrides": [], "step_scale": 1.0},
    "25M": {
        "overrides": [
            *(f"model.tiny.{k}={v}" for k, v in results_io.MODEL_SIZES["25M"].items()),
            "seeds=[0]",
        ],
        "step_scale": 0.25,
    },
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
    parser.add_argument("--quick", action="store_true", help="the quickstart size, one repetition")
    parser.add_argument("--sizes", default="quickstart,25M", help="comma-separated: quickstart,25M")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the three sides")


def size_overrides(size: str) -> list[str]:
    """The study's overrides at `size`: the model and seeds, and every stage's steps scaled."""
    from stageflow.core.study_file import load_study

    config = SIZES[size]
    spec = load_study(QUICKSTART, config["overrides"])
    scaled = [
        f"stages.{name}.steps={max(1, round(stage.steps * config['step_scale']))}"
        for name, stage in spec.stages.items()
        if stage.steps is not None
    ]
    return [*config["overrides"], *scaled]


def study_file(root: Path, overrides: list[str], name: str) -> Path:
    """The study at these overrides, stored in `root / name`, as a study file."""
    from stageflow.core.study_file import load_study, spec_to_yaml

    spec = load_study(QUICKSTART, [*overrides, f"storage_dir={root / name}"])
    path = root / f"{name}.yaml"
    path.write_text(spec_to_yaml(spec))
    return path


def plan(root: Path, overrides: list[str]) -> Path:
    """The hand-written loop's plan of the study at `overrides` (data and base model prepared
    by stageflow in `root / prepared`)."""
    from stageflow.core.data_files import materialize
    from stageflow.core.expand import expand
    from stageflow.core.study_file import load_study
    from stageflow.platform.engine.runner import prepare

    spec = load_study(QUICKSTART, [*overrides, f"storage_dir={root / 'prepared'}"])
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
    payload = {
        "model_dir": str(base),
        "stages": stages,
        "eval_sets": sets,
        "trials": trials,
        "data_files": files,
    }
    plan_file.write_text(json.dumps(payload))
    return plan_file


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
    stage_steps: dict[str, list[float]] = {}  # as the loop's: stage -> [seconds, steps]
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
        "optimizer_steps_s": sum(t for t, _ in stage_steps.values()),
        "stage_steps": stage_steps,
    }


def run_side(side: str, root: Path, rep: int, overrides: list[str], plan_file: Path) -> dict:
    """One side's process, timed: a loop (its JSON line) or `stageflow run` (its breakdown)."""
    if side == "stageflow":
        study = study_file(root, overrides, f"study-{rep}")
        cli = [sys.executable, "-m", "stageflow.platform.commands.cli", "run", str(study)]
        wall, _ = timed(cli)
        return {**stageflow_breakdown(root / f"study-{rep}"), "process_wall_s": wall}
    naive = ["--naive"] if side == "naive" else []
    wall, out = timed([sys.executable, str(HERE / "hand_written.py"), str(plan_file), *naive])
    return {**json.loads(out.strip().splitlines()[-1]), "process_wall_s": wall}


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest |difference| between two loops' final metrics, trial by trial."""
    return max(abs(x["metrics"][k] - y["metrics"][k]) for x, y in zip(a, b) for k in x["metrics"])


def step_ratios(flow: dict, loop: dict) -> dict[str, float]:
    """stageflow's mean optimizer-step time over the loop's, per stage, and over all stages at
    the loop's mix of stages ("all": each stage's mean weighted by the loop's steps of it)."""
    flow_mean = {name: t / n for name, (t, n) in flow["stage_steps"].items()}
    ratios = {name: flow_mean[name] * n / t for name, (t, n) in loop["stage_steps"].items()}
    at_loop_mix = sum(flow_mean[name] * n for name, (_, n) in loop["stage_steps"].items())
    return {**ratios, "all": at_loop_mix / loop["optimizer_steps"]}


def repetition(size: str, rep: int, root: Path, overrides: list[str], plan_file: Path) -> dict:
    """The three sides once, in a random order, and their ratios."""
    order = random.Random(f"{size}-{rep}").sample(SIDES, len(SIDES))
    sides = {}
    for side in order:
        load = results_io.load_average()
        sides[side] = {**run_side(side, root, rep, overrides, plan_file), "load_1m_before": load}
        print(f"{size} rep {rep}: {side} {sides[side]['process_wall_s']:.1f} s", flush=True)
    careful, naive, flow = (sides[side] for side in SIDES)
    wall = {side: sides[side]["process_wall_s"] for side in SIDES}
    differs = largest_difference(careful.pop("trials"), naive.pop("trials"))
    return {
        "rep": rep,
        "order": order,
        **sides,
        "wall_vs_careful": wall["stageflow"] / wall["careful"],
        "wall_vs_naive": wall["stageflow"] / wall["naive"],
        "careful_vs_naive": wall["careful"] / wall["naive"],
        "step_vs_careful": step_ratios(flow, careful),
        "loops_max_metric_difference": differs,
    }


def measure_size(size: str, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = size_overrides(size)
        plan_file = plan(root, overrides)
        kinds = {k: s["objective"] for k, s in json.loads(plan_file.read_text())["stages"].items()}
        runs = [repetition(size, rep, root, overrides, plan_file) for rep in range(reps)]
    return {"size": size, "overrides": overrides, "stage_kinds": kinds, "reps": runs}


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    return [measure_size(size, args.reps) for size in args.sizes.split(",")], {}


def intro(meta: dict) -> str:
    return (
        f"{meta['reps']} repetitions on this {meta['cpus']}-core machine "
        f"({results_io.load_phrase(meta)}): per size, the careful loop "
        "(benchmarks/hand_written.py: plain transformers + torch, each distinct prefix trained "
        "once, each distinct checkpoint evaluated once), the naive loop (every trial from the "
        "base model) and `stageflow run` of the same study, in a new random order each "
        "repetition. Wall times are whole processes (imports, Ray, engine start included). "
        "Figures: median [min, max] over repetitions; a ratio compares two sides of one "
        "repetition. stageflow's phases are summed over a study's trials, medians over "
        "repetitions. The 25M size runs a quarter of every stage's steps and one seed."
    )


def figures(rows: list[dict]) -> list[tuple[str, dict]]:
    """(label, {size: figure}) per line of the table."""

    def over(get, digits: int = 1, unit: str = "", bold: bool = False):
        def cell(row: dict) -> str:
            text = results_io.spread([get(rep) for rep in row["reps"]], digits, unit)
            return f"**{text}**" if bold else text

        return cell

    stage_names = sorted({name for row in rows for name in row["stage_kinds"]})
    lines = [
        *(
            (f"{label}: wall time (s)", over(lambda rep, side=side: rep[side]["process_wall_s"]))
            for side, label in zip(SIDES, ("careful loop", "naive loop", "stageflow"))
        ),
        (
            "**stageflow / careful loop, wall time**",
            over(lambda rep: rep["wall_vs_careful"], 2, "x", bold=True),
        ),
        ("stageflow / naive loop, wall time", over(lambda rep: rep["wall_vs_naive"], 2, "x")),
        ("careful loop / naive loop, wall time", over(lambda rep: rep["careful_vs_naive"], 2, "x")),
        (
            "careful and naive loops' final metrics: largest difference",
            lambda row: f"{max(rep['loops_max_metric_difference'] for rep in row['reps']):.1e}",
        ),
        (
            "optimizer steps: careful loop / naive loop / stageflow",
            lambda row: " / ".join(
                str(row["reps"][0][side][key])
                for side, key in (
                    ("careful", "steps"),
                    ("naive", "steps"),
                    ("stageflow", "optimizer_steps"),
                )
            ),
        ),
        (
            "careful loop: time per optimizer step (ms)",
            over(lambda rep: 1000 * rep["careful"]["optimizer_steps"] / rep["careful"]["steps"]),
        ),
        (
            "stageflow: time per optimizer step at the careful loop's mix of stages (ms)",
            over(
                lambda rep: (
                    1000
                    * rep["careful"]["optimizer_steps"]
                    * rep["step_vs_careful"]["all"]
                    / rep["careful"]["steps"]
                )
            ),
        ),
        (
            "**stageflow / careful loop, per optimizer step**",
            over(lambda rep: rep["step_vs_careful"]["all"], 2, "x", bold=True),
        ),
        *(
            (
                f"stageflow / careful loop, per optimizer step of `{name}`",
                lambda row, name=name: (
                    f"{results_io.spread([rep['step_vs_careful'][name] for rep in row['reps']], 2, 'x')} "
                    f"({row['stage_kinds'][name]})"
                    if name in row["stage_kinds"]
                    else ""
                ),
            )
            for name in stage_names
        ),
        (
            "careful loop: evaluation (s; log-likelihood + generation)",
            lambda row: (
                f"{results_io.spread([rep['careful']['eval_loglik'] for rep in row['reps']])} + "
                f"{results_io.spread([rep['careful']['eval_generation'] for rep in row['reps']])}"
            ),
        ),
        (
            "careful loop / naive loop: checkpoints evaluated",
            lambda row: (
                f"{row['reps'][0]['careful']['evaluations']} / "
                f"{row['reps'][0]['naive']['evaluations']}"
            ),
        ),
        *(
            (
                f"stageflow driver: {label} (s)",
                over(lambda rep, k=k: rep["stageflow"]["driver"][f"time/{k}_s"]),
            )
            for k, label in DRIVER_PHASES.items()
        ),
        (
            "stageflow: trials' wall time, summed (s)",
            over(lambda rep: rep["stageflow"]["trial_wall_s"]),
        ),
        (
            "stageflow: Tune's own time (Tune experiment − trials' wall time) (s)",
            over(
                lambda rep: (
                    rep["stageflow"]["driver"]["time/tune_s"] - rep["stageflow"]["trial_wall_s"]
                )
            ),
        ),
        *(
            (f"stageflow trials: {label} (s)", over(lambda rep, k=k: rep["stageflow"]["trials"][k]))
            for k, label in TRIAL_PHASES.items()
        ),
        (
            "1-min load average before each process (min – max)",
            lambda row: results_io.load_range(row["reps"], SIDES),
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
    quick={"sizes": "quickstart", "reps": 1},
)

if __name__ == "__main__":
    BENCHMARK.main()
