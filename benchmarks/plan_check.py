"""`stageflow plan`'s time estimate against the measured wall time: the quickstart and a study
twice its size (8 seeds instead of 4).

Command (repo root, the venv active):

    python benchmarks/plan_check.py    # about 25 min on 2 CPU cores

Writes benchmarks/results/plan_check.json and benchmarks/results/plan_check.md.

Both studies are first estimated from a calibration run (`plan --time calibrate`: two short
trials of the study, nothing of it measured before), then run with `stageflow run` in a fresh
storage folder; the larger study is also estimated from the timings of the quickstart run just
finished beside it (`plan --time auto`, what a researcher growing a study sees). Measured: the
study's wall time as its driver records it (`timing.json`, Ray start to shutdown) and the
`stageflow run` process's (with Python's start and imports). The plan's counts are checked
against what the runs wrote (checkpoints and evaluations).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_io

from stageflow.core.registry import load_plugins
from stageflow.platform.commands.validate import load_and_validate
from stageflow.platform.engine.study_plan import (
    calibrate,
    concurrency,
    earlier_costs,
    planned_work,
)

STUDY = "studies/quickstart.yaml"
# study -> (its storage folder, overrides)
CASES = {
    "quickstart": ("quickstart", []),
    "quickstart, 8 seeds": ("quickstart-8-seeds", ["seeds=[0,1,2,3,4,5,6,7]"]),
}


def estimate(spec, work, costs, root: Path) -> dict:
    source = costs.source.replace(str(root), "<storage>")  # no machine path in the results
    return {"wall_s": costs.estimate(work, concurrency(spec)).wall_s, "source": source}


def run(overrides: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stageflow.platform.commands.cli", "run", STUDY, *overrides],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return time.perf_counter() - start


def measure(args) -> tuple[list[dict], dict]:
    load_plugins()
    root = Path(tempfile.mkdtemp(prefix="stageflow-plan-check-"))
    specs, rows = {}, []
    for case, (folder, extra) in CASES.items():
        overrides = [f"storage_dir={root / folder}", *extra]
        specs[case] = (root / folder, overrides, load_and_validate(STUDY, overrides))
    works = {case: planned_work(spec) for case, (_, _, spec) in specs.items()}
    calibrated = {
        case: estimate(spec, works[case], calibrate(spec, STUDY), root)
        for case, (_, _, spec) in specs.items()
    }
    for case, (study, overrides, spec) in specs.items():
        work = works[case]
        history = earlier_costs(spec, work)  # a study run before, beside it
        estimates = [calibrated[case]] + ([estimate(spec, work, history, root)] if history else [])
        process_s = run(overrides)
        driver_s = json.loads((study / "timing.json").read_text())["time/wall_s"]
        written = {
            "checkpoints": len(list((study / "prefixes").glob("*/meta.json"))),
            "evaluations": len(list((study / "prefixes").glob("*.eval.json"))),
        }
        planned = {"checkpoints": len(work.trainings), "evaluations": len(work.evaluations)}
        for e in estimates:
            rows.append({
                "study": case, "trials": len(work.trials), "estimate_from": e["source"],
                "estimate_s": e["wall_s"], "driver_s": driver_s, "process_s": process_s,
                "error_vs_driver": e["wall_s"] / driver_s - 1, "planned": planned,
                "written": written,
            })  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)
    return rows, {"storage": "a temporary folder, removed after"}


def intro(meta: dict) -> str:
    return (
        "The estimate against the study's wall time (its driver's timing.json, Ray start to "
        "shutdown) and the `stageflow run` process's. Counts: checkpoints and evaluations the "
        f"plan announced and the run wrote. {results_io.load_phrase(meta)}"
    )


COLUMNS: list[results_io.Column] = [
    ("study", "left", lambda r: r["study"]),
    ("trials", "right", lambda r: r["trials"]),
    ("estimated from", "left", lambda r: r["estimate_from"]),
    ("estimate", "right", lambda r: f"{r['estimate_s']:.0f} s"),
    ("measured (driver)", "right", lambda r: f"{r['driver_s']:.0f} s"),
    ("measured (process)", "right", lambda r: f"{r['process_s']:.0f} s"),
    ("estimate vs driver", "right", lambda r: f"{r['error_vs_driver']:+.1%}"),
    ("checkpoints planned / written", "right",
     lambda r: f"{r['planned']['checkpoints']} / {r['written']['checkpoints']}"),
    ("evaluations planned / written", "right",
     lambda r: f"{r['planned']['evaluations']} / {r['written']['evaluations']}"),
]  # fmt: skip


def arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="the same run (no shorter one)")


BENCHMARK = results_io.Benchmark(
    name="plan_check",
    doc=__doc__,
    arguments=arguments,
    measure=measure,
    title="stageflow plan: estimated vs measured wall time",
    intro=intro,
    columns=COLUMNS,
)

if __name__ == "__main__":
    BENCHMARK.main()
