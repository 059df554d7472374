"""A study's results as one tidy table: a row per (trial, stage or unlearning branch, metric),
for a notebook (`results(run_dir)`, a pandas DataFrame) or a file (`stageflow export`: CSV and
Parquet); and one of its checkpoints as a model directory (`stageflow export-model`). Read
from the trial records and the prefix cache; nothing runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stageflow.core.config import StudyError
from stageflow.core.expand import expand
from stageflow.core.files import staged_dir
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import load_study

# lazy: pandas (and pyarrow for Parquet) only where a table is built

COLUMNS = (
    "trial_id", "ordering", "seed", "oracle", "stage_index", "stage", "method", "metric",
    "value", "trial_run_id", "stage_run_id", "prefix_key",
)  # fmt: skip


def tidy_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished trial's evaluations after each stage of its path and each unlearning
    branch (`method`: the branch's stage name, "" on the path), with its hyper-parameters as
    `hp.<name>` columns and the MLflow run ids of the trial and of the stage's training."""
    study = StudyDir.existing(run_dir)
    spec = load_study(study.spec_file)
    cache = study.cache()
    rows = []
    for trial, record in study.records(expand(spec, study.searched_paths()), None):
        for entry in record["history"]:
            meta = cache.meta(entry["key"]) if cache.is_done(entry["key"]) else None
            common = {
                "trial_id": trial.trial_id,
                "ordering": trial.ordering,
                "seed": trial.seed,
                "oracle": trial.oracle,
                "stage_index": entry["index"],
                "stage": entry["stage"],
                "method": entry["stage"] if entry.get("branch") else "",
                "trial_run_id": record.get("run_id"),
                "stage_run_id": (meta or {}).get("stage_run_id"),
                "prefix_key": entry["key"],
                **{f"hp.{k}": v for k, v in trial.hparams.items()},
            }
            rows += [{**common, "metric": k, "value": v} for k, v in entry["metrics"].items()]
    return rows


def results(run_dir: str | Path) -> Any:
    """The tidy table of a study's results as a pandas DataFrame."""
    import pandas as pd

    rows = tidy_rows(run_dir)
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))
    return pd.DataFrame(rows, columns=[*COLUMNS, *extra])


def export(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Any, dict[str, Path]]:
    """Write results.csv and results.parquet (default: <run_dir>/export); the table and the
    files' paths."""
    table = results(run_dir)
    out = Path(out_dir) if out_dir else StudyDir.existing(run_dir).root / "export"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "parquet": out / "results.parquet"}
    for kind, path in paths.items():
        staging = path.with_name(f".{path.name}.partial")
        table.to_csv(staging, index=False) if kind == "csv" else table.to_parquet(staging)
        staging.replace(path)  # a reader sees the old file or the whole new one
    return table, paths


def export_model(
    run_dir: str | Path, trial_id: str, stage: str, out_dir: str | Path
) -> tuple[Path, str]:
    """Copy the checkpoint a finished trial had after `stage` (a stage of its path or an
    unlearning branch) to `out_dir`, a self-contained HF model directory (weights,
    config, tokenizer; under LoRA the merged model with its adapter in adapter/); the
    directory and the checkpoint's prefix key."""
    study = StudyDir.existing(run_dir)
    record = study.read_record(trial_id) if study.trials.is_dir() else None
    if record is None:
        found = sorted(p.stem for p in study.trials.glob("*.json")) if study.trials.is_dir() else []
        expected = f"one of {', '.join(found)}" if found else "a finished trial (none here)"
        raise StudyError(
            str(run_dir), "--trial", f"no finished trial '{trial_id}'; expected {expected}"
        )
    trained = [entry for entry in record["history"] if entry["index"]]
    entry = next((e for e in trained if e["stage"] == stage), None)
    if entry is None:
        names = ", ".join(e["stage"] for e in trained)
        raise StudyError(
            str(run_dir),
            "--stage",
            f"trial {trial_id} has no stage '{stage}'; expected one of {names}",
        )
    cache = study.cache()
    if not cache.is_done(entry["key"]):
        raise StudyError(
            str(run_dir),
            "--stage",
            f"the checkpoint after '{stage}' is no longer in the prefix cache; expected a kept "
            "checkpoint (`stageflow run` trains it again)",
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise StudyError(str(out_dir), "--out", "the directory is not empty; expected a new one")
    with staged_dir(out, replace=True) as staging:
        shutil.copytree(cache.model_dir(entry["key"]), staging, dirs_exist_ok=True)
    return out, entry["key"]
