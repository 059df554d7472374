"""What the benchmark scripts share: their skeleton (`Benchmark`), the machine's load, the
models they build, the learner and engine they measure, and their result tables and files.

`benchmarks/` is not a package: the scripts run as `python benchmarks/<name>.py`, which puts
this folder first on sys.path, so they import this module as `results_io`.

A script declares what is its own in a `Benchmark` (its options, its measurement, its page's
title, intro and columns) and runs `Benchmark.main()`. A run writes
`benchmarks/results/<name>.json` ({"command", "meta", ..., "results"}, indent 1) and
`benchmarks/results/<name>.md`, and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


# what each of a trial's `time/<phase>_s` (the Stopwatch of platform/engine/workers.py) measures
TRIAL_PHASES = {
    "learner_start": "learner start",
    "engine_start": "engine start (per_trial)",
    "train": "training stages, all of it (engine set-up per stage, tokenising, pi_ref)",
    "in_optimizer_steps": "optimizer steps",
    "in_rl_generation": "RL generation",
    "in_weight_sync": "RL weight sync",
    "eval_loglik": "evaluation: log-likelihood",
    "eval_generation": "evaluation: generation",
    "weight_sync": "evaluation: weight sync",
    "checkpoint_write": "checkpoint write",
    "checkpoint_load": "checkpoint load",
    "wait_prefix": "waiting for another trial's prefix",
    "tracking": "MLflow logging",
    "other": "the rest (bookkeeping between phases)",
    "wall": "trial wall time (sum)",
}


def trial_phases(*names: str) -> dict[str, str]:
    """{phase: label} of these trial phases, in this order, for a results table."""
    return {name: TRIAL_PHASES[name] for name in names}


def command_line(name: str, quick: bool = False) -> str:
    """The command a results file records: `python benchmarks/<name>.py [--quick]`."""
    return f"python benchmarks/{name}.py" + (" --quick" if quick else "")


def load_average() -> float:
    """The machine's 1-minute load average (other work competes with the benchmark)."""
    return os.getloadavg()[0]


def load_span(start: float) -> list[float]:
    """meta["load_average_1m_start_end"]: [load at the start, load now]."""
    return [start, load_average()]


def load_phrase(meta: dict[str, Any]) -> str:
    """The load-average clause of a results page, from meta["load_average_1m_start_end"]."""
    start, end = meta["load_average_1m_start_end"]
    return f"1-min load average {start:.1f} at the start, {end:.1f} at the end"


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    """'median [min, max]' of repeated measurements (just the value when there is one)."""
    import statistics

    mid = f"{statistics.median(values):.{digits}f}{unit}"
    if len(values) == 1:
        return mid
    return f"{mid} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def load_range(reps: list[dict], sides: Iterable[str]) -> str:
    """'lowest – highest' 1-min load average measured before each side's run of each repetition
    (each side's dict holds it as "load_1m_before")."""
    loads = [rep[side]["load_1m_before"] for rep in reps for side in sides]
    return f"{min(loads):.1f} – {max(loads):.1f}"


def memcpy_bandwidth(nbytes: int = 256 << 20, reps: int = 20) -> float:
    """Bytes/s of one large copy (torch copy_ of a uint8 buffer of `nbytes`), fastest of reps."""
    import time

    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / min(times)


# the locally built models the benchmarks measure (TinyModelSpec fields)
MODEL_SIZES = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),
    "25M": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
}


def tiny_models(sizes: dict[str, dict[str, int]]) -> Iterator[tuple[str, Path]]:
    """(name, model folder) of each of `sizes` ({name: TinyModelSpec fields}), built one at a
    time in a temporary folder that is removed once the loop over them ends."""
    from stageflow.core.models import TinyModelSpec, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        for name, dims in sizes.items():
            yield name, build_tiny_model(Path(tmp) / name, TinyModelSpec(**dims))


