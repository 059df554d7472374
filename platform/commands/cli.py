"""The `stageflow` command: validate, run and watch multi-stage post-training studies."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

from stageflow.core.config import StudyError
from stageflow.core.expand import expand, ordering_paths, trial_count
from stageflow.core.footprint import size_text
from stageflow.core.study_dir import StudyDir
from stageflow.core.study_file import load_study
from stageflow.platform.commands.prune import KEEP, prune
from stageflow.platform.commands.status import study_status
from stageflow.platform.commands.submit import submit_study
from stageflow.platform.commands.ui_page import missing_browser, screenshot_study
from stageflow.platform.commands.validate import load_and_validate
from stageflow.platform.engine.tracking import serve_ui
from stageflow.platform.engine.trial_plan import fingerprints
from stageflow.platform.results.export import export, export_model
from stageflow.platform.results.report import read_results, trials_table, write_analysis
from stageflow.platform.results.tables import format_table

EXIT_BAD_INPUT = 2

DESCRIPTION = """\
stageflow runs multi-stage LLM post-training studies on Ray: every ordering of the
study's stages x hyper-parameters x seeds is a trial; every study, trial and stage
is an MLflow run.

examples:
  stageflow validate studies/quickstart.yaml
  stageflow plan studies/quickstart.yaml seeds=[0,1,2,3,4,5,6,7] --pilot runs/quickstart
  stageflow run studies/quickstart.yaml seeds=[0,1] stages.inst.lr=3e-4
  stageflow status runs/quickstart
  stageflow resume runs/quickstart          # after an interruption
  stageflow report runs/quickstart
  stageflow export runs/quickstart          # results.csv / .parquet for a notebook
  stageflow export-model runs/quickstart --trial ID --stage ga --out my-model
  stageflow prune runs/quickstart --keep final --dry-run
  stageflow submit studies/quickstart.yaml --address http://HEAD:8265
  stageflow ui runs/quickstart
  stageflow ui runs/quickstart --screenshot docs/quickstart/ui
