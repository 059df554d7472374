"""`stageflow plan`: a study's size, disk and time before it runs, and with `--pilot` the
seeds it needs (platform/engine/study_plan.py, platform/results/power.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from stageflow.core.config import StudySpec
from stageflow.core.footprint import checkpoint_bytes, size_text
from stageflow.platform.engine.progress import clock
from stageflow.platform.engine.study_plan import (
    Work,
    calibrate,
    concurrency,
    earlier_costs,
    planned_work,
)
from stageflow.platform.results.power import TARGET_POWER, pilot_effects
from stageflow.platform.results.tables import format_table


def size_lines(spec: StudySpec, work: Work) -> list[str]:
    trainings = Counter(step.name for step in work.trainings.values())
    per_stage = ", ".join(f"{name} {count}" for name, count in trainings.items())
    one = checkpoint_bytes(spec)
    lines = [
        f"trials            {len(work.trials)} ({len({t.path for t in work.trials})} orderings, "
        f"{len(spec.seeds)} seeds)",
        f"stage trainings   {len(work.trainings)} after prefix sharing, of {work.stage_runs} "
        f"the trials walk ({per_stage})",
        f"evaluations       {len(work.evaluations)} evaluation-set results",
        f"checkpoints       {len(work.trainings)} x {size_text(one)} = "
        f"{size_text(len(work.trainings) * one)}; `prune --keep final` keeps "
        f"{len(work.kept)} ({size_text(len(work.kept) * one)})",
    ]
    if spec.orderings.search is not None:
        lines.append(
            f"a search          these are orderings drawn at random until its budget of "
            f"{spec.orderings.search.budget} stage trainings is spent: the most it trains"
        )
    if spec.storage.max_gb is not None:
        lines.append(
            f"storage.max_gb    {spec.storage.max_gb:g}: intermediate checkpoints are removed "
            "as the trials pass them while the study's exceed it"
        )
    return lines


def time_lines(spec: StudySpec, work: Work, source: str, how: str) -> list[str]:
    """The wall-time estimate, from an earlier study in the same storage or a calibration."""
    if how == "none":
        return []
    costs = earlier_costs(spec, work) if how == "auto" else None
    if costs is None:
        print(
            f"calibrating: two short trials of {spec.name} (no earlier study here timed all its stages)",
            flush=True,
        )
        costs = calibrate(spec, source)
    estimate = costs.estimate(work, concurrency(spec))
    at_once = f"{estimate.concurrent} trial{'s' if estimate.concurrent > 1 else ''} at a time"
    return [
        f"wall time         about {clock(estimate.wall_s)} on this machine ({at_once}), "
        f"from {costs.source}",
        f"                  driver {clock(estimate.fixed_s)}, first trial's start "
        f"{clock(estimate.first_trial_s)}, trials {clock(estimate.trials_s)}, training "
        f"{clock(estimate.training_s)}, evaluation {clock(estimate.evaluation_s)}",
    ]


def pilot_lines(spec: StudySpec, pilot: str) -> list[str]:
    score, test, effects = pilot_effects(pilot)
    rows = []
    for e in effects:
        needed = e.needed(test)
        rows.append([
            e.method, e.orderings, e.seeds, "blocked" if e.blocked else "across trials",
            e.cohens_f, e.variance**0.5, needed if needed is not None else "none (no effect)",
            e.power_at(len(spec.seeds), test),
        ])  # fmt: skip
    level = effects[0].level
    headers = [
        "method", "orderings", "pilot seeds", "design", "effect (Cohen's f)", "residual sd",
        f"seeds for {TARGET_POWER:.0%} power", f"power with {len(spec.seeds)} seeds",
    ]  # fmt: skip
    return [
        "",
        f"pilot {pilot}: {score}, {test} test at level {level:.3g} (alpha / {len(effects)} "
        "methods, Holm's strictest); effect bias-corrected for the pilot's noise, power of the "
        "F test (docs: platform/results/power.py)",
        format_table(headers, rows),
    ]


def plan_lines(
    spec: StudySpec, source: str, how: str = "auto", pilot: str | None = None
) -> Iterator[str]:
    """Everything `stageflow plan` prints, line by line (the time estimate may calibrate
    first); a bad pilot fails before anything is printed or run."""
    after = pilot_lines(spec, pilot) if pilot else []
    work = planned_work(spec)
    yield f"plan of {spec.name} ({source}), the whole study from scratch"
    yield from size_lines(spec, work)
    yield from time_lines(spec, work, source, how)
    yield from after