def param_count(model_dir: Path) -> int:
    """The number of parameters in `model_dir`'s model.safetensors."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(Path(model_dir) / "model.safetensors").values())


@contextmanager
def learner_and_engine(model_dir: Path) -> Iterator[tuple[Any, Any]]:
    """(LearnerGroup, RolloutGroup) on `model_dir`, the weight-sync benchmarks' pair: one learner
    rank (DeepSpeed ZeRO-0, fp32) and one vLLM engine worker, Ray actors on the CPU (Ray already
    started); both shut down on exit, the learner first."""
    from stageflow.actors.group import Placement
    from stageflow.actors.learner import LearnerGroup
    from stageflow.actors.rollout import RolloutGroup
    from stageflow.core.config import LearnerSpec, RolloutSpec

    cpu = Placement(device="cpu")
    engine = RolloutSpec(
        workers=1, max_model_len=256, kv_cache_gib=0.25, gpu_memory_utilization=0.3
    )
    rollout = RolloutGroup(model_dir, engine, cpu)
    try:
        learner = LearnerGroup(model_dir, LearnerSpec(ranks=1, zero_stage=0), cpu)
        try:
            yield learner, rollout
        finally:
            learner.shutdown()
    finally:
        rollout.shutdown()


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray instance of `num_cpus` logical CPUs (no dashboard, workers' logs not
    forwarded), shut down on exit."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


ALIGN = {"left": "---", "right": "---:"}

# A table column: (header, "left" or "right", cell), as markdown_table reads it.
Column = tuple[str, str, Callable[[Any], object]]


def markdown_table(rows: Iterable[Any], columns: list[Column]) -> list[str]:
    """A markdown table's lines: the header, the alignment line, then one line per row.

    `columns`: (header, "left" or "right", cell) per column, where cell(row) is what the
    column shows for that row (str() of it). Lines read `| a | b |`; an empty cell is `| |`.
    """

    def line(cells: Iterable[object]) -> str:
        return "|" + "".join(f" {c} |" if c else " |" for c in map(str, cells))

    return [
        line(header for header, _, _ in columns),
        line(ALIGN[align] for _, align, _ in columns),
        *(line(cell(row) for _, _, cell in columns) for row in rows),
    ]


def figure_columns(names: Iterable[str]) -> list[Column]:
    """The columns of a table of figures whose lines are (label, {name: figure}): the label,
    then one right-aligned column per name (blank where a line has no figure for it)."""
    return [
        ("", "left", lambda line: line[0]),
        *((name, "right", lambda line, name=name: line[1].get(name, "")) for name in names),
    ]


def markdown_page(title: str, command: str, intro: str, table: list[str]) -> str:
    """A results page: `# title`, the command, the paragraph `intro`, then the table's lines."""
    return "\n".join([f"# {title}", "", f"Command: `{command}`", "", intro, "", *table]) + "\n"


def write_results(
    name: str,
    command: str,
    meta: dict[str, Any],
    results: Any,
    markdown_text: str,
    *,
    extra: dict[str, Any] | None = None,
    directory: Path = RESULTS,
) -> Path:
    """Write `<directory>/<name>.json` ({"command", "meta", **extra, "results"}) and
    `<directory>/<name>.md`, print the markdown and return the .md path."""
    out = Path(directory) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "meta": meta, **(extra or {}), "results": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    md = out.with_suffix(".md")
    md.write_text(markdown_text)
    print(md.read_text())
    return md


@dataclass(frozen=True)
class Benchmark:
    """A benchmark script's own parts; `main()` is the skeleton that runs them.

    main(): parses the command line (the description: the first line of `doc`; `arguments`
    adds the script's options, `--quick` among them) and, given --quick, sets the options that
    `quick` names to its values. Then `measure(args)` runs, between two readings of the load
    average, and returns the results' rows and the meta of its own (what it found about the
    machine or the run). The results file's meta: the script's options (their values after
    --quick; not --quick itself, the command shows it), "cpus", measure's meta, then
    "load_average_1m_start_end". The page: `# title`, the command, intro(meta), then the table
    of `columns` over the rows (over table_rows(rows) where that is given). write_results
    writes `benchmarks/results/<name>.json` and `.md` and prints the page.

    `worker`, for a script that measures in fresh subprocesses of itself: `python
    benchmarks/<name>.py --worker CONFIG` (a hidden option) prints the JSON of
    worker(json.loads(CONFIG)) and does nothing else.
    """

    name: str
    doc: str
    arguments: Callable[[argparse.ArgumentParser], None]
    measure: Callable[[argparse.Namespace], tuple[list[dict], dict[str, Any]]]
    title: str
    intro: Callable[[dict[str, Any]], str]
    columns: list[Column]
    table_rows: Callable[[list[dict]], Iterable[Any]] | None = None
    quick: dict[str, Any] = field(default_factory=dict)
    worker: Callable[[dict], dict] | None = None

    def markdown(self, rows: list[dict], command: str, meta: dict[str, Any]) -> str:
        """The results page of `rows`."""
        table_rows = self.table_rows(rows) if self.table_rows else rows
        table = markdown_table(table_rows, self.columns)
        return markdown_page(self.title, command, self.intro(meta), table)

    def main(self) -> None:
        parser = argparse.ArgumentParser(description=self.doc.splitlines()[0])
        if self.worker:
            parser.add_argument("--worker", help=argparse.SUPPRESS)
        self.arguments(parser)
        args = parser.parse_args()
        if self.worker and args.worker:
            print(json.dumps(self.worker(json.loads(args.worker))))
            return
        if args.quick:
            vars(args).update(self.quick)
        options = {k: v for k, v in vars(args).items() if k not in ("quick", "worker")}
        load_start = load_average()
        rows, measured = self.measure(args)
        meta = {
            **options,
            "cpus": os.cpu_count(),
            **measured,
            "load_average_1m_start_end": load_span(load_start),
        }
        command = command_line(self.name, args.quick)
        write_results(self.name, command, meta, rows, self.markdown(rows, command, meta))