"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="stageflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in [
        ("validate", "check a study file (and overrides) without running anything"),
        ("plan", "a study's trials, trainings, checkpoints, disk and time before it runs"),
        ("run", "run a study: an embedded local Ray, or the cluster at RAY_ADDRESS"),
        ("resume", "continue an interrupted study: finished trials and prefixes are kept"),
        ("status", "trials of a study with their progress"),
        ("report", "the per-ordering table of a study's finished trials"),
    ]:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name in ("validate", "plan", "run"):
            sub.add_argument("study", help="the study YAML file")
            sub.add_argument(
                "overrides",
                nargs="*",
                metavar="KEY=VALUE",
                help="dotted overrides, e.g. stages.math.lr=1e-4",
            )
        else:
            sub.add_argument("study_dir", help="the study's storage directory (holds study.yaml)")
        if name == "report":
            sub.add_argument(
                "--out",
                metavar="DIR",
                help="also write the report (report.md, trials.md, figures/) into DIR",
            )
        if name == "plan":
            sub.add_argument(
                "--time",
                choices=("auto", "calibrate", "none"),
                default="auto",
                help="auto: from an earlier study in the same storage that timed every stage "
                "kind, else a calibration run; calibrate: always calibrate; none: no estimate",
            )
            sub.add_argument(
                "--pilot",
                metavar="RUN_DIR",
                help="a finished study: how many seeds detect its ordering effect",
            )
        if name in ("run", "resume"):
            sub.add_argument(
                "--verbose",
                action="store_true",
                help="also show Ray's, Tune's and the libraries' own output",
            )
    submit = commands.add_parser(
        "submit",
        help="submit a study to a Ray cluster as a Ray job",
        description="validate locally, then submit `stageflow run` as a Ray job with this directory as its working dir",
    )
    submit.add_argument("study", help="the study YAML file (inside the current directory)")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    submit.add_argument(
        "--address", required=True, help="the cluster's job server, e.g. http://HEAD:8265"
    )
    ui = commands.add_parser(
        "ui",
        help="serve the MLflow UI of a study on 127.0.0.1",
        description="serve the MLflow UI of a study's store",
    )
    ui.add_argument("study_dir", help="the study's storage directory (holds mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument(
        "--open", action="store_true", help="open the study's runs in a browser, where one exists"
    )
    ui.add_argument(
        "--screenshot",
        metavar="DIR",
        help="instead of serving: save the study's runs view and its first trial's charts as "
        "DIR/runs.png and DIR/trial.png (headless Chromium)",
    )
    export = commands.add_parser(
        "export",
        help="write a study's results as one tidy table (CSV and Parquet)",
        description="one row per trial, stage or unlearning branch, and metric, with ordering, "
        "seed, hyper-parameters and MLflow run ids; in Python: "
        "stageflow.platform.results.export.results(RUN_DIR)",
    )
    export.add_argument("study_dir", help="the study's storage directory")
    export.add_argument("--out", metavar="DIR", help="where to write (default: STUDY_DIR/export)")
    model = commands.add_parser(
        "export-model",
        help="copy one checkpoint of a study out as a self-contained HF model directory",
        description="the model a finished trial had after one stage of its path or one "
        "unlearning branch (under LoRA: the merged model, its adapter in adapter/)",
    )
    model.add_argument("study_dir", help="the study's storage directory")
    model.add_argument("--trial", required=True, help="a trial id (see `stageflow status`)")
    model.add_argument("--stage", required=True, help="a stage of its path or a branch's name")
    model.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    prune = commands.add_parser(
        "prune",
        help="remove the prefix checkpoints a study no longer needs",
        description="final: keep each finished trial's last checkpoints (path end, branches); "
        "reported: keep none (records and evaluations stay); all: remove nothing",
    )
    prune.add_argument("study_dir", help="the study's storage directory")
    prune.add_argument("--keep", required=True, choices=KEEP)
    prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except StudyError as err:
        print(f"stageflow: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_and_validate(args.study, args.overrides)
    search = spec.orderings.search
    if search is not None:
        total = math.factorial(len(search.stages))
        print(
            f"{args.study}: valid — a {search.method} search for the {search.goal} of {search.score} over {total} orderings, at most {search.budget} stage trainings"
        )
        return 0
    orderings = len(set(ordering_paths(spec.orderings)))
    print(f"{args.study}: valid — {orderings} orderings, {trial_count(spec)} trials")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # lazy: Ray and the runner (a calibration runs a short study), for plan only
    from stageflow.platform.commands.plan import plan_lines

    spec = load_and_validate(args.study, args.overrides)
    if args.time != "none":
        quiet()
    for line in plan_lines(spec, args.study, args.time, args.pilot):
        print(line, flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = load_and_validate(args.study, args.overrides)
    return run_and_summarise(spec, args.study, resume=False, verbose=args.verbose)


def cmd_resume(args: argparse.Namespace) -> int:
    spec, source = load_study_dir(args.study_dir)
    return run_and_summarise(spec, source, resume=True, verbose=args.verbose)


def quiet() -> None:
    """stageflow's own lines only: Tune's banners, progress bars, library warnings and Ray's
    warnings are off (`--verbose` keeps them)."""
    for name, value in {
        "RAY_AIR_NEW_OUTPUT": "0",  # Tune's box and "View detailed results" lines
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")


def run_and_summarise(spec, source: str, resume: bool, verbose: bool = False) -> int:
    from stageflow.platform.engine.runner import (  # lazy: Ray, Tune and the actors, for run and resume only
        embedded_spec,
        run_study,
    )

    study, trials = StudyDir.of(spec), expand(spec)
    search = spec.orderings.search is not None  # its trials are known when it ends
    finished = []
    if any(study.trial_record(t.trial_id).is_file() for t in trials):
        planned = spec if os.environ.get("RAY_ADDRESS") else embedded_spec(spec)
        finished = study.records(trials, fingerprints(planned, study, trials))
    if len(finished) == len(trials) and not search:  # nothing left: start nothing
        print(f"all {len(trials)} trials of {spec.name} are finished; nothing to run")
        results = [(trial, record["metrics"]) for trial, record in finished]
    else:
        if not verbose:
            quiet()
        results = run_study(spec, source, resume=resume, verbose=verbose)
        trials = expand(spec, study.searched_paths()) if search else trials
    print("\n" + trials_table(results) + "\n")
    report = study.report / "report.md"
    if spec.unlearning and report.is_file():
        print(report_summary(report) + "\n")
        print(f"report:     {report} (and report.html)")
    print(f"study dir:  {study.root}")
    print(f"MLflow:     {spec.tracking.uri or study.tracking_uri}")
    print(f"UI:         stageflow ui {study.root}   (or: make ui)")
    return 0 if len(results) == len(trials) else 1


def report_summary(report) -> str:
    """The report's first section: the primary score's verdict and every score's ordering test."""
    return "\n".join(report.read_text().split("## ")[1].splitlines()[1:]).strip()


def load_study_dir(study_dir: str, check: bool = True):
    """The resolved spec a study directory was run with: validated again when `check` (to run
    it), else only read against the schema (status and report load neither torch nor Ray)."""
    path = StudyDir.existing(study_dir).spec_file
    if not check:
        return load_study(path), str(path)

    return load_and_validate(path), str(path)


def cmd_status(args: argparse.Namespace) -> int:
    spec, _ = load_study_dir(args.study_dir, check=False)
    status = study_status(spec)
    print(format_table(["trial", "ordering", "seed", "progress"], status.rows))
    print(f"\n{status.done} of {len(status.rows)} trials done")
    if status.trainings_left >= 0 and status.done < len(status.rows):
        print(
            f"left to run: {status.trainings_left} stage trainings, "
            f"{status.evaluations_left} evaluation-set results"
        )
    use = StudyDir.of(spec).disk_use()
    parts = [
        f"{name} {size_text(size)}" + (f" ({count})" if count else "")
        for name, (size, count) in use.items()
    ]
    print(f"disk: {size_text(sum(size for size, _ in use.values()))}; " + ", ".join(parts))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    spec, _ = load_study_dir(args.study_dir, check=False)
    study = StudyDir.of(spec)
    trials = expand(spec, study.searched_paths())
    table = trials_table(read_results(study, trials, None))  # what was run, with what it was
    print(table)
    stale = study.stale_records(trials, fingerprints(spec, study, trials, write=False))
    if stale:
        print(
            f"note: {len(stale)} of these trials were made by another version of stageflow, its "
            f"libraries, the model or the data than this checkout has (their provenance is in "
            f"the report); `stageflow run` would run them again"
        )
    _, files = write_analysis(spec, study, trials, None)  # as `stageflow run` writes it
    print("\n" + files["report.md"].read_text().split("## Figures")[0].strip())
    print(f"\nreport: {files['report.html']}")
    if args.out:
        export_report(Path(args.out), table, files)
        print(f"written to {args.out}")
    return 0


def export_report(out: Path, trials_table: str, files: dict) -> None:
    """The trials table (trials.md) and the report's files, copied into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials.md").write_text(trials_table + "\n")
    for name, path in files.items():
        if name != "report.html":  # the figures are beside report.md; the HTML embeds them
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / name)


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_and_validate(args.study, args.overrides)
    job_id = submit_study(args.address, args.study, args.overrides, spec)
    print(f"submitted {args.study} as Ray job {job_id}")
    print(f"follow it:  ray job logs --address {args.address} --follow {job_id}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:

    study = StudyDir(Path(args.study_dir).absolute())
    if not study.mlflow_db.is_file():
        raise StudyError(
            args.study_dir,
            "study_dir",
            "no mlflow.db here; expected a study's storage directory (run the study first)",
        )
    spec, _ = load_study_dir(args.study_dir, check=False)
    if args.screenshot:
        missing = missing_browser()
        if missing:
            raise StudyError(args.study_dir, "--screenshot", f"expected {missing}")
        out = Path(args.screenshot)
        for path in screenshot_study(
            study.tracking_uri, spec.experiment, spec.name, out, args.host
        ):
            print(f"wrote {path}")
        return 0
    return serve_ui(study.tracking_uri, spec.experiment, args.host, args.port, args.open)


def cmd_export(args: argparse.Namespace) -> int:
    table, paths = export(args.study_dir, args.out)
    print(f"{len(table)} rows: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    out, key = export_model(args.study_dir, args.trial, args.stage, args.out)
    print(f"{out}: the model of trial {args.trial} after '{args.stage}' (prefix {key})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    removed, freed = prune(args.study_dir, args.keep, args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(removed)} checkpoints, {size_text(freed)} {verb} (--keep {args.keep})")
    return 0


COMMANDS = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "run": cmd_run,
    "resume": cmd_resume,
    "status": cmd_status,
    "report": cmd_report,
    "submit": cmd_submit,
    "ui": cmd_ui,
    "export": cmd_export,
    "export-model": cmd_export_model,
    "prune": cmd_prune,
}

if __name__ == "__main__":
    sys.exit(main())
