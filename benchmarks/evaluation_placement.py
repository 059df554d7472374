"""Who scores a checkpoint: the trial's learner, or an evaluator actor beside it, on one machine
and on a simulated cluster, interleaved.

Command (repo root, the venv active):

    python benchmarks/evaluation_placement.py           # about 30 min on 2 CPU cores
    python benchmarks/evaluation_placement.py --quick   # one repetition, one machine only

Writes benchmarks/results/evaluation_placement.json and .md.

The study is the quickstart with `--seeds` seeds (every stage, evaluation set and step as in
studies/quickstart.yaml). Each setting runs it under `evaluation.placement: learner` and
`evaluators`, as whole `stageflow run` processes in a new study directory each time, in a new
random order in each of `--reps` repetitions; a ratio compares the two of one repetition. The
settings: this machine (the embedded Ray) and a simulated cluster (`ray.cluster_utils.Cluster`
on 127.0.0.1: a head without CPUs and `--nodes` worker nodes of 4 logical CPUs, every process
sharing this machine's cores; RAY_ADDRESS set). Reported: the study's wall time, median [min,
max] over repetitions, the ratio evaluators / learner, and the trials' evaluation time (on the
trial's thread, or beside it), the wait for evaluations at a trial's end and the evaluators'
start, summed over trials (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import results_io

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"
PLACEMENTS = ("learner", "evaluators")
SETTINGS = ("one machine", "simulated cluster")
# the trials' phases that show where evaluation went (bg_: on the thread beside the trial's)
PHASES = {
    "eval_loglik": "evaluation on the trial's thread: log-likelihood",
    "eval_generation": "evaluation on the trial's thread: generation",
    "bg_eval_loglik": "evaluation beside the trial: log-likelihood",
    "bg_eval_generation": "evaluation beside the trial: generation",
    "bg_evaluator_start": "evaluator start",
    "wait_evaluations": "waiting for evaluations at the trial's end",
    "learner_start": "learner start",
    "in_optimizer_steps": "optimizer steps",
}


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one repetition, one machine")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2, help="the quickstart's first seeds")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))


def study_file(root: Path, placement: str, name: str, seeds: int) -> Path:
    from stageflow.core.study_file import load_study, spec_to_yaml

    overrides = [
        f"evaluation.placement={placement}",
        f"seeds=[{','.join(map(str, range(seeds)))}]",
        f"storage_dir={root / name}",
    ]
    path = root / f"{name}.yaml"
    path.write_text(spec_to_yaml(load_study(QUICKSTART, overrides)))
    return path


@contextmanager
def setting_env(setting: str, nodes: int):
    """The environment `stageflow run` gets: this machine's, or RAY_ADDRESS of a simulated
    cluster that lives while the setting is measured."""
    if setting == "one machine":
        yield {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        return
    from ray.cluster_utils import Cluster

    local = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **local})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield {**os.environ, "RAY_ADDRESS": cluster.address}
    finally:
        cluster.shutdown()


def run_once(path: Path, storage: Path, env: dict) -> dict:
    load = results_io.load_average()
    start = time.perf_counter()
    cli = [sys.executable, "-m", "stageflow.platform.commands.cli", "run", str(path)]
    done = subprocess.run(cli, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{path.name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in (storage / "trials").glob("*.json")]
    phases = {k: sum(r["timing"].get(f"time/{k}_s", 0.0) for r in records) for k in PHASES}
    return {"wall_s": wall, "load_1m_before": load, "trials": len(records), "phases_s": phases}


def measure_setting(setting: str, args: argparse.Namespace, root: Path) -> dict:
    reps = []
    with setting_env(setting, args.nodes) as env:
        for rep in range(args.reps):
            order = random.Random(f"{setting}-{rep}").sample(PLACEMENTS, len(PLACEMENTS))
            runs = {}
            for placement in order:
                name = f"{setting.replace(' ', '_')}-{placement}-{rep}"
                path = study_file(root, placement, name, args.seeds)
                runs[placement] = run_once(path, root / name, env)
                print(
                    f"{setting} rep {rep}: {placement} {runs[placement]['wall_s']:.1f} s",
                    flush=True,
                )
            ratio = runs["evaluators"]["wall_s"] / runs["learner"]["wall_s"]
            reps.append({"rep": rep, "order": order, **runs, "evaluators_vs_learner": ratio})
    return {"setting": setting, "reps": reps}


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_setting(s, args, Path(tmp)) for s in args.settings.split(",")]
    return rows, {}


def intro(meta: dict) -> str:
    return (
        f"{meta['reps']} repetitions on this {meta['cpus']}-core machine "
        f"({results_io.load_phrase(meta)}): the quickstart with {meta['seeds']} seeds under each "
        "placement, whole `stageflow run` processes in a new random order each repetition, on "
        f"this machine's embedded Ray and on a simulated cluster of {meta['nodes']} nodes x 4 "
        "logical CPUs (one machine's cores underneath). Figures: median [min, max] over "
        "repetitions; the ratio compares the two placements of one repetition; phases are "
        "summed over a study's trials."
    )


def figures(rows: list[dict]) -> list[tuple[str, dict]]:
    """(label, {setting: figure}) per line of the table."""

    def over(get, digits: int = 1, unit: str = ""):
        return lambda row: results_io.spread([get(rep) for rep in row["reps"]], digits, unit)

    lines = [
        *(
            (f"study wall time, {p} (s)", over(lambda rep, p=p: rep[p]["wall_s"]))
            for p in PLACEMENTS
        ),
        (
            "**evaluators / learner, wall time**",
            over(lambda rep: rep["evaluators_vs_learner"], 2, "x"),
        ),
        *(
            (f"{label}, {p} (s)", over(lambda rep, p=p, k=k: rep[p]["phases_s"][k]))
            for k, label in PHASES.items()
            for p in PLACEMENTS
        ),
        (
            "1-min load average before each run (min – max)",
            lambda row: results_io.load_range(row["reps"], PLACEMENTS),
        ),
    ]
    return [(label, {r["setting"]: cell(r) for r in rows}) for label, cell in lines]


BENCHMARK = results_io.Benchmark(
    name="evaluation_placement",
    doc=__doc__,
    arguments=arguments,
    measure=measure_all,
    title="Evaluation on the learner or on evaluator actors",
    intro=intro,
    table_rows=figures,
    columns=results_io.figure_columns(SETTINGS),
    quick={"reps": 1, "settings": "one machine"},
)

if __name__ == "__main__":
    BENCHMARK.main()
